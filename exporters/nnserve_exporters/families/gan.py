"""GAN: a class-conditional generator of 8x8 digits, trained adversarially (AC-GAN).

Conditioning on the digit keeps every class in reach (no mode collapse onto a few digits), and the
discriminator also names the digit it sees (an auxiliary classifier), which pushes the generator
to draw digits that read clearly. The server samples the label uniformly when the caller names none.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from nnserve_contract.model_spec import ModelSpec

from .. import api, datasets
from ..judge import sample_quality
from ..training import Progress, Trained

NAME = "digits-gan"
MODEL_NAMES = (NAME,)
FAMILY = "gan"
TASK = "generate"
NEEDS = ("cnn",)
TRAIN_S = 90  # about how long it trains here (seconds, one thread): ETAs and the zoo's work order
LATENT = 32
EMA_DECAY = 0.995
QUALITY_BAR = {"confident_fraction": 0.80, "rarest_class_fraction": 0.04}


class Generator(nn.Module):
    """DCGAN-style: latent and digit embedding -> 2x2 features -> two transposed convolutions -> 8x8."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.label = nn.Embedding(10, 16)
        self.project = nn.Sequential(nn.Linear(LATENT + 16, 4 * width * 4), nn.BatchNorm1d(4 * width * 4), nn.ReLU())
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1),  # 2x2 -> 4x4
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, 1, 4, stride=2, padding=1),  # 4x4 -> 8x8
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.label(label)], dim=1)).reshape(-1, 4 * self.width, 2, 2)
        return self.upsample(h)


class Discriminator(nn.Module):
    """Two strided convolutions over the image and a label plane; says real or fake, and which digit."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.label = nn.Embedding(10, 64)
        self.body = nn.Sequential(
            nn.Conv2d(2, 2 * width, 4, stride=2, padding=1),  # 8x8 -> 4x4
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1),  # 4x4 -> 2x2
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Dropout(0.2),
        )
        self.real = nn.Linear(4 * width * 4, 1)
        self.digit = nn.Linear(4 * width * 4, 10)

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plane = self.label(label).reshape(-1, 1, 8, 8)
        h = self.body(torch.cat([image, plane], dim=1))
        return self.real(h).squeeze(1), self.digit(h)


def build(fast: bool = False) -> nn.Module:
    return Generator(4 if fast else 32)


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    started = time.perf_counter()
    data = datasets.digits()
    real_images = torch.from_numpy(data.x_train * datasets.DIGIT_SCALE).reshape(-1, 1, 8, 8)
    real_labels = torch.from_numpy(data.y_train)
    discriminator = Discriminator(4 if fast else 32)
    generator = torch.Generator().manual_seed(0)
    g_opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    steps, batch = (50 if fast else 1800), 64
    # The exported generator is an exponential moving average of the trained one's weights: GAN
    # training oscillates, and the average draws steadier digits than any single step's weights.
    average = copy.deepcopy(model)
    progress = Progress(NAME, steps)
    for step in range(steps):
        model.train()
        index = torch.randint(0, len(real_images), (batch,), generator=generator)
        z = torch.randn(batch, LATENT, generator=generator)
        labels = torch.randint(0, 10, (batch,), generator=generator)
        fake = model(z, labels)
        d_opt.zero_grad()
        real_score, real_digit = discriminator(real_images[index], real_labels[index])
        fake_score, _ = discriminator(fake.detach(), labels)
        d_loss = (
            bce(real_score, torch.full((batch,), 0.9))
            + bce(fake_score, torch.zeros(batch))
            + nn.functional.cross_entropy(real_digit, real_labels[index])
        )
        d_loss.backward()
        d_opt.step()
        g_opt.zero_grad()
        fake_score, fake_digit = discriminator(fake, labels)
        g_loss = bce(fake_score, torch.ones(batch)) + nn.functional.cross_entropy(fake_digit, labels)
        g_loss.backward()
        g_opt.step()
        with torch.no_grad():
            for kept, current in zip(average.parameters(), model.parameters(), strict=True):
                kept.lerp_(current, 1 - EMA_DECAY)
            for kept_buffer, buffer in zip(average.buffers(), model.buffers(), strict=True):
                kept_buffer.copy_(buffer)
        progress.update(step + 1, f"d {d_loss.item():.2f} g {g_loss.item():.2f}")
    model.load_state_dict(average.state_dict())
    model.eval()
    evaluation = torch.Generator().manual_seed(1)
    with torch.no_grad():
        samples = model(torch.randn(1000, LATENT, generator=evaluation), torch.arange(1000) % 10)
    return Trained(sample_quality(zoo["cnn"], samples), time.perf_counter() - started)


def _sample(batch: int, variant: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(variant)
    return torch.randn(batch, LATENT, generator=generator), torch.randint(0, 10, (batch,), generator=generator)


def export(model: nn.Module, out: Path, quality: dict[str, float]) -> list[api.Exported]:
    path = out / NAME / "1" / "model.onnx"
    parity = api.export(
        model,
        (torch.zeros(2, LATENT), torch.zeros(2, dtype=torch.int64)),
        ModelSpec(
            task=TASK,
            family=FAMILY,
            labels=datasets.DIGIT_LABELS,
            output_kind="values",
            input_layout="latent",
            image_size=(8, 8),
            quality=quality,
            training_data=datasets.DIGITS_SOURCE,
            description="Conditional DCGAN-style generator (latent 32 + digit embedding -> 2x2 -> 4x4 -> 8x8), AC-GAN",
            outputs={"image": "8x8 grey digit, intensities 0..1 (multiply by 16 for the digits' 0..16 scale)"},
            extra={"latent_dim": str(LATENT), "latent_distribution": "standard normal", "condition": "label"},
        ),
        out=path,
        input_names=("z", "label"),
        output_names=("image",),
        sample=_sample,
    )
    return [api.Exported(NAME, TASK, path, parity)]
