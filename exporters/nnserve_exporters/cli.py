"""`nnserve-export zoo --out models/`: build the default model repository."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import serving
from .zoo import FAMILIES, main_zoo


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="nnserve-export",
        description=__doc__,
        epilog="exit codes: 0 built (and served); 1 a model missed its bar, or --out exists without --force; "
        "2 a usage mistake",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    zoo = commands.add_parser("zoo", help="train, export and verify every family into a model repository")
    zoo.add_argument("--out", type=Path, default=Path("models"), help="model repository to create (default: models)")
    zoo.add_argument("--fast", action="store_true", help="tiny models in seconds, for tests (no quality bars)")
    zoo.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    zoo.add_argument(
        "--only",
        nargs="+",
        choices=sorted(FAMILIES),
        type=lambda name: name.replace("-", "_"),  # transformer-lm reads as the module's name, transformer_lm
        help="build only these families",
    )
    zoo.add_argument("--jobs", type=int, default=2, help="families trained at once, one thread each (default: 2)")
    zoo.add_argument(
        "--incremental",
        action="store_true",
        help="move each family into --out as soon as it meets its bar; keep the families already there",
    )
    serve = commands.add_parser("serve", help="serve a model repository, building the zoo into it first if needed")
    serve.add_argument("--repository", type=Path, default=Path("models"), help="the model repository (default: models)")
    serve.add_argument("--jobs", type=int, default=2, help="families trained at once (default: 2)")
    serve.add_argument("--fast", action="store_true", help="build the tiny zoo (tests)")
    serve.add_argument("server_flags", nargs=argparse.REMAINDER, help="after --: flags for nnserve serve")
    args = parser.parse_args(argv)
    if args.command == "serve":
        flags = args.server_flags[1:] if args.server_flags[:1] == ["--"] else args.server_flags
        return serving.serve(args.repository, flags, args.jobs, args.fast)
    return main_zoo(args.out, args.fast, args.only, args.force, args.jobs, args.incremental)


if __name__ == "__main__":
    sys.exit(main())
