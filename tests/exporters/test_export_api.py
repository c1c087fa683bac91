"""`nnserve_exporters.export`: self-describing ONNX, checked against PyTorch; and the zoo's layout."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from nnserve_contract.model_spec import AppendCache, ModelSpec, Preprocessing, SpecError
from nnserve_exporters import ParityError, export, verify
from nnserve_exporters.zoo import build_zoo, table


def small_classifier(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_export_writes_metadata_and_a_dynamic_batch(tmp_path: Path) -> None:
    path = tmp_path / "m" / "1" / "model.onnx"
    error = export(
        small_classifier(0),
        torch.zeros(2, 4),
        ModelSpec(
            task="classify",
            family="fnn",
            labels=("a", "b", "c"),
            preprocessing=Preprocessing(scale=0.5, mean=(1.0,), std=(2.0,)),
            quality={"accuracy": 0.9},
            training_data="made up",
            description="three classes",
        ),
        out=path,
    )
    assert error < 1e-4
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    spec = ModelSpec.from_props(props)
    assert spec is not None
    assert (spec.task, spec.family, spec.labels) == ("classify", "fnn", ("a", "b", "c"))
    assert spec.preprocessing == Preprocessing(0.5, (1.0,), (2.0,))
    assert spec.quality == {"accuracy": 0.9}
    assert spec.exporter_version == "0.1.0"
    session = ort.InferenceSession(str(path))
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 33):
        assert session.run(None, {"input": np.zeros((batch, 4), np.float32)})[0].shape == (batch, 3)


def test_exported_files_are_readable_by_every_user(tmp_path: Path) -> None:
    """A repository exported by one user is served by another (the image runs as uid 10001): the model
    file was 0600 (a temporary file renamed), so the server could load none of the zoo image's models."""
    previous = os.umask(0o077)  # even under a strict umask
    try:
        path = tmp_path / "repo" / "m" / "1" / "model.onnx"
        export(small_classifier(0), torch.zeros(2, 4), ModelSpec(task="classify", labels=("a", "b", "c")), out=path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755  # the version folder
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o755  # the model folder
    assert not list(path.parent.glob("*.tmp"))


def test_parity_failure_names_the_output_and_the_error(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    export(
        small_classifier(0),
        torch.zeros(2, 4),
        ModelSpec(
            task="classify",
            labels=("a", "b", "c"),
        ),
        out=path,
    )
    with pytest.raises(ParityError, match=r"output 'output' differs from PyTorch at batch 1 .*: relative error"):
        verify(small_classifier(1), path, torch.zeros(2, 4))  # different weights than the file


def test_a_classifier_needs_labels(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="labels"):
        export(
            small_classifier(0),
            torch.zeros(2, 4),
            ModelSpec(
                task="classify",
            ),
            out=tmp_path / "m.onnx",
        )


def test_unknown_task_is_refused() -> None:
    with pytest.raises(SpecError, match="task is 'dance'"):
        ModelSpec(task="dance", family="x")


def test_plain_onnx_has_no_spec_and_broken_metadata_is_an_error() -> None:
    assert ModelSpec.from_props({}) is None
    with pytest.raises(SpecError, match="unreadable"):
        ModelSpec.from_props({"nnserve.task": "classify", "nnserve.labels": "[not json"})


def test_an_append_cache_round_trips_and_a_broken_one_is_an_error() -> None:
    cache = AppendCache({"past_keys_0": "keys_0", "past_values_0": "values_0"}, "length", axis=2)
    spec = ModelSpec(task="generate", family="transformer", cache=cache, vocabulary=("a", "b"))
    assert ModelSpec.from_props(spec.to_props()) == spec
    assert ModelSpec.from_props(ModelSpec(task="generate", family="rnn").to_props()).cache is None  # type: ignore[union-attr]
    props = spec.to_props()
    for broken in ('{"buffers": {}, "length_input": "length", "axis": 2}', '{"buffers": {"a": "b"}}', "[1]"):
        with pytest.raises(SpecError):
            ModelSpec.from_props({**props, "nnserve.cache": broken})


def test_zoo_builds_what_a_family_needs_and_installs_atomically(tmp_path: Path) -> None:
    out = tmp_path / "models"
    rows = build_zoo(out, fast=True, only=["fnn", "gan"])
    assert [r.family for r in rows] == ["fnn", "cnn", "gan"]  # the GAN is judged by the CNN
    for row in rows:
        assert (out / row.name / "1" / "model.onnx").is_file()
        assert row.task in (out / row.name / "model_card.md").read_text()
        assert row.parity_error < 1e-4
    assert not (tmp_path / "models.partial").exists()
    assert "digits-fnn" in table(rows)
    with pytest.raises(FileExistsError, match="--force"):
        build_zoo(out, fast=True)
