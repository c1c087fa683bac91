"""`nnserve-export zoo --out models/`: build the default model repository."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .zoo import FAMILIES, main_zoo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnserve-export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    zoo = commands.add_parser("zoo", help="train, export and verify every family into a model repository")
    zoo.add_argument("--out", type=Path, default=Path("models"), help="model repository to create")
    zoo.add_argument("--fast", action="store_true", help="tiny models in seconds, for tests (no quality bars)")
    zoo.add_argument("--force", action="store_true", help="replace --out if it exists")
    zoo.add_argument("--only", nargs="+", choices=sorted(FAMILIES), help="build only these families")
    args = parser.parse_args(argv)
    return main_zoo(args.out, args.fast, args.only, args.force)


if __name__ == "__main__":
    sys.exit(main())
