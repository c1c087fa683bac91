"""`nnserve-client`: every task from a terminal, tokens streamed as they come.

  nnserve-client models
  nnserve-client classify digits-cnn --image 7.png
  nnserve-client generate chars-lstm --prompt "The " --max-tokens 80 --temperature 0.8 --seed 1
  nnserve-client generate digits-gan --samples 4 --label 3 --out samples/
  nnserve-client encode sentence-minilm --text "a cat" "a kitten" --normalize
  nnserve-client segment shapes-unet --image shapes.png --out mask.png

--target, --timeout, --format and --debug go anywhere on the line; NNSERVE_TARGET sets the target.
--format json prints one JSON object per line (per model, per input, per generated piece).

exit codes: 0 done; 1 the server refused the call (the message says why); 2 a usage mistake
(a flag, a value out of range, a file that is not there); 3 the server cannot be reached.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import dataclasses
import json
import os
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .client import Client
from .errors import NNServeError, Unavailable
from .types import Classification, GeneratedImage, GenerationDone, TextPiece

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
TARGET_ENV = "NNSERVE_TARGET"
DEFAULT_TARGET = "127.0.0.1:8001"
# A segmentation mask saved for viewing: class ids spread over the grey range (0, 85, 170, 255 for four).
MASK_LEVELS = 255


def _checked(kind: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


POSITIVE = _checked(int, lambda v: v >= 1, "a whole number of at least 1")
NON_NEGATIVE = _checked(int, lambda v: v >= 0, "a whole number of at least 0")
FRACTION = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1")
TEMPERATURE = _checked(float, lambda v: 0.0 <= v <= 100.0, "a temperature from 0 to 100")
SECONDS = _checked(float, lambda v: 0.0 < v <= 86400.0, "a number of seconds above 0")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line (what is wrong, and where the help is), exit 2."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _common_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every subcommand takes, wherever they stand (defaults filled once, after parsing)."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--target",
        default=default(os.environ.get(TARGET_ENV, DEFAULT_TARGET)),
        help=f"server address host:port (default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout", type=SECONDS, default=default(60.0), help="deadline per call, in seconds (default: 60)"
    )
    parser.add_argument(
        "--format",
        choices=("text", "json"),
        default=default("text"),
        help="text for people, or json: one object per line for scripts (default: text)",
    )
    parser.add_argument(
        "--debug", action="store_true", default=default(False), help="show the traceback of an unexpected error"
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nnserve-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _common_options(sub, defaults=False)
        return sub

    command("models", "list the models: task, family, what each takes, quality")

    classify = command("classify", "top-k labels for images, texts or rows of numbers")
    classify.add_argument("model")
    inputs = classify.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", nargs="+", type=_existing_file, help="PNG or JPEG files")
    inputs.add_argument("--text", nargs="+", help="texts, for text classifiers")
    classify.add_argument(
        "--top-k", type=POSITIVE, default=3, help="labels per input, at most the model's labels (default: 3)"
    )

    generate = command("generate", "stream text from a language model, or draw images from an image generator")
    generate.add_argument("model")
    generate.add_argument("--prompt", default="", help="text to continue (language models)")
    generate.add_argument("--max-tokens", type=POSITIVE, default=64, help="tokens to generate (default: 64)")
    generate.add_argument(
        "--temperature", type=TEMPERATURE, default=0.8, help="sampling temperature; 0: greedy (default: 0.8)"
    )
    generate.add_argument(
        "--top-k", type=NON_NEGATIVE, default=0, help="sample from the k likeliest tokens only; 0: all (default: 0)"
    )
    generate.add_argument(
        "--top-p", type=FRACTION, default=0.0, help="sample from the smallest set holding p; 0 or 1: all (default: 0)"
    )
    generate.add_argument("--seed", type=int, help="the same seed gives the same output (default: random)")
    generate.add_argument(
        "--stop", nargs="*", default=[], help="stop strings; backslash escapes work (\\n) (default: none)"
    )
    generate.add_argument("--samples", type=POSITIVE, default=1, help="images to draw (default: 1)")
    generate.add_argument("--label", type=NON_NEGATIVE, help="class to draw (conditional generators; default: any)")
    generate.add_argument(
        "--out", type=Path, help="folder to write the images to, made if missing (default: write none)"
    )

    encode = command("encode", "vectors for texts or images")
    encode.add_argument("model")
    encoded = encode.add_mutually_exclusive_group(required=True)
    encoded.add_argument("--image", nargs="+", type=_existing_file, help="PNG or JPEG files")
    encoded.add_argument("--text", nargs="+", help="texts, for text encoders")
    encode.add_argument("--normalize", action="store_true", help="scale each vector to unit length")
    encode.add_argument("--json", action="store_true", help="the same as --format json: the full vectors")

    segment = command("segment", "a per-pixel class mask for an image")
    segment.add_argument("model")
    segment.add_argument("--image", type=_existing_file, required=True, help="a PNG or JPEG file")
    segment.add_argument(
        "--out",
        type=Path,
        help="write the mask here as a PNG, classes spread over the grey range to be seen (default: write none)",
    )
    segment.add_argument(
        "--raw-mask", action="store_true", help="with --out: write each pixel's class id (0, 1, 2...) instead"
    )
    return parser


def _emit(args: argparse.Namespace, text: str, record: dict[str, Any]) -> None:
    print(json.dumps(record) if args.format == "json" else text, flush=True)


def _models(args: argparse.Namespace, client: Client) -> None:
    for m in client.models():
        record = {
            "name": m.name,
            "version": m.version,
            "task": m.task,
            "family": m.family,
            "takes": m.takes(),
            "image": list(m.image) if m.image else None,
            "text": m.text,
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in m.inputs],
            "task_input": dataclasses.asdict(m.task_input) if m.task_input else None,
            "labels": list(m.labels),
            "quality": dict(m.quality),
        }
        quality = ", ".join(f"{k} {v:.4g}" for k, v in m.quality.items())
        text = f"{m.name:<20} v{m.version:<3} {m.task or 'kserve-only':<9} {m.family:<12} takes {m.takes()}"
        _emit(args, text + (f"; {quality}" if quality else ""), record)


def _ranked(item: Classification) -> list[dict[str, Any]]:
    return [{"label": s.label, "index": s.index, "probability": s.probability} for s in item.top]


def _classify(args: argparse.Namespace, client: Client) -> None:
    info = client.metadata(args.model)
    if info.labels and args.top_k > len(info.labels):
        print(f"nnserve-client: --top-k {args.top_k}: '{args.model}' has {len(info.labels)} labels", file=sys.stderr)
    results = client.classify(args.model, images=args.image, texts=args.text, top_k=args.top_k)
    for name, ranked in zip(args.image or args.text, results, strict=True):
        text = f"{name}: " + ", ".join(f"{s.label} {s.probability:.4f}" for s in ranked.top)
        _emit(args, text, {"input": str(name), "top": _ranked(ranked)})


def _encode(args: argparse.Namespace, client: Client) -> None:
    embeddings = client.encode(args.model, images=args.image, texts=args.text, normalize=args.normalize)
    vectors = embeddings.vectors
    names = [str(n) for n in args.image or args.text]
    if args.format == "json" or args.json:
        flat = vectors.reshape(len(vectors), -1)
        for name, vector in zip(names, flat, strict=True):
            record = {"input": name, "norm": float(np.linalg.norm(vector)), "vector": np.round(vector, 6).tolist()}
            print(json.dumps(record), flush=True)
    else:
        print(_describe_vectors(names, vectors))


def _describe_vectors(names: list[str], vectors: np.ndarray) -> str:
    """For people: the shape, each vector's norm and, for several, their pairwise cosine similarities."""
    flat = vectors.reshape(len(vectors), -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    lines = [f"{len(flat)} vector(s) of {flat.shape[1]} values (shape {list(vectors.shape)}; --json for the values)"]
    lines += [f"  [{i}] norm {norm:.4f}  {name}" for i, (name, norm) in enumerate(zip(names, norms, strict=True))]
    if len(flat) > 1:
        unit = flat / np.maximum(norms, 1e-12)[:, None]
        cosine = unit @ unit.T
        lines.append("cosine similarity:")
        lines.append("       " + "".join(f"{f'[{j}]':>8}" for j in range(len(flat))))
        lines += [f"  [{i}]".ljust(7) + "".join(f"{c:8.4f}" for c in row) for i, row in enumerate(cosine)]
    return "\n".join(lines)


def _segment(args: argparse.Namespace, client: Client) -> None:
    result = client.segment(args.model, args.image)
    height, width = result.mask.shape
    if args.out is not None:
        levels = max(len(result.labels) - 1, 1)
        mask = result.mask if args.raw_mask else (result.mask.astype(np.uint16) * MASK_LEVELS // levels)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(grey_png(mask.astype(np.uint8)))
    counts = ", ".join(f"{label} {count}" for label, count in result.pixel_counts.items())
    saved = f"; mask written to {args.out}" if args.out is not None else ""
    record = {
        "width": width,
        "height": height,
        "pixel_counts": dict(result.pixel_counts),
        "labels": list(result.labels),
    }
    if args.out is not None:
        record["out"] = str(args.out)
    _emit(args, f"{width}x{height} pixels: {counts}{saved}", record)


def grey_png(pixels: np.ndarray) -> bytes:
    """An 8-bit grey PNG of a uint8 [height, width] array (the SDK has no image library to lean on)."""
    height, width = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))  # filter 0 before each row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _generate(args: argparse.Namespace, client: Client) -> None:
    if args.prompt:
        _generate_text(args, client)
        return
    events = list(client.generate(args.model, num_samples=args.samples, seed=args.seed, label=args.label))
    images = [e for e in events if isinstance(e, GeneratedImage) and e.png is not None]
    if args.out is not None:  # only now: the call has succeeded
        args.out.mkdir(parents=True, exist_ok=True)
    for image in images:
        assert image.png is not None
        record: dict[str, Any] = {"index": image.index, "label": image.label}
        if args.out is not None:
            path = args.out / f"{args.model}-{image.index}{'-' + image.label if image.label else ''}.png"
            path.write_bytes(image.png)
            text, record["path"] = str(path), str(path)
        else:
            text = f"image {image.index}{' (label ' + image.label + ')' if image.label else ''}: {len(image.png)} bytes"
            record["png_base64"] = base64.b64encode(image.png).decode()
        _emit(args, text, record)
    if args.out is None and args.format == "text":
        print("(--out DIR writes the images)", file=sys.stderr)


