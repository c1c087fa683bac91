"""The system shared-memory extension with our own stubs: regions of real POSIX shared-memory objects,
created here as a client beside the server would (`multiprocessing.shared_memory`, i.e. shm_open)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ECHO_TYPES, SHARED_MEMORY, RunningServer

from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc

PIXELS = (np.arange(2 * 64, dtype=np.float32).reshape(2, 64) % 17) / 16


@pytest.fixture
def stub(server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        yield stub
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())  # every region, for the next test


@pytest.fixture
def memory() -> Iterator[Callable[[int], shared_memory.SharedMemory]]:
    made: list[shared_memory.SharedMemory] = []

    def make(size: int) -> shared_memory.SharedMemory:
        made.append(shared_memory.SharedMemory(create=True, size=size))
        return made[-1]

    yield make
    for block in made:
        block.unlink()
        with contextlib.suppress(BufferError):  # a failed test's traceback may still hold a view of it
            block.close()


def register(stub: pb_grpc.GRPCInferenceServiceStub, name: str, key: str, byte_size: int, offset: int = 0) -> None:
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size), timeout=10
    )


def _in_region(tensor: object, region: str, byte_size: int, offset: int = 0) -> None:
    parameters = tensor.parameters  # type: ignore[attr-defined]
    parameters["shared_memory_region"].string_param = region
    parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        parameters["shared_memory_offset"].int64_param = offset


def fnn_request(
    region: str = "io", in_offset: int = 0, out_offset: int = 1024, out_size: int = 80
) -> pb.ModelInferRequest:
    """digits-fnn on PIXELS: input at `in_offset` of the region, logits written at `out_offset`."""
    request = pb.ModelInferRequest(model_name="digits-fnn", id="shm-1")
    _in_region(request.inputs.add(name="input", datatype="FP32", shape=[2, 64]), region, PIXELS.nbytes, in_offset)
    _in_region(request.outputs.add(name="logits"), region, 80, out_offset)
    return request


def plain_logits(stub: pb_grpc.GRPCInferenceServiceStub) -> np.ndarray:
    request = pb.ModelInferRequest(model_name="digits-fnn")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(PIXELS.tobytes())
    response = stub.ModelInfer(request, timeout=10)
    return codec.from_raw(response.raw_output_contents[0], "FP32", [2, 10])


def test_inputs_and_outputs_travel_through_a_registered_region(
    stub: pb_grpc.GRPCInferenceServiceStub, memory: Callable[[int], shared_memory.SharedMemory]
) -> None:
    block = memory(8192)
    block.buf[: PIXELS.nbytes] = PIXELS.tobytes()
    register(stub, "io", block.name, 4096)
    assert "system_shared_memory" in stub.ServerMetadata(pb.ServerMetadataRequest()).extensions

    status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="io")).regions["io"]
    assert (status.name, status.key, status.offset, status.byte_size) == ("io", block.name, 0, 4096)

    response = stub.ModelInfer(fnn_request(), timeout=10)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape), response.id) == ("logits", "FP32", [2, 10], "shm-1")
    assert list(response.raw_output_contents) == [b""]  # one entry per output, empty where shared memory holds it
    written = np.frombuffer(block.buf, np.float32, 20, offset=1024).reshape(2, 10)
    np.testing.assert_allclose(written, plain_logits(stub), rtol=1e-6)

    # A region may start inside the object (offsets then count from the region's start), and a request may
    # mix shared memory and raw contents: raw_input_contents then holds the inputs that are not in a region.
    block.buf[5000 + 16 : 5000 + 16 + PIXELS.nbytes] = PIXELS.tobytes()
    register(stub, "tail", block.name, 3000, offset=5000)
    response = stub.ModelInfer(fnn_request("tail", in_offset=16, out_offset=2000), timeout=10)
    np.testing.assert_allclose(np.frombuffer(block.buf, np.float32, 20, offset=7000).reshape(2, 10), written)
    fp32 = np.array([[0.5, -1.5, 2.0], [3.25, 0.0, -7.0]], np.float32)
    block.buf[3000 : 3000 + fp32.nbytes] = fp32.tobytes()
    mixed = pb.ModelInferRequest(model_name="echo")
    for datatype, (_, dtype) in ECHO_TYPES.items():
        tensor = mixed.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=[2, 3])
        if datatype == "FP32":
            _in_region(tensor, "io", fp32.nbytes, 3000)
        else:
            ones = np.full((2, 3), b"b" if datatype == "BYTES" else 1, dtype=object if datatype == "BYTES" else dtype)
            mixed.raw_input_contents.append(codec.to_raw(ones))
    for name in ("out_INT8", "out_FP32"):
        mixed.outputs.add(name=name)
    _in_region(mixed.outputs[1], "io", fp32.nbytes, 2048)
    echoed = stub.ModelInfer(mixed, timeout=10)
    assert [o.name for o in echoed.outputs] == ["out_INT8", "out_FP32"]
    assert (codec.from_raw(echoed.raw_output_contents[0], "INT8", [2, 3]) == 1).all()
    assert echoed.raw_output_contents[1] == b""
    np.testing.assert_array_equal(np.frombuffer(block.buf, np.float32, 6, offset=2048).reshape(2, 3), fp32)

    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="io"))
    left = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
    assert list(left) == ["tail"]


def _refused(stub: pb_grpc.GRPCInferenceServiceStub, call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("unknown name", grpc.StatusCode.NOT_FOUND, "no shared-memory region is registered as 'nope'"),
        ("input past the region", grpc.StatusCode.INVALID_ARGUMENT, "do not fit in shared-memory region 'io'"),
        ("negative offset", grpc.StatusCode.INVALID_ARGUMENT, "do not fit in shared-memory region 'io'"),
        ("size is not the tensor's", grpc.StatusCode.INVALID_ARGUMENT, "needs 512"),
        ("output region too small", grpc.StatusCode.INVALID_ARGUMENT, "output 'logits' needs 80 bytes"),
        ("no byte size", grpc.StatusCode.INVALID_ARGUMENT, "'shared_memory_byte_size' must be given"),
        ("offset without region", grpc.StatusCode.INVALID_ARGUMENT, "without 'shared_memory_region'"),
        ("region and contents", grpc.StatusCode.INVALID_ARGUMENT, "has contents too"),
        ("region and classification", grpc.StatusCode.INVALID_ARGUMENT, "pick one"),
        ("region as int", grpc.StatusCode.INVALID_ARGUMENT, "must be a string_param"),
    ],
)
def test_bad_requests_that_name_regions_are_refused_and_change_nothing(
    stub: pb_grpc.GRPCInferenceServiceStub,
    memory: Callable[[int], shared_memory.SharedMemory],
    case: str,
    code: grpc.StatusCode,
    message: str,
) -> None:
    block = memory(4096)
    block.buf[: PIXELS.nbytes] = PIXELS.tobytes()
    register(stub, "io", block.name, 2048)
    request = fnn_request()
    tensor, output = request.inputs[0], request.outputs[0]
    if case == "unknown name":
        tensor.parameters["shared_memory_region"].string_param = "nope"
    elif case == "input past the region":
        tensor.parameters["shared_memory_offset"].int64_param = 2000
    elif case == "negative offset":
        tensor.parameters["shared_memory_offset"].int64_param = -8
    elif case == "size is not the tensor's":
        tensor.parameters["shared_memory_byte_size"].int64_param = 256
    elif case == "output region too small":
        output.parameters["shared_memory_byte_size"].int64_param = 40
    elif case == "no byte size":
        del tensor.parameters["shared_memory_byte_size"]
    elif case == "offset without region":
        del tensor.parameters["shared_memory_region"]
        del tensor.parameters["shared_memory_byte_size"]
        request.raw_input_contents.append(PIXELS.tobytes())
        tensor.parameters["shared_memory_offset"].int64_param = 0
    elif case == "region and contents":
        tensor.contents.fp32_contents.extend(PIXELS.ravel().tolist())
    elif case == "region and classification":
        output.parameters["classification"].int64_param = 3
    elif case == "region as int":
        tensor.parameters["shared_memory_region"].int64_param = 1
    before = bytes(block.buf[1024:1104])
    error = _refused(stub, lambda: stub.ModelInfer(request, timeout=10))
    assert error.code() == code, error.details()
    assert message in str(error.details())
    if case != "output region too small":  # that one is found after the run, when the result's size is known
        assert bytes(block.buf[1024:1104]) == before
    # The region is still registered and whole, and the next request is answered.
    assert list(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions) == ["io"]
    stub.ModelInfer(fnn_request(), timeout=10)
    np.testing.assert_allclose(np.frombuffer(block.buf, np.float32, 20, offset=1024).reshape(2, 10), plain_logits(stub))


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("twice", grpc.StatusCode.ALREADY_EXISTS, "already registered"),
        ("no such object", grpc.StatusCode.INVALID_ARGUMENT, "no shared-memory object is named"),
        ("path as key", grpc.StatusCode.INVALID_ARGUMENT, "is not a POSIX shared-memory name"),
        ("dot-dot key", grpc.StatusCode.INVALID_ARGUMENT, "is not a POSIX shared-memory name"),
        ("past the object", grpc.StatusCode.INVALID_ARGUMENT, "runs past the end of the object"),
        ("offset past the object", grpc.StatusCode.INVALID_ARGUMENT, "runs past the end of the object"),
        ("zero size", grpc.StatusCode.INVALID_ARGUMENT, "needs a byte_size above 0"),
        ("no name", grpc.StatusCode.INVALID_ARGUMENT, "needs a name"),
        ("status of unknown", grpc.StatusCode.NOT_FOUND, "no shared-memory region is registered as 'other'"),
    ],
)
def test_bad_registrations_are_refused_and_change_nothing(
    stub: pb_grpc.GRPCInferenceServiceStub,
    memory: Callable[[int], shared_memory.SharedMemory],
    case: str,
    code: grpc.StatusCode,
    message: str,
) -> None:
    block = memory(4096)
    block.buf[: PIXELS.nbytes] = PIXELS.tobytes()
    register(stub, "io", block.name, 2048)
    calls: dict[str, Callable[[], object]] = {
        "twice": lambda: register(stub, "io", block.name, 2048),
        "no such object": lambda: register(stub, "other", "/nnserve_test_no_such_object", 64),
        "path as key": lambda: register(stub, "other", "/etc/passwd", 64),
        "dot-dot key": lambda: register(stub, "other", "..", 64),
        "past the object": lambda: register(stub, "other", block.name, 8192),
        "offset past the object": lambda: register(stub, "other", block.name, 16, offset=1 << 40),
        "zero size": lambda: register(stub, "other", block.name, 0),
        "no name": lambda: register(stub, "", block.name, 64),
        "status of unknown": lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="other")),
    }
    error = _refused(stub, calls[case])
    assert error.code() == code, error.details()
    assert message in str(error.details())
    assert list(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions) == ["io"]
    stub.ModelInfer(fnn_request(), timeout=10)  # and a good request follows
    # Unregistering a name that is not registered is no error (Triton's rule; clients clean up blindly).
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="never-registered"))


def test_a_region_unregistered_while_a_request_uses_it_serves_that_request_to_its_end(
    stub: pb_grpc.GRPCInferenceServiceStub, memory: Callable[[int], shared_memory.SharedMemory]
) -> None:
    rows = np.random.default_rng(3).standard_normal((256, 1024)).astype(np.float32)
    block = memory(2 * rows.nbytes)
    block.buf[: rows.nbytes] = rows.tobytes()
    register(stub, "slow-io", block.name, 2 * rows.nbytes)
    request = pb.ModelInferRequest(model_name="slow")
    _in_region(request.inputs.add(name="x", datatype="FP32", shape=list(rows.shape)), "slow-io", rows.nbytes)
    _in_region(request.outputs.add(name="y"), "slow-io", rows.nbytes, rows.nbytes)
    reference = stub.ModelInfer(request, timeout=60)  # first run, results in the second half
    expected = np.frombuffer(block.buf, np.float32, rows.size, offset=rows.nbytes).copy()
    block.buf[rows.nbytes :] = bytes(rows.nbytes)

    pending = [stub.ModelInfer.future(request, timeout=60) for _ in range(4)]  # about 0.1 s of runs each
    time.sleep(0.05)
    assert not all(p.done() for p in pending)  # so some are in flight (running or queued) at the unregister
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="slow-io"))
    assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
    for answer in pending:
        assert list(answer.result().raw_output_contents) == list(reference.raw_output_contents) == [b""]
    np.testing.assert_array_equal(np.frombuffer(block.buf, np.float32, rows.size, offset=rows.nbytes), expected)
    error = _refused(stub, lambda: stub.ModelInfer(request, timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    register(stub, "slow-io", block.name, 2 * rows.nbytes)  # the name is free again


def test_cuda_shared_memory_is_refused_with_a_reason(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    error = _refused(stub, lambda: stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest()))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CUDA shared memory" in str(error.details())


def test_shared_memory_is_off_unless_asked_for_and_off_under_auth_unless_allowed(
    own_server: Callable[..., RunningServer], memory: Callable[[int], shared_memory.SharedMemory], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    block = memory(4096)
    cases = [
        ((), False),
        ((*SHARED_MEMORY, "--auth-token-file", str(token_file)), False),
        ((*SHARED_MEMORY, "--auth-token-file", str(token_file), "--shared-memory-with-auth"), True),
    ]
    for flags, served in cases:
        running = own_server(*flags)
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            auth = (("authorization", "Bearer t0ken"),)
            extensions = stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=auth).extensions
            assert ("system_shared_memory" in extensions) is served, flags
            if served:
                register_request = pb.SystemSharedMemoryRegisterRequest(name="io", key=block.name, byte_size=64)
                stub.SystemSharedMemoryRegister(register_request, metadata=auth)
                continue
            status = pb.SystemSharedMemoryStatusRequest()
            error = _refused(stub, lambda: stub.SystemSharedMemoryStatus(status, metadata=auth))  # noqa: B023
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "--shared-memory" in str(error.details())
            infer = fnn_request()
            error = _refused(stub, lambda: stub.ModelInfer(infer, metadata=auth))  # noqa: B023
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED, flags
        running.stop()


def test_shared_memory_without_key_patterns_refuses_to_start(tmp_path: Path) -> None:
    from conftest import start_server

    with pytest.raises(RuntimeError, match="shared memory needs --shared-memory-keys"):
        start_server(tmp_path, "--shared-memory")


def test_only_allowed_objects_of_this_user_within_the_budget_are_mapped(
    stub: pb_grpc.GRPCInferenceServiceStub, memory: Callable[[int], shared_memory.SharedMemory]
) -> None:
    """Another program's shared memory stays its own: a key outside --shared-memory-keys, an object of another
    user, and a sparse object of 128 TiB (mapped, it would take the address space) are each refused with
    the reason, before anything is mapped."""
    other = Path("/dev/shm/other_program_state")
    other.write_bytes(b"secret" * 100)
    try:
        error = _refused(stub, lambda: register(stub, "steal", "/other_program_state", 600))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'/other_program_state' is not one this server maps" in str(error.details())
    finally:
        other.unlink()

    huge = Path("/dev/shm/nnserve_huge")
    with huge.open("wb") as file:
        file.truncate(128 << 40)  # sparse: no memory behind it
    try:
        error = _refused(stub, lambda: register(stub, "huge", "/nnserve_huge", 128 << 40))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--shared-memory-max-mb" in str(error.details())
        if os.geteuid() == 0:  # only root can give an object to another user
            os.chown(huge, 65534, 65534)
            error = _refused(stub, lambda: register(stub, "theirs", "/nnserve_huge", 64))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "belongs to uid 65534" in str(error.details())
    finally:
        huge.unlink()
    assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
