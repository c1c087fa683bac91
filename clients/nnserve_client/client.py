"""`Client` (blocking) and `AsyncClient` (asyncio): the same calls, two transports.

Both build their requests and parse their responses through `_calls`; only the stub invocation
differs. Every call has a deadline (the client's default, or `timeout=` per call), and every gRPC
error surfaces as an `nnserve_client.errors` exception carrying the server's message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, Unpack

import grpc
import grpc.aio
import numpy as np

from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as kserve_grpc
from nnserve_contract.stubs import tasks_pb2_grpc as tasks_grpc

from . import _calls
from ._calls import GenerateOptions, SamplingOptions
from ._channel import channel_authority, channel_target, service_config
from .errors import from_rpc_error
from .types import (
    Classifications,
    Embeddings,
    GenerateEvent,
    InferResult,
    ModelInfo,
    Segmentation,
    ServerInfo,
    TextPiece,
)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_RETRIES = 3


def tls_credentials(
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: the CA to trust (None: the system's), and a client key pair for mutual TLS."""
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def _with_token(metadata: Sequence[tuple[str, str]], token: str | None) -> tuple[tuple[str, str], ...]:
    return (*metadata, ("authorization", f"Bearer {token}")) if token else tuple(metadata)


def _channel_options(max_message_bytes: int, retries: int) -> list[tuple[str, Any]]:
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.service_config", service_config(retries)),
        ("grpc.enable_retries", 1 if retries else 0),
    ]


def _open(transport: Any, target: str | Sequence[str], credentials: Any, options: list[tuple[str, Any]]) -> Any:
    """A channel from `transport` (grpc for Client, grpc.aio for AsyncClient)."""
    authority = channel_authority(target)
    if authority is not None:
        options = [*options, ("grpc.default_authority", authority)]
    if credentials is None:
        return transport.insecure_channel(channel_target(target), options=options)
    return transport.secure_channel(channel_target(target), credentials, options=options)


def _stubs(channel: Any) -> dict[str, Any]:
    return {"kserve": kserve_grpc.GRPCInferenceServiceStub(channel), "tasks": tasks_grpc.TasksStub(channel)}


class _Settings:
    def __init__(self, timeout: float, metadata: Sequence[tuple[str, str]]) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        self.metadata = tuple(metadata)

    def deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


