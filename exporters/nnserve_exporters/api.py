"""`export()`: a trained PyTorch model in, a self-describing, verified ONNX file out.

The ONNX file carries a `ModelSpec` in its metadata (task, family, labels, preprocessing, quality,
...), which is all the server needs to serve it. After writing, onnxruntime is checked against
PyTorch on fresh random inputs at two batch sizes; a mismatch stops the export with an error that
names the output and the size of the error.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from nnserve_contract.model_spec import ModelSpec

from . import __version__

OPSET = 17
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Exported:
    """One model file a family wrote into the repository."""

    name: str
    task: str
    path: Path
    parity_error: float


class ParityError(AssertionError):
    """onnxruntime and PyTorch disagree on an exported model."""


Inputs = tuple[torch.Tensor, ...]
Sampler = Callable[[int, int], Inputs]  # (batch, variant) -> fresh inputs; variant varies other dynamic axes


def export(
    model: torch.nn.Module,
    example: torch.Tensor | Inputs,
    spec: ModelSpec,
    *,
    out: str | os.PathLike[str],
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    sample: Sampler | None = None,
) -> float:
    """Export `model` (eval mode) to `out` with `spec` in its metadata; returns the parity error.

    `example` is one input (or a tuple, one per `input_names`) the model accepts. By default axis 0
    of every input and output is a dynamic batch axis; pass `dynamic_axes` for anything else (a
    sequence axis, recurrent state whose batch axis is 1). Parity is checked on `sample(batch,
    variant)` for batches 1 and 7 and variants 0 and 1 (default: random tensors shaped like `example`
    but for the batch). The file records this exporter's version in `spec.exporter_version`.
    """
    examples = example if isinstance(example, tuple) else (example,)
    spec = dataclasses.replace(spec, exporter_version=__version__)
    model = model.eval()
    axes = dynamic_axes or {name: {0: "batch"} for name in (*input_names, *output_names)}
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        scratch_file = Path(scratch) / "model.onnx"
        torch.onnx.export(
            model,
            examples,
            scratch_file,
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={name: dict(a) for name, a in axes.items()},
            opset_version=OPSET,
            do_constant_folding=True,
        )
        proto = onnx.load(str(scratch_file))
    onnx.helper.set_model_props(proto, spec.to_props())
    proto.producer_name = "nnserve-exporters"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    path = Path(out)
    _write_atomically(path, proto.SerializeToString())
    batch_axes = [next((a for a, n in axes.get(name, {}).items() if n == "batch"), None) for name in input_names]
    return verify(model, path, sample or _like(examples, batch_axes))


def verify(
    model: torch.nn.Module,
    path: Path,
    sample: Sampler | torch.Tensor,
    cases: Sequence[tuple[int, int]] = ((1, 0), (7, 1)),
) -> float:
    """Largest relative error of onnxruntime against PyTorch over fresh inputs; ParityError past 1e-4."""
    sampler = _like((sample,), [0]) if isinstance(sample, torch.Tensor) else sample
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    worst = 0.0
    for batch, variant in cases:
        inputs = sampler(batch, variant)
        with torch.no_grad():
            expected = model(*inputs)
        expected_list = expected if isinstance(expected, tuple | list) else (expected,)
        feed = {name: tensor.numpy() for name, tensor in zip(input_names, inputs, strict=True)}
        actual_list = session.run(output_names, feed)
        for name, want, got in zip(output_names, expected_list, actual_list, strict=True):
            error = relative_error(want.numpy(), got)
            if error > PARITY_TOLERANCE:
                shapes = {n: list(t.shape) for n, t in zip(input_names, inputs, strict=True)}
                raise ParityError(
                    f"{path}: output '{name}' differs from PyTorch at batch {batch} (inputs {shapes}): "
                    f"relative error {error:.2e} > {PARITY_TOLERANCE:.0e}"
                )
            worst = max(worst, error)
    return worst


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-6)
    return float(np.abs(expected.astype(np.float64) - actual).max(initial=0.0)) / scale


def _like(examples: Inputs, batch_axes: Sequence[int | None]) -> Sampler:
    """Random inputs shaped like `examples` but for the batch axis (None: no batch axis), in their value range."""

    def sample(batch: int, variant: int) -> Inputs:
        generator = torch.Generator().manual_seed(1234 + variant)
        inputs = []
        for example, axis in zip(examples, batch_axes, strict=True):
            shape = list(example.shape)
            if axis is not None:
                shape[axis] = batch
            inputs.append(random_like(example, shape, generator))
        return tuple(inputs)

    return sample


def random_like(example: torch.Tensor, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    if example.dtype.is_floating_point:
        low, high = float(example.min()), float(example.max())
        if low == high:
            low, high = low - 1, high + 1
        return (torch.rand(tuple(shape), generator=generator) * (high - low) + low).to(example.dtype)
    return torch.randint(0, max(int(example.max()) + 1, 1), tuple(shape), generator=generator, dtype=example.dtype)


MODEL_FILE_MODE, MODEL_FOLDER_MODE = 0o644, 0o755


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all, readable by every user: a repository exported by one user is
    often served by another (the image's uid 10001, a read-only volume). The temporary file is made
    0600, so it is opened up before it takes the name; the version and model folders it creates too."""
    for folder in reversed([path.parent, path.parent.parent]):
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(MODEL_FOLDER_MODE)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, MODEL_FILE_MODE)
    os.replace(tmp.name, path)
