"""The server's one settings object: defaults, then `NNSERVE_*` environment variables, then flags.

Each field declares its help text once; the command line flags (`--model-repository`) and the
environment variables (`NNSERVE_MODEL_REPOSITORY`) are derived from the field names, so they cannot
drift apart. Built once in `main()` and passed down; nothing reads the environment elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "NNSERVE_"
# The values a setting with choices takes: declared here once; the flags, the checks and the code that acts
# on them (edge/transport.py, process/event_loop.py, core/logs.py) take them from here.
EVENT_LOOPS = ("auto", "asyncio", "uvloop")
TRANSPORTS = ("auto", "native", "grpcio")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class VersionPolicy:
    """Which of the versions on disk are served: all, the latest N, or named ones (Triton's policies)."""

    latest: int = 0
    specific: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, value = text.partition(":")
        if kind == "all" and not value:
            return cls()
        if kind == "latest" and value.isdigit() and int(value) > 0:
            return cls(latest=int(value))
        names = tuple(v.strip() for v in value.split(",") if v.strip())
        if kind == "specific" and names:
            return cls(specific=names)
        raise ValueError(f"version policy {text!r}: use all, latest:N or specific:V1,V2")

    def choose(self, versions: list[str]) -> list[str]:
        """`versions` in ascending order; returns the ones to serve, in the same order."""
        if self.latest:
            return versions[-self.latest :]
        if self.specific:
            return [v for v in versions if v in self.specific]
        return versions


def _setting(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A field: its default and help, and the values it may take (any case; kept as spelled here)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Settings:
    model_repository: Path = _setting(Path("models"), "model repository: <dir>/<model>/<version>/model.onnx")
    poll_interval_s: float = _setting(
        0.0, "seconds between scans of the repository for new, changed or removed versions; 0: never"
    )
    version_policy: str = _setting("all", "versions served of each model: all, latest:N or specific:V1,V2")
    host: str = _setting("127.0.0.1", "address the gRPC server binds")
    port: int = _setting(8001, "gRPC port; 0 picks a free one (printed at start)")
    metrics_host: str = _setting("127.0.0.1", "address of the Prometheus metrics endpoint")
    metrics_port: int = _setting(8002, "metrics port; 0 picks a free one, -1 turns the endpoint off")
    providers: tuple[str, ...] = _setting(
        ("cpu",), "onnxruntime execution providers in order of preference, e.g. cuda,cpu"
    )
    allow_provider_fallback: bool = _setting(
        False, "start even when a requested provider is missing (logged and counted); else refuse to start"
    )
    cpus: int = _setting(
        0, "CPUs to size threads and instances for; 0: the container's CPU quota (cgroup), else the CPUs it may use"
    )
    intra_op_threads: int = _setting(
        0, "onnxruntime threads per run; 0 sizes them from the CPU quota (quota / instances)"
    )
    instances: int = _setting(0, "concurrent onnxruntime runs per model; 0: two (one on a single CPU)")
    max_batch_size: int = _setting(
        256, "largest batch a request, or a dynamic batch, may carry (models with a batch dimension)"
    )
    dynamic_batching: bool = _setting(True, "combine concurrent requests to a model into one onnxruntime run")
    max_queue_delay_us: int = _setting(
        0, "how long a request may wait for others to join its batch; 0: run what is queued when free"
    )
    max_queue_size: int = _setting(1024, "requests that may wait per model; beyond it RESOURCE_EXHAUSTED at once")
    max_in_flight: int = _setting(
        4096, "requests the whole server answers at once; beyond it RESOURCE_EXHAUSTED at once (0: no limit)"
    )
    max_stream_requests: int = _setting(
        256, "requests of one ModelStreamInfer stream in flight at once; beyond it RESOURCE_EXHAUSTED on the stream"
    )
    inline_run_us: int = _setting(
        200, "a model whose runs average under this runs on the event loop thread (cheaper than a thread hop); 0: never"
    )
    workers: int = _setting(1, "server processes sharing the port (SO_REUSEPORT), each with its own sessions")
    allocator_retain_mb: int = _setting(
        64,
        "MiB of freed memory glibc keeps for reuse instead of unmapping it (0: its own default); fresh pages "
        "cost a page fault each",
    )
    event_loop: str = _setting(
        "auto", "asyncio, uvloop (faster per call; a server dependency), or auto: uvloop when installed", EVENT_LOOPS
    )
    transport: str = _setting(
        "auto",
        "the gRPC server: native (pygrpc-native: HTTP/2 in Rust, outside the GIL), grpcio (grpc.aio: TLS and "
        "connection age), or auto: native unless TLS or a connection age is set",
        TRANSPORTS,
    )
    native_io_threads: int = _setting(
        0, "threads of the native transport's HTTP/2 front end; 0: one per two CPUs the server may use (--cpus)"
    )
    reuse_port: bool = _setting(False, "bind the gRPC port with SO_REUSEPORT, so other servers may share it")
    max_connection_age_s: float = _setting(
        0.0, "close each client connection after this long, so clients reconnect and spread over new replicas; 0: never"
    )
    max_connection_age_grace_s: float = _setting(10.0, "time calls in flight get when a connection reaches its age")
    max_message_bytes: int = _setting(64 * 1024 * 1024, "largest gRPC message accepted or sent, in bytes")
    max_concurrent_streams: int = _setting(
        1024,
        "HTTP/2 streams one connection may have open at once; bounds what a client that opens and resets "
        "streams (rapid reset) costs",
    )
    request_compression: bool = _setting(
        False,
        "accept gzip/deflate-compressed requests (grpcio inflates a message in full before it checks the size "
        "limit); off: they are refused UNIMPLEMENTED before inflating (the grpcio transport)",
    )
    max_image_pixels: int = _setting(4096 * 4096, "largest image (width x height) the task API decodes")
    max_request_pixels: int = _setting(
        4096 * 4096, "pixels all images of one task request may hold together (read from their headers first)"
    )
    max_segment_pixels: int = _setting(
        2048 * 1024,
        "largest image (width x height) Segment takes: a U-Net's activations grow with its pixels (the zoo's "
        "peaked at about 1.1 GB for 2048x2048)",
    )
    max_text_chars: int = _setting(
        2048, "longest text (prompt or input) the task API accepts; a prompt's attention grows with its square"
    )
    max_tokens: int = _setting(2048, "ceiling on the tokens one Generate call may ask for")
    max_samples: int = _setting(256, "ceiling on the images one Generate call may ask for")
    step_batching: bool = _setting(
        True, "run the decoding steps of a language model's concurrent text generations as one onnxruntime call"
    )
    generation_max_batch: int = _setting(
        64, "text generations whose decoding steps share one onnxruntime call (per model: generation_max_batch)"
    )
    generation_max_streams: int = _setting(
        256,
        "text generations one model runs at once; beyond it RESOURCE_EXHAUSTED at once (per model: "
        "generation_max_streams)",
    )
    generation_max_streams_per_client: int = _setting(
        64,
        "text generations one client (its token's label, else its IP address) runs at once per model; beyond it "
        "RESOURCE_EXHAUSTED, so no client takes every slot; 0: no share",
    )
    stream_stall_timeout_s: float = _setting(
        30.0,
        "a server stream (Generate) whose client takes no message for this long is ended RESOURCE_EXHAUSTED and "
        "its slot freed; 0: never",
    )
    generation_memory_mb: float = _setting(
        1024.0, "MiB all text generations' caches and states may take together; beyond it RESOURCE_EXHAUSTED"
    )
    strict_readiness: bool = _setting(
        False,
        "the server's health, inference.GRPCInferenceService's and ServerReady say SERVING only while every model "
        "of the repository is ready (Triton's name; liveness is apart); off: once started, whatever loaded",
    )
    grace_period_s: float = _setting(10.0, "seconds in-flight requests get to finish on SIGTERM or SIGINT")
    reflection: bool = _setting(True, "serve gRPC server reflection")
    repository_control: bool = _setting(
        True, "allow RepositoryModelLoad and RepositoryModelUnload (off: they answer UNIMPLEMENTED)"
    )
    tls_cert_file: str = _setting("", "PEM certificate chain of the server; set with --tls-key-file, gRPC uses TLS")
    tls_key_file: str = _setting("", "PEM private key of the server certificate")
    tls_client_ca_file: str = _setting(
        "", "PEM CA bundle; set, every client must present a certificate it signed (mutual TLS)"
    )
    auth_token_file: str = _setting(
        "", "file holding a token; set, every RPC but health checks needs 'authorization: Bearer <token>'"
    )
    access_file: str = _setting(
        "",
        "TOML file of [[token]] tables (label, token, models patterns, groups among inference, metadata, "
        "repository, shared_memory); set, every RPC but health checks needs one of its tokens, within its grant",
    )
    shared_memory: bool = _setting(
        False,
        "serve the system shared-memory extension to clients on this host, for the objects --shared-memory-keys "
        "names (a caller reads and writes those objects of the server's user); off with --workers above 1",
    )
    shared_memory_keys: str = _setting(
        "",
        "comma-separated patterns (fnmatch, without the leading '/') of the POSIX shared-memory objects a caller may "
        "register, e.g. 'nnserve_*'; --shared-memory needs them",
    )
    shared_memory_max_mb: int = _setting(1024, "MiB all registered shared-memory regions may span together")
    shared_memory_with_auth: bool = _setting(
        False, "serve shared memory on a server with an auth token (any caller may then map the allowed objects)"
    )
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR", LOG_LEVELS)
    log_format: str = _setting(
        "text", "text (for terminals) or json (one object per line, for log collectors)", LOG_FORMATS
    )
    access_log_sample: float = _setting(
        0.0, "fraction of successful requests written to the access log (logger nnserve.access); 0: none, 1: all"
    )
    access_log_failures: bool = _setting(True, "write every failed request to the access log")
    tracing: bool = _setting(
        False, "export OpenTelemetry traces over OTLP (OTEL_EXPORTER_OTLP_* variables); needs nnserve-server[otel]"
    )

    @functools.cached_property
    def versions(self) -> VersionPolicy:
        """--version-policy, parsed: once, when the settings are checked."""
        return VersionPolicy.parse(self.version_policy)

    def __post_init__(self) -> None:
        problems = self._choose()
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in 0..65535")
        if not -1 <= self.metrics_port <= 65535:
            problems.append(f"metrics port {self.metrics_port} is not in -1..65535")
        try:
            self.versions  # noqa: B018  (parsed once, here, and kept)
        except ValueError as error:
            problems.append(str(error))
        if self.poll_interval_s < 0:
            problems.append("poll interval must be >= 0")
        if self.cpus < 0:
            problems.append("cpus must be >= 0")
        if self.intra_op_threads < 0:
            problems.append("intra-op threads must be >= 0")
        for name in ("instances", "max_queue_delay_us", "inline_run_us"):
            if getattr(self, name) < 0:
                problems.append(f"{name.replace('_', ' ')} must be >= 0")
        if not 0 <= self.native_io_threads <= 64:
            problems.append(f"native io threads is {self.native_io_threads}; use 0..64")
        if self.max_in_flight < 0:
            problems.append("max in flight must be >= 0")
        if not 1 <= self.max_concurrent_streams <= 1 << 20:
            problems.append(f"max concurrent streams is {self.max_concurrent_streams}; use 1..1048576")
        if self.max_stream_requests < 1:
            problems.append("max stream requests must be >= 1")
        if self.max_queue_size < 1:
            problems.append("max queue size must be >= 1")
        if not 1 <= self.workers <= 64:
            problems.append(f"workers is {self.workers}; use 1..64")
        if self.max_batch_size < 1:
            problems.append("max batch size must be >= 1")
        if self.max_message_bytes < 1024:
            problems.append("max message bytes must be >= 1024")
        for name in (
            "max_image_pixels", "max_request_pixels", "max_segment_pixels", "max_text_chars", "max_tokens",
            "max_samples", "generation_max_batch", "generation_max_streams",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', ' ')} must be >= 1")
        if self.access_file and self.auth_token_file:
            problems.append("set --auth-token-file (one token for everything) or --access-file (tokens with grants)")
        if self.shared_memory and not self.shared_memory_keys.strip():
            problems.append(
                "shared memory needs --shared-memory-keys: the patterns of the objects callers may register "
                "(e.g. 'nnserve_*'; '*' allows every object of this user)"
            )
        if self.shared_memory_max_mb < 1:
            problems.append("shared memory max must be >= 1 MiB")
        if self.allocator_retain_mb < 0:
            problems.append("allocator retain must be >= 0 MiB")
        if self.generation_max_streams_per_client < 0:
            problems.append("generation max streams per client must be >= 0")
        if self.stream_stall_timeout_s < 0:
            problems.append("the stream stall timeout must be >= 0 s")
        if not self.generation_memory_mb > 0:
            problems.append("generation memory must be > 0 MiB")
        if self.max_connection_age_s < 0 or self.max_connection_age_grace_s < 0:
            problems.append("connection ages must be >= 0")
        if self.grace_period_s < 0:
            problems.append("grace period must be >= 0")
        if not self.providers:
            problems.append("name at least one provider")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("give both --tls-cert-file and --tls-key-file, or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            problems.append("--tls-client-ca-file (mutual TLS) needs the server's --tls-cert-file and --tls-key-file")
        if not 0.0 <= self.access_log_sample <= 1.0:
            problems.append(f"access log sample {self.access_log_sample} is not in 0..1")
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    def _choose(self) -> list[str]:
        """Each setting with choices set to its choice as declared (`info` is INFO); what is none of them."""
        problems = []
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if not choices:
                continue
            value = getattr(self, f.name)
            chosen = next((c for c in choices if c.lower() == str(value).lower()), None)
            if chosen is None:
                problems.append(f"{f.name.replace('_', ' ')} {value!r} is not one of {', '.join(choices)}")
            else:
                object.__setattr__(self, f.name, chosen)  # frozen: set once, here, before anyone reads it
        return problems

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Defaults, overridden by `NNSERVE_*` variables, overridden by flags."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        flags = vars(build_parser().parse_args(argv))
        values.update({name: value for name, value in flags.items() if value is not None})
        return cls(**values)


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake in one line (what is wrong, and where the help is), exit 2."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="nnserve serve",
        description=f"Serve a repository of ONNX models over gRPC. Every flag has an {ENV_PREFIX}* variable.",
        epilog="exit codes: 0 stopped cleanly (SIGTERM, SIGINT); 1 cannot start (a busy port, a missing "
        "repository or provider: one line says which); 2 a usage mistake (a flag or value)",
    )
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata['help']} (env {env}; default {_show(f.default)})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=functools.partial(_parse, f), default=None, help=help_text)
    return parser


def flags_table() -> str:
    """docs/configuration.md's table of flags, made from the fields so it cannot drift (a test compares)."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            flag += " / --no-" + f.name.replace("_", "-")
        rows.append(f"| `{flag}` | `{ENV_PREFIX}{f.name.upper()}` | `{_show(f.default)}` | {f.metadata['help']} |")
    return "\n".join(rows)


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{f.name}: {raw!r} is not a boolean (true/false)")
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "Path":
        return Path(raw)
    if kind.startswith("tuple"):
        return tuple(part.strip().lower() for part in raw.split(",") if part.strip())
    return raw
