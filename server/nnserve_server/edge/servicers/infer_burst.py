"""ModelInfer calls that reach Python together, answered together: one onnxruntime run per model and shape.

The native transport hands calls to Python in batches (a burst: whatever arrived while Python was busy).
For the ModelInfer calls of a burst this module does what the general path (a task per call, the guard's
wrapper, `KServeServicer.ModelInfer`) would do for plain requests of a shape already served (`plain`),
in one pass and without a task or a context per call:

- calls to one model with one plan are concatenated along the batch axis (up to the model's batch size)
  and run once (`OnnxModel.infer_together_now`): dynamic batching with no added delay, as Triton's
  dynamic batcher combines what is queued when an instance is free;
- each caller gets its own rows, answered with the plan's bytes, the server-timing trailer and its
  request id, counted in the metrics and the access log as the guard counts a call.

A call this lane does not answer (not plain, a shape not served yet, a model that is busy or does
not run inline, no token where one is needed, an error of any kind, tracing on) is returned to the
transport, which serves it through the general path: every refusal and error message stays there.

It runs on the transport's dispatch thread, beside the event loop's (the GIL between them), so it
touches only what tolerates that: dictionary reads (the repository, the plans), counters and
histograms (single-operation updates), an onnxruntime session (thread-safe; the run releases the GIL)
and the batcher's busy count, which makes the loop's requests queue while a run of this lane is on.
It awaits nothing and uses no asyncio.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.repository import ModelRepository
from nnserve_server.core.request_record import CURRENT, RequestRecord, request_id_from
from nnserve_server.edge.guard import StatusGuard
from nnserve_server.edge.security import BearerTokenAuth
from nnserve_server.edge.servicers import plain

log = logging.getLogger(__name__)

RPC = "ModelInfer"
# (call id, request bytes, (metadata, peer, seconds left or None)): a call as the native front hands it over.
Call = tuple[int, bytes, tuple[Any, str, float | None]]
# respond(call id, response bytes, trailing metadata)
Respond = Callable[[int, bytes, Sequence[tuple[str, str]]], object]


class _Item:
    __slots__ = ("call_id", "feed", "record", "request")

    def __init__(self, call_id: int, request: pb.ModelInferRequest, feed: dict[str, np.ndarray], record: RequestRecord):
        self.call_id = call_id
        self.request = request
        self.feed = feed
        self.record = record


class InferBurst:
    def __init__(
        self,
        repository: ModelRepository,
        guard: StatusGuard,
        auth: BearerTokenAuth | None,
        send_limit: int,
        shapes: plain.ShapeCache,
    ) -> None:
        self._repository = repository
        self._shapes = shapes  # the plans, shared with the general path (which makes them)
        self._guard = guard
        self._auth = auth  # None: no token needed
        self._send_limit = send_limit

    def __call__(self, calls: Sequence[Call], respond: Respond) -> set[int]:
        """Answer what it can of `calls`; returns the ids of those it answered."""
        if self._guard.traces:
            return set()  # a span per call: the general path's
        groups: dict[tuple[int, int], tuple[OnnxModel, plain.Plan, list[_Item]]] = {}
        for call_id, payload, (metadata, _peer, remaining) in calls:
            self._prepare(call_id, payload, metadata, remaining, groups)
        answered: set[int] = set()
        for model, plan, items in groups.values():
            if plan.rows and model.batcher.policy.max_batch_size:
                step = max(1, model.batcher.policy.max_batch_size // plan.rows)
            else:
                step = 1
            for start in range(0, len(items), step):
                self._run(model, plan, items[start : start + step], respond, answered)
        return answered

    def _prepare(
        self,
        call_id: int,
        payload: bytes,
        metadata: Any,
        remaining: float | None,
        groups: dict[tuple[int, int], tuple[OnnxModel, plain.Plan, list[_Item]]],
    ) -> None:
        """Decode one call and add it to its model's and plan's group, if this lane can answer it."""
        started = time.perf_counter_ns()
        if remaining is not None and remaining <= 0:
            return
        try:
            request = pb.ModelInferRequest.FromString(payload)
            grant = None if self._auth is None else self._auth.grant_of(metadata)
            if self._auth is not None and (grant is None or not grant.permits(RPC, request)):
                return  # the general path refuses it, saying why
            model = self._repository.get(request.model_name, request.model_version)
        except Exception:  # the general path says what is wrong
            return
        prepared = self._shapes.prepare(model, request)
        if prepared is None:
            return
        plan, feed = prepared
        record = RequestRecord(RPC, request_id_from(metadata), started)
        record.grant = grant
        item = _Item(call_id, request, feed, record)
        key = (id(model), id(plan))
        group = groups.get(key)
        if group is None:
            groups[key] = (model, plan, [item])
        else:
            group[2].append(item)

    def _run(
        self, model: OnnxModel, plan: plain.Plan, items: list[_Item], respond: Respond, answered: set[int]
    ) -> None:
        try:
            if len(items) == 1:
                item = items[0]
                CURRENT.set(item.record)
                arrays = model.infer_now(item.feed, plan.outputs, plan.rows)
                parts = None if arrays is None else [arrays]
            else:
                records = [item.record for item in items]
                parts = model.infer_together_now([item.feed for item in items], plan.outputs, plan.rows, records)
        except Exception as error:  # the general path runs them again, one by one, and reports the error
            log.debug("a burst of %d ModelInfer calls to %s failed (%s)", len(items), model.name, error)
            return
        finally:
            CURRENT.set(None)
        if parts is None:
            return  # the model would not run them now: its queue, through the general path
        for item, arrays in zip(items, parts, strict=True):
            data = plan.encode(model, item.request.id, arrays)
            if len(data) > self._send_limit:
                continue  # the general path refuses it with the limit in the message
            record = item.record
            record.code = "OK"
            respond(item.call_id, data, record.trailing_metadata(time.perf_counter_ns()))
            self._guard.answered(record, item.request)
            answered.add(item.call_id)
