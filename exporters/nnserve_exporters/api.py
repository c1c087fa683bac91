"""`export()`: a trained PyTorch model in, a self-describing, verified ONNX file out.

The ONNX file carries a `ModelSpec` in its metadata (task, family, labels, preprocessing, quality,
...), which is all the server needs to serve it. After writing, onnxruntime is checked against
PyTorch on fresh random inputs at two batch sizes; a mismatch stops the export with an error that
names the output and the size of the error.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from nnserve_client.model_spec import ModelSpec, Preprocessing

from . import __version__

OPSET = 17
PARITY_TOLERANCE = 1e-4


class ParityError(AssertionError):
    """onnxruntime and PyTorch disagree on an exported model."""


def export(
    model: torch.nn.Module,
    example: torch.Tensor,
    *,
    task: str,
    out: str | os.PathLike[str],
    family: str = "custom",
    labels: Sequence[str] = (),
    output_kind: str = "logits",
    input_layout: str = "features",
    preprocessing: Preprocessing | None = None,
    quality: Mapping[str, float] | None = None,
    training_data: str = "",
    description: str = "",
    input_name: str = "input",
    output_names: Sequence[str] = ("output",),
    verify_batch_sizes: Sequence[int] = (1, 7),
) -> float:
    """Export `model` (eval mode, batch dimension dynamic) to `out`; returns the parity error.

    `example` is one batch the model accepts; its non-batch dimensions fix the input shape.
    """
    spec = ModelSpec(
        task=task,
        family=family,
        labels=tuple(labels),
        output_kind=output_kind,
        input_layout=input_layout,
        preprocessing=preprocessing or Preprocessing(),
        quality=dict(quality or {}),
        training_data=training_data,
        description=description,
        exporter_version=__version__,
    )
    model = model.eval()
    dynamic_axes = {name: {0: "batch"} for name in (input_name, *output_names)}
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        scratch_file = Path(scratch) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            scratch_file,
            dynamo=False,
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
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
    return verify(model, path, example, verify_batch_sizes)


def verify(model: torch.nn.Module, path: Path, example: torch.Tensor, batch_sizes: Sequence[int] = (1, 7)) -> float:
    """Largest relative error of onnxruntime against PyTorch over fresh random batches."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]
    generator = torch.Generator().manual_seed(1234)
    worst = 0.0
    for batch in batch_sizes:
        x = _random_like(example, batch, generator)
        with torch.no_grad():
            expected = model(x)
        expected_list = expected if isinstance(expected, tuple | list) else (expected,)
        actual_list = session.run(output_names, {input_name: x.numpy()})
        for name, want, got in zip(output_names, expected_list, actual_list, strict=True):
            error = relative_error(want.numpy(), got)
            if error > PARITY_TOLERANCE:
                raise ParityError(
                    f"{path}: output '{name}' differs from PyTorch at batch {batch}: relative error "
                    f"{error:.2e} > {PARITY_TOLERANCE:.0e}"
                )
            worst = max(worst, error)
    return worst


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-6)
    return float(np.abs(expected.astype(np.float64) - actual).max(initial=0.0)) / scale


def _random_like(example: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    shape = (batch, *example.shape[1:])
    if example.dtype.is_floating_point:
        low, high = float(example.min()), float(example.max())
        return (torch.rand(shape, generator=generator) * (high - low) + low).to(example.dtype)
    high = int(example.max()) + 1
    return torch.randint(0, max(high, 1), shape, generator=generator, dtype=example.dtype)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)
