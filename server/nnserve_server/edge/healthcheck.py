"""`nnserve health`: ask a running server's grpc.health.v1 service, for container health checks.

Exit status 0 when the service answers SERVING, 1 for anything else (NOT_SERVING, unknown service,
no server listening, no answer within the timeout), with the answer on stdout. `--token-file` sends a
bearer token: the native transport with tokens checks them on health checks too (`edge/transport.py`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout_s: float = 3.0, token: str = "") -> tuple[bool, str]:
    """(serving?, what the server said) for one service name; "" is the whole server."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, metadata=metadata
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return (
                    False,
                    f"NOT_FOUND: the server has no health status named {service!r} (a model or gRPC service name)",
                )
            return False, f"{error.code().name}: {error.details() or 'no answer'}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str]) -> int:
    port = os.environ.get("NNSERVE_PORT", "8001")
    parser = argparse.ArgumentParser(prog="nnserve health", description=__doc__)
    parser.add_argument("--target", default=f"127.0.0.1:{port}", help="host:port (default 127.0.0.1:$NNSERVE_PORT)")
    parser.add_argument("--service", default="", help='a model or gRPC service name; "" (default): the server')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--token-file", default="", help="a file holding a bearer token to send")
    args = parser.parse_args(argv)
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else ""
    except OSError as error:
        print(f"cannot read the token file {args.token_file}: {error.strerror}")
        return 1
    serving, said = check(args.target, args.service, args.timeout, token)
    print(f"{args.target} {args.service or '(server)'}: {said}")
    return 0 if serving else 1
