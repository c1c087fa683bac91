"""`nnserve-client`: every task from a terminal, tokens streamed as they come.

nnserve-client models
nnserve-client classify digits-cnn --image 7.png
nnserve-client generate chars-lstm --prompt "The " --max-tokens 80 --temperature 0.8 --seed 1
nnserve-client generate digits-gan --samples 4 --label 3 --out samples/
nnserve-client encode sentence-minilm --text "a cat" "a kitten" --normalize
nnserve-client segment shapes-unet --image shapes.png --out mask.png
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .client import Client
from .errors import NNServeError
from .types import GeneratedImage, GenerationDone, TextPiece


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnserve-client", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--target", default="127.0.0.1:8001", help="server address (default 127.0.0.1:8001)")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per call, in seconds")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", help="list the models and what they do")

    classify = commands.add_parser("classify", help="top-k labels for images or texts")
    classify.add_argument("model")
    inputs = classify.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", nargs="+", type=Path, help="PNG or JPEG files")
    inputs.add_argument("--text", nargs="+")
    classify.add_argument("--top-k", type=int, default=3)

    generate = commands.add_parser("generate", help="stream text from a language model, or draw images")
    generate.add_argument("model")
    generate.add_argument("--prompt", default="")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=0.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", nargs="*", default=[], help="stop strings; backslash escapes work (\\n)")
    generate.add_argument("--samples", type=int, default=0, help="images to draw (image generators)")
    generate.add_argument("--label", type=int, help="class to draw (conditional generators)")
    generate.add_argument("--out", type=Path, default=Path("."), help="folder for generated images")

    encode = commands.add_parser("encode", help="vectors for texts or images")
    encode.add_argument("model")
    encoded = encode.add_mutually_exclusive_group(required=True)
    encoded.add_argument("--image", nargs="+", type=Path)
    encoded.add_argument("--text", nargs="+")
    encode.add_argument("--normalize", action="store_true", help="scale each vector to unit length")
    encode.add_argument(
        "--json", action="store_true", help="print the full vectors as JSON (default: shape, norms, similarities)"
    )

    segment = commands.add_parser("segment", help="a per-pixel class mask for an image")
    segment.add_argument("model")
    segment.add_argument("--image", type=Path, required=True)
    segment.add_argument("--out", type=Path, help="write the mask as a PNG here")
    return parser


def _run(args: argparse.Namespace, client: Client) -> None:
    if args.command == "models":
        for m in client.models():
            quality = ", ".join(f"{k} {v:.4g}" for k, v in m.quality.items())
            print(f"{m.name:<20} v{m.version:<3} {m.task or 'kserve-only':<9} {m.family:<12} {quality}")
    elif args.command == "classify":
        results = client.classify(args.model, images=args.image, texts=args.text, top_k=args.top_k)
        names = args.image or args.text
        for name, ranked in zip(names, results, strict=True):
            print(f"{name}: " + ", ".join(f"{s.label} {s.probability:.4f}" for s in ranked.top))
    elif args.command == "generate":
        _generate(args, client)
    elif args.command == "encode":
        embeddings = client.encode(args.model, images=args.image, texts=args.text, normalize=args.normalize)
        vectors = embeddings.vectors
        if args.json:
            print(json.dumps({"shape": list(vectors.shape), "vectors": np.round(vectors, 5).tolist()}))
        else:
            print(_describe_vectors([str(n) for n in args.image or args.text], vectors))
    else:
        segmentation = client.segment(args.model, args.image, png=args.out is not None)
        if args.out is not None and segmentation.png is not None:
            args.out.write_bytes(segmentation.png)
        height, width = segmentation.mask.shape
        print(f"{width}x{height} pixels: {segmentation.pixel_counts}")


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


def _generate(args: argparse.Namespace, client: Client) -> None:
    options = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    if args.prompt:
        stops = [codecs.decode(s, "unicode_escape") for s in args.stop]  # "\n" typed in a shell is a newline
        options |= {"prompt": args.prompt, "max_tokens": args.max_tokens, "stop": stops}
        sys.stdout.write(args.prompt)
    else:
        options = {"num_samples": args.samples or 1, "seed": args.seed, "label": args.label}
        args.out.mkdir(parents=True, exist_ok=True)
    for event in client.generate(args.model, **options):
        if isinstance(event, TextPiece):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, GeneratedImage) and event.png is not None:
            path = args.out / f"{args.model}-{event.index}{'-' + event.label if event.label else ''}.png"
            path.write_bytes(event.png)
            print(path)
        elif isinstance(event, GenerationDone) and args.prompt:
            print(f"\n[{event.finish_reason}: {event.generated_tokens} tokens]")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with Client(args.target, timeout=args.timeout) as client:
            _run(args, client)
    except NNServeError as error:
        print(f"nnserve-client: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
