"""KServe's ModelStreamInfer, and language models in Triton's LLM convention.

A stream carries many requests. Each is answered on the stream with its `id`, as it completes (so not
necessarily in order); a request that fails is answered with `error_message` (and its id) and the
stream goes on, as Triton does. At most --max-stream-requests requests of one stream are in flight;
one more is answered RESOURCE_EXHAUSTED on the stream at once. Each request also counts against the
server's --max-in-flight, in the metrics and in the access log like a call of its own. When the stream
ends early (the client cancels, or its deadline passes), the work it still has in flight is cancelled.

Language models (the zoo's LSTM, GRU and Transformer) also take Triton's LLM convention on ModelInfer
and ModelStreamInfer: input `text_input` (BYTES [1]), optional `max_tokens` (INT32 [1]), `stream`
(BOOL [1]) and the sampling settings (`temperature`, `top_k`, `top_p`, `seed`, `stop`) as inputs or
request parameters; output `text_output` (BYTES [1]). Streamed (on ModelStreamInfer with `stream`
true), each piece of text is a response of its own and the last one carries the parameter
`triton_final_response` = true, or, when the request sets `enable_empty_final_response`, an empty
response after the last piece does. Otherwise one response holds the whole text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_server.core import generation
from nnserve_server.core.errors import InvalidInput, Overloaded
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.sampling import DEFAULT_MAX_TOKENS, Sampling
from nnserve_server.core.tasks import Limits

TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"
FINAL = "triton_final_response"
EMPTY_FINAL = "enable_empty_final_response"
# What tritonclient's `async_stream_infer(..., enable_empty_final_response=True)` sends (Triton's name);
# `enable_empty_final_response` as a plain request parameter says the same.
TRITON_EMPTY_FINAL = "triton_enable_empty_final_response"
MAX_QUEUED_RESPONSES = 64  # answers of one stream waiting to be written (see `stream_infer`)
_SAMPLING = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}
_KNOWN_INPUTS = {TEXT_INPUT, "stream", "stop", *_SAMPLING}
_KNOWN_PARAMETERS = {*_SAMPLING, "stop", "stream", EMPTY_FINAL, TRITON_EMPTY_FINAL}


@dataclass(frozen=True)
class LlmRequest:
    prompt: str
    sampling: Sampling
    stream: bool
    empty_final: bool


# The LLM view of a text LM, as ModelMetadata and ModelConfig describe it: (name, datatype, shape);
# every input but text_input is optional (Triton's vLLM and TensorRT-LLM models describe the same).
LLM_INPUTS = (
    (TEXT_INPUT, "BYTES", [1]),
    ("stream", "BOOL", [1]),
    ("max_tokens", "INT32", [1]),
    ("temperature", "FP32", [1]),
    ("top_k", "INT32", [1]),
    ("top_p", "FP32", [1]),
    ("seed", "INT64", [1]),
    ("stop", "BYTES", [-1]),
)
LLM_OUTPUTS = ((TEXT_OUTPUT, "BYTES", [1]),)


def is_text_lm(model: OnnxModel) -> bool:
    """A language model that generates text: served in Triton's LLM convention besides its own tensors."""
    spec = model.spec
    return bool(spec is not None and spec.task == "generate" and spec.vocabulary and (spec.state or spec.cache))


def is_llm_request(model: OnnxModel, request: pb.ModelInferRequest) -> bool:
    """A language model asked in Triton's LLM convention (`text_input`), not with its own tensors."""
    return is_text_lm(model) and any(t.name == TEXT_INPUT for t in request.inputs[:])


def llm_request(inputs: Mapping[str, np.ndarray], parameters: Any) -> LlmRequest:
    """The prompt and sampling of an LLM-convention request (its inputs decoded as any request's, and its
    request parameters); every input and parameter is checked, and one this server does not know is
    refused (never ignored)."""
    values: dict[str, Any] = {}
    for name, array in inputs.items():
        if name not in _KNOWN_INPUTS:
            raise InvalidInput(f"input '{name}' is not one of {sorted(_KNOWN_INPUTS)} (Triton's LLM inputs)")
        flat = array.reshape(-1)
        if name == "stop":
            values["stop"] = tuple(_text(v, "stop") for v in flat)
            continue
        if flat.size != 1:
            raise InvalidInput(f"input '{name}' has {flat.size} elements; send one (shape [1])")
        values[name] = flat[0]
    for key, parameter in parameters.items():
        if key not in _KNOWN_PARAMETERS:
            if key in ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout"):
                raise InvalidInput(f"request parameter '{key}' is not supported by this server")
            raise InvalidInput(f"request parameter '{key}' is not one of {sorted(_KNOWN_PARAMETERS)}")
        choice = parameter.WhichOneof("parameter_choice")
        value = getattr(parameter, choice) if choice else None
        values[key] = tuple(str(value).split(",")) if key == "stop" and isinstance(value, str) else value
    if TEXT_INPUT not in values:
        raise InvalidInput(f"input '{TEXT_INPUT}' is missing")
    prompt = _text(values[TEXT_INPUT], TEXT_INPUT)
    if not prompt:
        raise InvalidInput(f"'{TEXT_INPUT}' is empty; give at least one character")
    converted: dict[str, Any] = {}
    for key, kind in _SAMPLING.items():
        if key in values:
            try:
                converted[key] = kind(values[key])
            except (TypeError, ValueError):
                raise InvalidInput(f"'{key}' is {values[key]!r}, not a number") from None
    if "max_tokens" in converted and converted["max_tokens"] < 1:
        raise InvalidInput(f"max_tokens is {converted['max_tokens']}; ask for at least 1")
    if converted.get("top_k", 0) < 0:
        raise InvalidInput(f"top_k is {converted['top_k']}; it must be >= 0 (0: all tokens)")
    sampling = Sampling(
        max_tokens=converted.get("max_tokens", DEFAULT_MAX_TOKENS),
        temperature=converted.get("temperature", 1.0),
        top_k=converted.get("top_k", 0),
        top_p=converted.get("top_p", 1.0),
        seed=converted.get("seed"),
        stop=tuple(values.get("stop", ())),
    )
    empty_final = bool(values.get(EMPTY_FINAL, False) or values.get(TRITON_EMPTY_FINAL, False))
    return LlmRequest(prompt, sampling, bool(values.get("stream", False)), empty_final)


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"'{name}' is not UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise InvalidInput(f"'{name}' must be sent as a BYTES tensor of UTF-8 text, not as numbers")


