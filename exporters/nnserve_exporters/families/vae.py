"""VAE: a variational autoencoder of 8x8 digits, exported as an encoder (encode) and a decoder (generate)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from nnserve_contract.model_spec import ModelSpec, Preprocessing

from .. import api, datasets
from ..judge import judge, sample_quality
from ..training import Progress, Trained, minibatches

NAME = "digits-vae"
MODEL_NAMES = (NAME, NAME + "-encoder")  # the models this family installs
FAMILY = "vae"
TASK = "generate"
NEEDS = ("cnn",)
TRAIN_S = 30  # about how long it trains here (seconds, one thread): ETAs and the zoo's work order
LATENT = 8
BETA = 0.5  # weight of the KL term: below 1 the decoder draws sharper digits
QUALITY_BAR = {"reconstruction_accuracy": 0.90, "sample_confident_fraction": 0.60}


class VAE(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.mean = nn.Linear(hidden, LATENT)
        self.log_variance = nn.Linear(hidden, LATENT)
        self.decoder = nn.Sequential(
            nn.Linear(LATENT, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 64),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mean(h), self.log_variance(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).reshape(-1, 1, 8, 8)


class Encoder(nn.Module):
    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.encode(x)


class Decoder(nn.Module):
    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def build(fast: bool = False) -> nn.Module:
    return VAE(32 if fast else 256)


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    assert isinstance(model, VAE)
    started = time.perf_counter()
    data = datasets.digit_images()
    x = torch.from_numpy(data.x_train * datasets.DIGIT_SCALE)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    epochs = 2 if fast else 150
    progress = Progress(NAME, epochs)
    for epoch in range(epochs):
        model.train()
        for index in minibatches(len(x), 64, generator):
            mean, log_variance = model.encode(x[index])
            z = mean + torch.randn(mean.shape, generator=generator) * (0.5 * log_variance).exp()
            reconstruction = nn.functional.binary_cross_entropy(model.decode(z), x[index], reduction="sum")
            kl = -0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp()).sum()
            optimizer.zero_grad()
            ((reconstruction + BETA * kl) / len(index)).backward()
            optimizer.step()
        progress.update(epoch + 1)
    model.eval()
    test = torch.from_numpy(data.x_test * datasets.DIGIT_SCALE)
    with torch.no_grad():
        reconstructed = model.decode(model.encode(test)[0])
        samples = model.decode(torch.randn(1000, LATENT, generator=torch.Generator().manual_seed(1)))
    predicted, _ = judge(zoo["cnn"], reconstructed)
    quality = {"reconstruction_accuracy": float((predicted == data.y_test).mean())}
    quality |= sample_quality(zoo["cnn"], samples, prefix="sample_")
    return Trained(quality, time.perf_counter() - started)


def export(model: nn.Module, out: Path, quality: dict[str, float]) -> list[api.Exported]:
    assert isinstance(model, VAE)
    common = ModelSpec(
        task="encode",
        family=FAMILY,
        quality=quality,
        training_data=datasets.DIGITS_SOURCE,
        image_size=(8, 8),
        output_kind="values",
        extra={"latent_dim": str(LATENT), "latent_distribution": "standard normal", "beta": str(BETA)},
    )
    encoder_path = out / (NAME + "-encoder") / "1" / "model.onnx"
    encoder_parity = api.export(
        Encoder(model),
        torch.full((2, 1, 8, 8), 0.5),
        dataclasses.replace(
            common,
            task="encode",
            input_layout="NCHW",
            preprocessing=Preprocessing(scale=datasets.DIGIT_SCALE),
            description=f"VAE encoder: an 8x8 digit to the mean and log-variance of its {LATENT}-d latent",
            outputs={"mean": f"{LATENT}-d latent mean", "log_variance": f"{LATENT}-d latent log-variance"},
        ),
        out=encoder_path,
        output_names=("mean", "log_variance"),
    )
    decoder_path = out / NAME / "1" / "model.onnx"
    decoder_parity = api.export(
        Decoder(model),
        torch.zeros(2, LATENT),
        dataclasses.replace(
            common,
            task="generate",
            input_layout="latent",
            description=f"VAE decoder: a {LATENT}-d latent (standard normal to sample) to an 8x8 digit",
            outputs={"image": "8x8 grey digit, intensities 0..1 (multiply by 16 for the digits' 0..16 scale)"},
        ),
        out=decoder_path,
        input_names=("z",),
        output_names=("image",),
    )
    return [
        api.Exported(NAME + "-encoder", "encode", encoder_path, encoder_parity),
        api.Exported(NAME, "generate", decoder_path, decoder_parity),
    ]
