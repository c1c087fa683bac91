"""The benchmark's models, built with our exporters (random weights: speed does not depend on them).

- `bench-mlp`: 64 -> 256 -> 256 -> 10 with ReLU, the MLP of the issue's Triton figures.
- `bench-resnet18`: ResNet-18 as in torchvision (7x7 stem, max pool, basic blocks [2, 2, 2, 2],
  widths 64..512) on 3x224x224, written here in a few lines (no torchvision).
Both take a dynamic batch axis, so the server may batch them.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from torch import nn

from nnserve_contract.model_spec import ModelSpec
from nnserve_exporters import api
from nnserve_exporters.families.resnet import BasicBlock

MLP = "bench-mlp"
RESNET = "bench-resnet18"


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def resnet18(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    channels = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            layers.append(BasicBlock(channels, width, 2 if stage > 0 and block == 0 else 1))
            channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def build(out: Path, force: bool = False) -> dict[str, Path]:
    """Export both models into the repository `out` (skipped when present); returns their paths."""
    torch.manual_seed(0)
    specs = {
        MLP: (mlp, torch.rand(2, 64), "features", 10, "64-256-256-10 MLP, random weights (benchmark)"),
        RESNET: (resnet18, torch.rand(2, 3, 224, 224), "NCHW", 1000, "ResNet-18 on 3x224x224, random weights"),
    }
    paths = {}
    for name, (make, example, layout, classes, description) in specs.items():
        path = out / name / "1" / "model.onnx"
        if force or not path.is_file():
            model = make().eval()
            api.export(
                model,
                example,
                ModelSpec(
                    task="classify",
                    family="benchmark",
                    input_layout=layout,
                    labels=tuple(f"class-{i}" for i in range(classes)),
                    description=description,
                ),
                out=path,
                output_names=("logits",),
            )
        paths[name] = path
    return paths


def language_models(out: Path, force: bool = False) -> dict[str, Path]:
    """The zoo's LSTM and Transformer LMs, built and exported by their own families with untrained
    weights: a token costs the same whatever the weights, and training would take minutes."""
    from nnserve_exporters.families import lstm, transformer_lm

    paths = {}
    for family in (lstm, transformer_lm):
        path = out / family.NAME / "1" / "model.onnx"
        # Rebuilt when the exporters' code changed since (a family's export format may have).
        exporters = Path(str(api.__file__)).parent
        source = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(exporters.rglob("*.py")))).hexdigest()
        stamp = path.with_name("source.sha256")
        if force or not path.is_file() or not stamp.is_file() or stamp.read_text() != source:
            torch.manual_seed(0)
            family.export(family.build(), out, {})
            stamp.write_text(source)
        paths[family.NAME] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".cache/bench-models"))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    for name, path in (build(args.out, args.force) | language_models(args.out, args.force)).items():
        print(name, path)


if __name__ == "__main__":
    main()
