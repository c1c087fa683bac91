"""`nnserve serve [flags]`: build the settings once and run the server. `nnserve health`: probe one.
`nnserve check [flags]`: load every model of the repository as `serve` would, say each one's state, and
exit 1 unless every one is ready (an image build runs it as the serving user).

`health` runs as a container's health check every few seconds, so it imports only grpc and the health
stubs: the server's modules (onnxruntime, numpy, prometheus) cost a probe 0.4-0.5 s and wrote onnxruntime's
warnings on a read-only root.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["health"]:
        from nnserve_server.edge.healthcheck import main as health_main

        return health_main(args[1:])
    return _serve(args)


def _serve(args: list[str]) -> int:
    import logging

    from nnserve_server.core import logs
    from nnserve_server.core.errors import StartupError
    from nnserve_server.edge.app import serve
    from nnserve_server.process import allocator, event_loop
    from nnserve_server.process.workers import supervise
    from nnserve_server.settings import Settings, build_parser

    if not args or args[0] in ("-h", "--help"):
        print(
            "usage: nnserve serve [flags]\n       nnserve check [flags]\n"
            "       nnserve health [--target HOST:PORT] [--service NAME] [--token-file PATH]\n"
        )
        build_parser().print_help()
        return 0 if args else 2
    if args[0] not in ("serve", "check"):
        print(
            f"nnserve: unknown command {args[0]!r}; try: nnserve serve --help, nnserve check or nnserve health",
            file=sys.stderr,
        )
        return 2
    try:
        settings = Settings.load(args[1:])
    except ValueError as error:
        print(f"nnserve: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if args[0] == "check":
        import asyncio

        from nnserve_server.edge.app import check_repository

        try:
            return 0 if asyncio.run(check_repository(settings)) else 1
        except StartupError as error:
            logging.getLogger("nnserve").error("cannot check: %s", error)
            return 1
    allocator.retain_freed_memory(settings.allocator_retain_mb << 20)
    try:
        if settings.workers > 1:
            return supervise(settings, args[1:])
        event_loop.run(serve(settings), event_loop.chosen(settings.event_loop))
    except StartupError as error:
        logging.getLogger("nnserve").error("cannot start: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
