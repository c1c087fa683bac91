"""U-Net: segments generated images of circles, squares and triangles into a per-pixel class mask."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnserve_contract.model_spec import ModelSpec

from .. import api, datasets
from ..training import Progress, Trained, minibatches

NAME = "shapes-unet"
MODEL_NAMES = (NAME,)
FAMILY = "unet"
TASK = "segment"
NEEDS: tuple[str, ...] = ()
TRAIN_S = 100  # about how long it trains here (seconds, one thread): ETAs and the zoo's work order
QUALITY_BAR = {"mean_iou": 0.90}
STRIDE = 8  # three 2x poolings: height and width must be multiples of this


def _double_conv(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(),
        nn.Conv2d(outputs, outputs, 3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections: three downsamplings, three upsamplings."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.down = nn.ModuleList([_double_conv(1, w[0]), _double_conv(w[0], w[1]), _double_conv(w[1], w[2])])
        self.bottom = _double_conv(w[2], w[3])
        self.up = nn.ModuleList(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(3)))
        self.merge = nn.ModuleList(_double_conv(2 * w[i], w[i]) for i in reversed(range(3)))
        self.head = nn.Conv2d(w[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def build(fast: bool = False) -> nn.Module:
    return UNet(4 if fast else 16, len(datasets.SHAPE_LABELS))


def mean_iou(predicted: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """Intersection over union per class, over all pixels of all images, averaged over the classes."""
    scores = []
    for c in range(classes):
        union = np.logical_or(predicted == c, truth == c).sum()
        if union:
            scores.append(np.logical_and(predicted == c, truth == c).sum() / union)
    return float(np.mean(scores))


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    started = time.perf_counter()
    images, masks = datasets.shapes(64 if fast else 2000, 32, seed=0)
    test_images, test_masks = datasets.shapes(32 if fast else 300, 32, seed=1)
    x, y = torch.from_numpy(images), torch.from_numpy(masks.astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    epochs = 1 if fast else 8
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    progress = Progress(NAME, epochs)
    for epoch in range(epochs):
        model.train()
        for index in minibatches(len(x), 32, generator):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
        schedule.step()
        progress.update(epoch + 1)
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(test_images)).argmax(dim=1).numpy()
    quality = {"mean_iou": mean_iou(predicted, test_masks, len(datasets.SHAPE_LABELS))}
    return Trained(quality, time.perf_counter() - started)


def _sample(batch: int, variant: int) -> tuple[torch.Tensor, ...]:
    height, width = ((32, 32), (48, 64))[variant]  # any multiple of the stride
    return (torch.rand((batch, 1, height, width), generator=torch.Generator().manual_seed(variant)),)


def export(model: nn.Module, out: Path, quality: dict[str, float]) -> list[api.Exported]:
    path = out / NAME / "1" / "model.onnx"
    parity = api.export(
        model,
        torch.full((2, 1, 32, 32), 0.5),
        ModelSpec(
            task=TASK,
            family=FAMILY,
            labels=datasets.SHAPE_LABELS,
            input_layout="NCHW",
            image_size=(32, 32),
            quality=quality,
            training_data=datasets.SHAPES_SOURCE,
            description=f"U-Net (16-32-64-128 channels) on grey images; height and width any multiple of {STRIDE}",
            outputs={
                "logits": "per-pixel class scores [batch, classes, height, width]; argmax over classes is the mask"
            },
            extra={"stride": str(STRIDE)},
        ),
        out=path,
        output_names=("logits",),
        dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}},
        sample=_sample,
    )
    return [api.Exported(NAME, TASK, path, parity)]
