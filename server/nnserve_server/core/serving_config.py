"""Per-model serving knobs: the settings' defaults, overridden by a Triton-style `config.pbtxt`.

`<repository>/<model>/config.pbtxt` is protobuf text of `inference.ModelConfig`, the file Triton reads,
so a Triton repository of ONNX models keeps its tuning. The fields nnserve reads:

    max_batch_size: 32                       # rows per request and per dynamic batch; 0: no batch dimension
    dynamic_batching {                       # present: batching on; absent: off, as in Triton
      max_queue_delay_microseconds: 500
      default_queue_policy { max_queue_size: 64 }
    }
    instance_group [ { count: 2 } ]          # concurrent runs (summed over groups)
    parameters { key: "intra_op_thread_count" value { string_value: "1" } }   # Triton's onnxruntime key
    parameters { key: "generation_max_batch" value { string_value: "16" } }   # streams per decoding call
    parameters { key: "generation_max_streams" value { string_value: "64" } } # generations at once

`max_batch_size` follows Triton: N > 0 says the first dimension of every input and output is the batch
(each request up to N rows), 0 says there is none (shapes exactly as the graph declares them, requests
never combined). Left out, the graph decides as Triton's onnxruntime backend decides: a model batches
when every input and every output has a free first dimension (`session.batching`).

(The two generation keys are this model's --generation-max-batch and --generation-max-streams.) Any
other field is accepted and ignored: Triton's fields beyond these tune Triton's own backends, and a
Triton repository must still load. A `generation_*` key other than those two is refused, so a
misspelt knob of ours does not pass for a set one. A file that does not parse fails the model's
load, with the parser's message as the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from nnserve_contract.stubs import model_config_pb2 as config_pb
from nnserve_server.settings import Settings

CONFIG_FILE = "config.pbtxt"
INTRA_OP_KEY = "intra_op_thread_count"
GENERATION_MAX_BATCH_KEY = "generation_max_batch"
GENERATION_MAX_STREAMS_KEY = "generation_max_streams"
KNOWN_PARAMETERS = (INTRA_OP_KEY, GENERATION_MAX_BATCH_KEY, GENERATION_MAX_STREAMS_KEY)


class ConfigError(ValueError):
    """A model's config file is unreadable or asks for something impossible."""


@dataclass(frozen=True)
class ServingConfig:
    max_batch_size: int
    dynamic_batching: bool
    max_queue_delay_us: int
    max_queue_size: int
    instances: int
    intra_op_threads: int
    threads_chosen: bool = False  # set by settings or the file; else sized here, and a tiny model may use 1
    # Batching asked for in so many words (the file's dynamic_batching, or a queue delay); else the model
    # batches only where a load-time measurement says a batch costs less per row (`OnnxModel`).
    batching_chosen: bool = False
    # This model's own --generation-max-batch and --generation-max-streams; 0: the server's.
    generation_max_batch: int = 0
    generation_max_streams: int = 0
    # The file's max_batch_size, when it sets one: True (> 0, a batch dimension) or False (0: none). None:
    # the file does not say, and the graph decides.
    batch_dimension: bool | None = None


def serving_config(model_dir: Path, settings: Settings, cpus: int) -> ServingConfig:
    """The knobs for the model in `model_dir`: its config file over `settings`; `cpus` sizes the defaults."""
    # Like Triton's CPU default, two instances: under load two 1-thread runs beat one 2-thread run
    # (onnxruntime's intra-op scaling is far from linear); each gets half the CPUs.
    instances = settings.instances or min(2, cpus)
    threads = settings.intra_op_threads
    config = ServingConfig(
        max_batch_size=settings.max_batch_size,
        dynamic_batching=settings.dynamic_batching,
        max_queue_delay_us=settings.max_queue_delay_us,
        max_queue_size=settings.max_queue_size,
        instances=instances,
        intra_op_threads=threads or max(1, cpus // instances),
        threads_chosen=bool(threads),
        batching_chosen=settings.dynamic_batching and settings.max_queue_delay_us > 0,
    )
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return config
    try:
        parsed = text_format.Parse(path.read_text(), config_pb.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} does not parse as a ModelConfig: {error}") from None
    batching = parsed.HasField("dynamic_batching")
    queue = parsed.dynamic_batching.default_queue_policy
    count = sum(group.count for group in parsed.instance_group)
    if parsed.max_batch_size < 0 or count < 0:
        raise ConfigError(f"{path}: max_batch_size and instance counts must be >= 0")
    if count:
        instances = count
    unknown = sorted(k for k in parsed.parameters if k.startswith("generation_") and k not in KNOWN_PARAMETERS)
    if unknown:
        raise ConfigError(
            f"{path}: parameters {unknown} are not known here; this server reads {list(KNOWN_PARAMETERS)}"
        )
    file_threads = _whole(path, parsed, INTRA_OP_KEY)
    return ServingConfig(
        max_batch_size=parsed.max_batch_size or config.max_batch_size,
        batch_dimension=parsed.max_batch_size > 0 if parsed.HasField("max_batch_size") else None,
        dynamic_batching=batching,
        max_queue_delay_us=parsed.dynamic_batching.max_queue_delay_microseconds if batching else 0,
        max_queue_size=queue.max_queue_size or config.max_queue_size,
        instances=instances,
        intra_op_threads=file_threads or threads or max(1, cpus // instances),
        threads_chosen=bool(file_threads or threads),
        batching_chosen=batching,
        generation_max_batch=_whole(path, parsed, GENERATION_MAX_BATCH_KEY),
        generation_max_streams=_whole(path, parsed, GENERATION_MAX_STREAMS_KEY),
    )


def _whole(path: Path, parsed: config_pb.ModelConfig, key: str) -> int:
    """The parameter `key` as a whole number >= 1; 0 when the file does not set it."""
    raw = parsed.parameters[key].string_value if key in parsed.parameters else ""
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{path}: {key} is {raw!r}, not a whole number") from None
    if value < 1:
        raise ConfigError(f"{path}: {key} is {value}; it must be >= 1")
    return value