def _generate_text(args: argparse.Namespace, client: Client) -> None:
    stops = [codecs.decode(s, "unicode_escape") for s in args.stop]  # "\n" typed in a shell is a newline
    options = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    started = False
    for event in client.generate(args.model, prompt=args.prompt, max_tokens=args.max_tokens, stop=stops, **options):
        if args.format == "json":
            if isinstance(event, TextPiece):
                print(json.dumps({"text": event.text}), flush=True)
            elif isinstance(event, GenerationDone):
                done = {"finish_reason": event.finish_reason, "generated_tokens": event.generated_tokens}
                print(json.dumps(done), flush=True)
            continue
        if not started:  # the prompt is echoed once the server has accepted the call
            sys.stdout.write(args.prompt)
            started = True
        if isinstance(event, TextPiece):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, GenerationDone):
            print(f"\n[{event.finish_reason}: {event.generated_tokens} tokens]")


COMMANDS: dict[str, Callable[[argparse.Namespace, Client], None]] = {
    "models": _models,
    "classify": _classify,
    "generate": _generate,
    "encode": _encode,
    "segment": _segment,
}


def _unreachable(error: NNServeError) -> bool:
    text = error.details.lower()
    return isinstance(error, Unavailable) and any(
        sign in text for sign in ("connection refused", "failed to connect", "dns resolution failed", "connect failed")
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # usage mistakes: argparse prints one line and exits 2
    try:
        with Client(args.target, timeout=args.timeout) as client:
            COMMANDS[args.command](args, client)
    except NNServeError as error:
        if _unreachable(error):
            print(
                f"nnserve-client: cannot reach a server at {args.target} ({error.details.splitlines()[0][:160]}); "
                f"start one (make serve), or point --target or ${TARGET_ENV} at it",
                file=sys.stderr,
            )
            return EXIT_UNREACHABLE
        print(f"nnserve-client: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, ValueError) as error:  # a file that cannot be read or written, a value the SDK refuses
        if args.debug:
            raise
        print(f"nnserve-client: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug, ours or the SDK's: one line unless asked for the traceback
        if args.debug:
            raise
        print(
            f"nnserve-client: unexpected error: {type(error).__name__}: {error} (--debug shows where)", file=sys.stderr
        )
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
