"""How the SDK's channel reaches one or several replicas: round-robin balancing and bounded retries.

gRPC keeps one HTTP/2 connection per address, so a client of a plain ClusterIP Service stays on one
pod. Given several `host:port` targets, or a `dns:///name` that resolves to several addresses (a
headless Service), the channel opens a connection to each address and sends calls round-robin.
A call that fails with UNAVAILABLE (a replica stopping or gone) or with a CANCELLED that the server
sent is retried on another replica, at most `retries` times, with exponential backoff; every RPC
nnserve offers is safe to repeat (inference has no side effects; loading a model twice loads it once).

Why CANCELLED: when a gRPC server shuts down, calls that reached it but that no handler had taken yet
end with CANCELLED ("CANCELLED"), not UNAVAILABLE (grpc core, grpc/grpc#41785). A replica that stops
mid-load thus fails about one call in four test runs unless that status is retried too. A call the
caller cancels itself is never retried: gRPC retries only statuses that come from the server.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from typing import Any

SERVICES = ("inference.GRPCInferenceService", "nnserve.v1.Tasks")


def service_config(retries: int) -> str:
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries > 0:
        config["methodConfig"] = [
            {
                "name": [{"service": service} for service in SERVICES],
                "retryPolicy": {
                    "maxAttempts": min(retries + 1, 5),  # gRPC caps attempts at 5
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ]
    return json.dumps(config)


def channel_target(target: str | Sequence[str]) -> str:
    """One gRPC target for one or several `host:port` addresses (or a `scheme:` target as it is)."""
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise ValueError("give at least one target (host:port, or dns:///name:port)")
    if len(targets) == 1:
        return targets[0]
    if any(":///" in t or t.startswith(("ipv4:", "ipv6:", "unix:")) for t in targets):
        raise ValueError("several targets must each be host:port; for a DNS name use one dns:/// target")
    addresses = [address for t in targets for address in _resolve(t)]
    if all(":" not in host for host, _ in addresses):
        return "ipv4:" + ",".join(f"{host}:{port}" for host, port in addresses)
    return "ipv6:" + ",".join(f"[{_as_ipv6(host)}]:{port}" for host, port in addresses)


def channel_authority(target: str | Sequence[str]) -> str | None:
    """The :authority for a channel over several addresses: the first one. Left to gRPC, it is the whole
    list ("10.0.0.1:8001,10.0.0.2:8001"), which no HTTP/2 server need accept: a comma is not allowed in
    an authority, and servers built on Rust's h2 (nnserve's native transport) reset every such call with
    PROTOCOL_ERROR. None for one target (gRPC's own default)."""
    if isinstance(target, str) or len(target) < 2:
        return None
    host, port = _resolve(target[0])[0]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolve(target: str) -> list[tuple[str, int]]:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"target {target!r} is not host:port")
    try:
        ipaddress.ip_address(host)
        return [(host, int(port))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    return sorted({(str(info[4][0]), int(port)) for info in infos})


def _as_ipv6(host: str) -> str:
    return host if ":" in host else f"::ffff:{host}"