def _text_response(model: OnnxModel, request_id: str, text: str | None, final: bool) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request_id)
    if text is not None:
        response.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])
        response.raw_output_contents.append(codec.to_raw(np.array([text.encode()], dtype=object)))
    response.parameters[FINAL].bool_param = final
    return response


async def llm_responses(
    model: OnnxModel,
    request: pb.ModelInferRequest,
    asked: LlmRequest,
    streaming: bool,
    limits: Limits,
    generations: generation.Generations,
) -> AsyncIterator[pb.ModelInferResponse]:
    """The responses to one LLM-convention request: one per piece when streamed, else the whole text."""
    pieces = generations.text(model, asked.prompt, asked.sampling, limits=limits)
    if not (streaming and asked.stream):
        text = "".join([event.text async for event in pieces if isinstance(event, generation.TextPiece)])
        yield _text_response(model, request.id, text, final=True)
        return
    held: str | None = None  # each piece is sent once the next one exists, so the last can say it is final
    async for event in pieces:
        if isinstance(event, generation.TextPiece):
            if held is not None:
                yield _text_response(model, request.id, held, final=False)
            held = event.text
    if asked.empty_final:
        if held is not None:
            yield _text_response(model, request.id, held, final=False)
        yield _text_response(model, request.id, None, final=True)
    else:
        yield _text_response(model, request.id, held or "", final=True)


# One request of a stream, served: yields its responses; the guard counts and logs it.
Serve = Callable[[pb.ModelInferRequest], AsyncIterator[pb.ModelInferResponse]]
Account = Callable[[pb.ModelInferRequest, Callable[[], Awaitable[None]]], Awaitable[str | None]]


async def stream_infer(
    requests: AsyncIterator[pb.ModelInferRequest],
    serve: Serve,
    account: Account,
    limit: int,
    max_queued: int = MAX_QUEUED_RESPONSES,
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """Answer every request of a stream as it completes; see the module's docstring for the rules.

    At most `max_queued` answers wait to be written: when the client reads slower than the server
    answers, the requests' work waits at its next answer (a generation stops decoding a little ahead)
    and the stream stops reading requests, so a client that stops reading holds a bounded amount."""
    out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(max_queued)
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: pb.ModelInferRequest) -> None:
        async def work() -> None:
            async for response in serve(request):
                await out.put(pb.ModelStreamInferResponse(infer_response=response))

        error = await account(request, work)
        if error is not None:
            failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version)
            failed.id = request.id
            await out.put(pb.ModelStreamInferResponse(error_message=error, infer_response=failed))

    async def read() -> None:
        async for request in requests:
            if len(tasks) >= limit:
                refused = Overloaded(
                    f"this stream has {limit} requests in flight, its limit (--max-stream-requests); "
                    "wait for answers before sending more"
                )
                error = await account(request, _raise(refused))
                await out.put(pb.ModelStreamInferResponse(error_message=error or str(refused)))
                continue
            task = asyncio.create_task(one(request))
            tasks.add(task)
            task.add_done_callback(finished)
        await out.put(None)

    def finished(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not tasks and not out.full():
            out.put_nowait(None)  # wakes the writer to see whether the stream is done (a full queue wakes it anyway)

    reader = asyncio.create_task(read())
    try:
        while True:
            item = await out.get()
            if item is not None:
                yield item
            if reader.done() and not tasks and out.empty():
                reader.result()  # a broken request stream ends the call with its error
                return
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()


def _raise(error: Exception) -> Callable[[], Awaitable[None]]:
    async def fail() -> None:
        raise error

    return fail
