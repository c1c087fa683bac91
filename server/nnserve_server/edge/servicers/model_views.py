"""What KServe v2 says about a served model beyond its metadata: its configuration (Triton's ModelConfig,
as the model_configuration extension and perf_analyzer read it) and its statistics."""

from __future__ import annotations

from typing import Any

from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import model_config_pb2 as config_pb
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.serving_config import GENERATION_MAX_BATCH_KEY, GENERATION_MAX_STREAMS_KEY, INTRA_OP_KEY
from nnserve_server.core.stats import Duration
from nnserve_server.edge.servicers import streaming

PLATFORM = "onnxruntime_onnx"


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(model: OnnxModel) -> pb.ModelStatistics:
    s = model.stats
    return pb.ModelStatistics(
        name=model.name,
        version=model.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.by_batch_size.items())
        ],
    )


def model_config(model: OnnxModel) -> config_pb.ModelConfig:
    config = config_pb.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="onnxruntime",
        instance_group=[
            config_pb.ModelInstanceGroup(count=model.instances, kind=config_pb.ModelInstanceGroup.KIND_CPU)
        ],
        parameters={INTRA_OP_KEY: config_pb.ModelParameter(string_value=str(model.config.intra_op_threads))},
    )
    for key, value in (
        (GENERATION_MAX_BATCH_KEY, model.config.generation_max_batch),
        (GENERATION_MAX_STREAMS_KEY, model.config.generation_max_streams),
    ):
        if value:  # set in the model's config.pbtxt (else the server's flags hold)
            config.parameters[key].string_value = str(value)
    if streaming.is_text_lm(model):  # as Triton describes its LLM models: text in, text out, streamed responses
        for name, datatype, shape in streaming.LLM_INPUTS:
            config.input.add(name=name, data_type=_config_type(datatype), dims=shape, optional=name != "text_input")
        for name, datatype, shape in streaming.LLM_OUTPUTS:
            config.output.add(name=name, data_type=_config_type(datatype), dims=shape)
        config.model_transaction_policy.decoupled = True
        return config
    skip = 1 if model.max_batch_size else 0  # Triton states dims without the batch dimension
    config.max_batch_size = model.max_batch_size
    for s in model.inputs.values():
        config.input.add(name=s.name, data_type=_config_type(s.datatype), dims=s.shape[skip:])
    for s in model.outputs.values():
        config.output.add(name=s.name, data_type=_config_type(s.datatype), dims=s.shape[skip:])
    if model.batcher.policy.max_batch_size:
        config.dynamic_batching.max_queue_delay_microseconds = model.config.max_queue_delay_us
        config.dynamic_batching.default_queue_policy.max_queue_size = model.config.max_queue_size
    return config


def _config_type(datatype: str) -> Any:
    return config_pb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")