class Client:
    """A blocking client for one nnserve (or any KServe v2) endpoint.

    >>> with Client("127.0.0.1:8001") as client:
    ...     client.classify("digits-fnn", digits)[0].label
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retries: int = DEFAULT_RETRIES,
        token: str | None = None,
    ) -> None:
        """`target`: host:port, several of them, or dns:///name:port (calls go round-robin over all
        addresses); `retries`: attempts on another replica after UNAVAILABLE or a server-sent CANCELLED (0: none);
        `token`: sent as `authorization: Bearer <token>` (servers started with --auth-token-file)."""
        self._settings = _Settings(timeout, _with_token(metadata, token))
        self._channel = _open(grpc, target, credentials, _channel_options(max_message_bytes, retries))
        self._stubs = _stubs(self._channel)

    def _invoke(self, call: _calls.Call[T], timeout: float | None) -> T:
        method = getattr(self._stubs[call.service], call.method)
        options = {"timeout": self._settings.deadline(timeout), "metadata": self._settings.metadata}
        try:
            if call.timed:
                response, rpc = method.with_call(call.request, **options)
                return call.result(response, rpc.trailing_metadata())
            response = method(call.request, **options)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return call.parse(response)

    def live(self, *, timeout: float | None = None) -> bool:
        """True when the server process is up (KServe ServerLive)."""
        return self._invoke(_calls.live(), timeout)

    def ready(self, *, timeout: float | None = None) -> bool:
        """True when the server takes traffic (KServe ServerReady: false while starting or draining)."""
        return self._invoke(_calls.ready(), timeout)

    def model_ready(self, model: str, *, version: str = "", timeout: float | None = None) -> bool:
        """True when `model` (the highest ready version, or `version`) can be called now."""
        return self._invoke(_calls.model_ready(model, version), timeout)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """The server's name, version and the KServe v2 extensions it serves."""
        return self._invoke(_calls.server_info(), timeout)

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server has, with its task, family, labels, what it takes and its quality."""
        return self._invoke(_calls.models(), timeout)

    def metadata(self, model: str, *, version: str = "", timeout: float | None = None) -> ModelInfo:
        """One model's description (NOT_FOUND with the server's list when there is none)."""
        return self._invoke(_calls.metadata(model, version), timeout)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Iterable[str] | None = None,
        version: str = "",
        timeout: float | None = None,
    ) -> InferResult:
        """Run the model on named input arrays; returns the named outputs (all, or those asked for)."""
        return self._invoke(_calls.infer(model, inputs, outputs, version), timeout)

    def classify(
        self,
        model: str,
        batch: np.ndarray | None = None,
        *,
        images: Any = None,
        texts: str | Sequence[str] | None = None,
        top_k: int = 5,
        version: str = "",
        timeout: float | None = None,
    ) -> Classifications:
        """Top-k labels for each item: a `batch` array in the model's natural units (digit pixels
        0..16), `images` (PNG/JPEG bytes, file paths or PIL images; one or a list) or `texts`."""
        return self._invoke(_calls.classify(model, batch, images, texts, top_k, version), timeout)

    def generate(
        self, model: str, *, version: str = "", timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> Iterator[GenerateEvent]:
        """Stream a generation: `TextPiece`s (prompt=..., max_tokens, temperature, top_k, top_p, seed,
        stop) or `GeneratedImage`s (num_samples=..., seed, latent, label, as_tensor), then one
        `GenerationDone`. Leaving the loop early cancels the work on the server."""
        call = _calls.generate(model, version, **options)
        stream = self._stubs["tasks"].Generate(
            call.request, timeout=self._settings.deadline(timeout), metadata=self._settings.metadata
        )
        try:
            for message in stream:
                yield call.parse(message)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            stream.cancel()

    def generate_text(self, model: str, prompt: str, **options: Unpack[SamplingOptions]) -> str:
        """The whole generated text at once (the options as for `generate`)."""
        events = self.generate(model, prompt=prompt, **options)
        return "".join(e.text for e in events if isinstance(e, TextPiece))

    def encode(
        self,
        model: str,
        batch: np.ndarray | None = None,
        *,
        images: Any = None,
        texts: str | Sequence[str] | None = None,
        normalize: bool = False,
        version: str = "",
        timeout: float | None = None,
    ) -> Embeddings:
        """Vectors for texts (sentence encoders) or images / a batch (VAE latents, CNN features)."""
        return self._invoke(_calls.encode(model, batch, images, texts, normalize, version), timeout)

    def segment(
        self, model: str, image: Any, *, png: bool = False, version: str = "", timeout: float | None = None
    ) -> Segmentation:
        """The class mask of one image (PNG/JPEG bytes, a path, a PIL image, or an array [h, w])."""
        return self._invoke(_calls.segment(model, image, png, version), timeout)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The same as `models` (the name the RPC has)."""
        return self.models(timeout=timeout)

    def close(self) -> None:
        """Close the channel; calls still in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of `Client`: the same methods, awaited."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retries: int = DEFAULT_RETRIES,
        token: str | None = None,
    ) -> None:
        """`target`: host:port, several of them, or dns:///name:port (calls go round-robin over all
        addresses); `retries`: attempts on another replica after UNAVAILABLE or a server-sent CANCELLED (0: none);
        `token`: sent as `authorization: Bearer <token>` (servers started with --auth-token-file)."""
        self._settings = _Settings(timeout, _with_token(metadata, token))
        self._channel = _open(grpc.aio, target, credentials, _channel_options(max_message_bytes, retries))
        self._stubs = _stubs(self._channel)

    async def _invoke(self, call: _calls.Call[T], timeout: float | None) -> T:
        method = getattr(self._stubs[call.service], call.method)
        try:
            rpc = method(call.request, timeout=self._settings.deadline(timeout), metadata=self._settings.metadata)
            response = await rpc
            if call.timed:
                return call.result(response, await rpc.trailing_metadata())
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return call.parse(response)

    async def live(self, *, timeout: float | None = None) -> bool:
        """True when the server process is up (KServe ServerLive)."""
        return await self._invoke(_calls.live(), timeout)

    async def ready(self, *, timeout: float | None = None) -> bool:
        """True when the server takes traffic (KServe ServerReady: false while starting or draining)."""
        return await self._invoke(_calls.ready(), timeout)

    async def model_ready(self, model: str, *, version: str = "", timeout: float | None = None) -> bool:
        """True when `model` (the highest ready version, or `version`) can be called now."""
        return await self._invoke(_calls.model_ready(model, version), timeout)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """The server's name, version and the KServe v2 extensions it serves."""
        return await self._invoke(_calls.server_info(), timeout)

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server has, with its task, family, labels, what it takes and its quality."""
        return await self._invoke(_calls.models(), timeout)

    async def metadata(self, model: str, *, version: str = "", timeout: float | None = None) -> ModelInfo:
        """One model's description (NOT_FOUND with the server's list when there is none)."""
        return await self._invoke(_calls.metadata(model, version), timeout)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Iterable[str] | None = None,
        version: str = "",
        timeout: float | None = None,
    ) -> InferResult:
        """As `Client.infer`, awaited."""
        return await self._invoke(_calls.infer(model, inputs, outputs, version), timeout)

    async def classify(
        self,
        model: str,
        batch: np.ndarray | None = None,
        *,
        images: Any = None,
        texts: str | Sequence[str] | None = None,
        top_k: int = 5,
        version: str = "",
        timeout: float | None = None,
    ) -> Classifications:
        """As `Client.classify`, awaited."""
        return await self._invoke(_calls.classify(model, batch, images, texts, top_k, version), timeout)

    async def generate(
        self, model: str, *, version: str = "", timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncIterator[GenerateEvent]:
        """As `Client.generate`, awaited: `async for event in client.generate(...)`."""
        call = _calls.generate(model, version, **options)
        stream = self._stubs["tasks"].Generate(
            call.request, timeout=self._settings.deadline(timeout), metadata=self._settings.metadata
        )
        try:
            async for message in stream:
                yield call.parse(message)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            stream.cancel()

    async def generate_text(self, model: str, prompt: str, **options: Unpack[SamplingOptions]) -> str:
        """The whole generated text at once."""
        pieces = [e.text async for e in self.generate(model, prompt=prompt, **options) if isinstance(e, TextPiece)]
        return "".join(pieces)

    async def encode(
        self,
        model: str,
        batch: np.ndarray | None = None,
        *,
        images: Any = None,
        texts: str | Sequence[str] | None = None,
        normalize: bool = False,
        version: str = "",
        timeout: float | None = None,
    ) -> Embeddings:
        """As `Client.encode`, awaited."""
        return await self._invoke(_calls.encode(model, batch, images, texts, normalize, version), timeout)

    async def segment(
        self, model: str, image: Any, *, png: bool = False, version: str = "", timeout: float | None = None
    ) -> Segmentation:
        """As `Client.segment`, awaited."""
        return await self._invoke(_calls.segment(model, image, png, version), timeout)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The same as `models` (the name the RPC has)."""
        return await self.models(timeout=timeout)

    async def close(self) -> None:
        """Close the channel; calls still in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
