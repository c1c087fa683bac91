"""The zoo in --fast mode: every family trains, exports, passes parity, describes itself and serves."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import RunningServer

from nnserve_contract.model_spec import ModelSpec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from nnserve_exporters.zoo import FAMILIES, ZooRow

EXPECTED = {
    "digits-fnn": ("fnn", "classify"),
    "digits-cnn": ("cnn", "classify"),
    "digits-resnet": ("resnet", "classify"),
    "digits-rnn": ("rnn", "classify"),
    "chars-lstm": ("lstm", "generate"),
    "chars-gru": ("gru", "generate"),
    "chars-transformer": ("transformer", "generate"),
    "sentence-minilm": ("transformer", "encode"),
    "shapes-unet": ("unet", "segment"),
    "digits-gan": ("gan", "generate"),
    "digits-vae": ("vae", "generate"),
    "digits-vae-encoder": ("vae", "encode"),
}


def spec_of(path: Path) -> ModelSpec:
    spec = ModelSpec.from_props({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props})
    assert spec is not None
    return spec


def test_every_family_builds_with_parity(fast_zoo: tuple[Path, list[ZooRow]]) -> None:
    out, rows = fast_zoo
    assert {r.name: (r.family, r.task) for r in rows} == EXPECTED
    assert {r.family for r in rows} == {
        "fnn", "cnn", "rnn", "lstm", "gru", "gan", "vae", "transformer", "resnet", "unet",
    }  # fmt: skip
    assert len(FAMILIES) == 11  # ten families; the transformer family has two modules (LM, MiniLM)
    for row in rows:
        assert row.parity_error < 1e-4, row
        assert (out / row.name / "1" / "model.onnx").is_file()
        card = (out / row.name / "model_card.md").read_text()
        assert row.family in card
        assert row.task in card


def test_metadata_describes_each_model(fast_zoo: tuple[Path, list[ZooRow]]) -> None:
    out, rows = fast_zoo
    for row in rows:
        spec = spec_of(out / row.name / "1" / "model.onnx")
        assert (spec.family, spec.task) == EXPECTED[row.name]
        assert spec.training_data, row.name
        assert spec.description, row.name
        assert spec.exporter_version == "0.1.0"
        assert spec.outputs, row.name  # what each output means
        assert set(spec.quality) >= set(FAMILIES[_family_key(row)].QUALITY_BAR), row.name
        if spec.task == "classify":
            assert spec.labels == tuple(str(d) for d in range(10))
            assert spec.preprocessing.scale == pytest.approx(1 / 16)
        if row.name.startswith("chars-"):
            assert len(spec.vocabulary) == 94
            assert spec.state or spec.cache  # step model: state in -> state out, or a cache it fills
    unet = spec_of(out / "shapes-unet" / "1" / "model.onnx")
    assert unet.labels == ("background", "circle", "square", "triangle")
    minilm = spec_of(out / "sentence-minilm" / "1" / "model.onnx")
    assert '"WordPiece"' in minilm.tokenizer
    assert spec_of(out / "digits-gan" / "1" / "model.onnx").extra["latent_dim"] == "32"


def _family_key(row: ZooRow) -> str:
    (key,) = [key for key, family in FAMILIES.items() if row.name in family.MODEL_NAMES]
    return key


@pytest.mark.parametrize("name", ["chars-lstm", "chars-gru"])
def test_step_models_generate_one_token_per_call(fast_zoo: tuple[Path, list[ZooRow]], name: str) -> None:
    """Feeding the prompt, then one token at a time with the returned state, gives the same logits as
    running the whole sequence at once: the state really carries the prefix."""
    out, _ = fast_zoo
    path = out / name / "1" / "model.onnx"
    spec = spec_of(path)
    session = ort.InferenceSession(str(path))
    inputs = {i.name: i for i in session.get_inputs()}
    tokens = np.random.default_rng(0).integers(0, len(spec.vocabulary), (2, 9)).astype(np.int64)

    def empty_state(name: str) -> np.ndarray:
        shape = [2 if d == "batch" else (0 if isinstance(d, str) else d) for d in inputs[name].shape]
        return np.zeros(shape, np.float32)

    state = {s: empty_state(s) for s in spec.state}
    output_names = ["logits", *spec.state.values()]
    full = session.run(["logits"], {"tokens": tokens, **state})[0]
    prompt = session.run(output_names, {"tokens": tokens[:, :5], **state})
    state = dict(zip(spec.state, prompt[1:], strict=True))
    stepped = [prompt[0]]
    for t in range(5, 9):
        result = session.run(output_names, {"tokens": tokens[:, t : t + 1], **state})
        state = dict(zip(spec.state, result[1:], strict=True))
        stepped.append(result[0])
    np.testing.assert_allclose(np.concatenate(stepped, axis=1), full, rtol=1e-4, atol=1e-4)


def test_the_transformer_steps_over_a_cache_it_never_copies(fast_zoo: tuple[Path, list[ZooRow]]) -> None:
    """The prompt, then tokens one by one, with only the new positions coming back and written into
    buffers larger than needed (their spare slots hold noise), give the logits of the whole sequence
    in one call; and the graph returns no output as large as a buffer."""
    out, _ = fast_zoo
    path = out / "chars-transformer" / "1" / "model.onnx"
    spec = spec_of(path)
    assert spec.cache is not None
    assert not spec.state
    session = ort.InferenceSession(str(path))
    inputs = {i.name: i for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, len(spec.vocabulary), (2, 9)).astype(np.int64)
    axis = spec.cache.axis

    def buffers(capacity: int) -> dict[str, np.ndarray]:
        shapes = {
            n: [2 if d == "batch" else capacity if d == "capacity" else d for d in inputs[n].shape]
            for n in spec.cache.buffers
        }
        return {n: rng.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()}

    outputs = ["logits", *spec.cache.buffers.values()]
    length = spec.cache.length_input
    full = session.run(["logits"], {"tokens": tokens, length: np.array([0]), **buffers(0)})[0]
    cache, filled, stepped = buffers(12), 0, []
    for start, end in ((0, 5), (5, 6), (6, 7), (7, 8), (8, 9)):
        result = dict(
            zip(
                outputs,
                session.run(outputs, {"tokens": tokens[:, start:end], length: np.array([filled]), **cache}),
                strict=True,
            )
        )
        for name, output in spec.cache.buffers.items():
            assert result[output].shape[axis] == end - start  # only this call's positions
            np.moveaxis(cache[name], axis, 0)[filled : filled + end - start] = np.moveaxis(result[output], axis, 0)
        filled += end - start
        stepped.append(result["logits"])
    np.testing.assert_allclose(np.concatenate(stepped, axis=1), full, rtol=1e-4, atol=1e-4)


def test_unet_takes_any_multiple_of_its_stride(fast_zoo: tuple[Path, list[ZooRow]]) -> None:
    out, _ = fast_zoo
    session = ort.InferenceSession(str(out / "shapes-unet" / "1" / "model.onnx"))
    for height, width in ((8, 8), (40, 24), (64, 96)):
        (logits,) = session.run(None, {"input": np.zeros((1, 1, height, width), np.float32)})
        assert logits.shape == (1, 4, height, width)


def test_the_server_loads_the_whole_zoo(zoo_server: RunningServer) -> None:
    with grpc.insecure_channel(zoo_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert {(m.name, m.state) for m in index.models} == {(name, "READY") for name in EXPECTED}
        for name in EXPECTED:
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
            assert metadata.inputs, name
            assert metadata.outputs, name


def test_the_work_order_is_derived_from_the_expected_training_times() -> None:
    """Quickest first, the longest second (on its own job), then the rest quickest first, each family
    once (its TRAIN_S is also the servers' ETA)."""
    from nnserve_exporters.zoo import EXPECTED_S, FAMILIES, WORK_ORDER

    assert sorted(WORK_ORDER) == sorted(FAMILIES)
    times = [EXPECTED_S[key] for key in WORK_ORDER]
    assert times[0] == min(times)
    assert times[1] == max(times)
    assert times[2:] == sorted(times[2:])
