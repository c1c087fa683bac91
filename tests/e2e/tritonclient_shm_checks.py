"""Triton's own shared-memory workflow against an nnserve server; prints one JSON object of what it saw.

As in Triton's `simple_grpc_shm_client.py`: create POSIX shared-memory regions with
`tritonclient.utils.shared_memory`, register them, infer with `set_shared_memory` on the input and the
output, read the output from the region, unregister. Runs in tritonclient's own venv.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import triton_to_np_dtype


def main(target: str) -> dict[str, object]:
    client = triton.InferenceServerClient(url=target)
    client.unregister_system_shared_memory()  # as Triton's examples begin: no regions left from earlier runs
    x = (np.arange(3 * 64, dtype=np.float32).reshape(3, 64) % 17) / 16
    in_size, out_size = x.nbytes, 3 * 10 * 4
    seen: dict[str, object] = {"server_extensions": list(client.get_server_metadata(as_json=True)["extensions"])}

    inputs = shm.create_shared_memory_region("tc-input", "/nnserve_tc_input", in_size)
    outputs = shm.create_shared_memory_region("tc-output", "/nnserve_tc_output", out_size)
    try:
        shm.set_shared_memory_region(inputs, [x])
        client.register_system_shared_memory("tc-input", "/nnserve_tc_input", in_size)
        client.register_system_shared_memory("tc-output", "/nnserve_tc_output", out_size)
        status = client.get_system_shared_memory_status(as_json=True)
        seen["status"] = sorted(
            (r["name"], r["key"], int(r.get("byte_size", 0))) for r in status.get("regions", {}).values()
        )

        infer_input = triton.InferInput("input", [3, 64], "FP32")
        infer_input.set_shared_memory("tc-input", in_size)
        requested = triton.InferRequestedOutput("logits")
        requested.set_shared_memory("tc-output", out_size)
        result = client.infer("digits-fnn", [infer_input], outputs=[requested])
        output = result.get_output("logits")
        from_shm = shm.get_contents_as_numpy(outputs, triton_to_np_dtype(output.datatype), output.shape)

        plain_input = triton.InferInput("input", [3, 64], "FP32")
        plain_input.set_data_from_numpy(x)
        plain = client.infer("digits-fnn", [plain_input]).as_numpy("logits")
        seen["shape"] = list(output.shape)
        seen["shm_equals_plain"] = bool(np.allclose(from_shm, plain, rtol=1e-6))

        # A region registered twice, and an output region too small: errors the client can read.
        try:
            client.register_system_shared_memory("tc-input", "/nnserve_tc_input", in_size)
        except triton.InferenceServerException as error:
            seen["twice"] = [error.status(), error.message()]
        small = triton.InferRequestedOutput("logits")
        small.set_shared_memory("tc-output", 16)
        try:
            client.infer("digits-fnn", [infer_input], outputs=[small])
        except triton.InferenceServerException as error:
            seen["too_small"] = [error.status(), error.message()]

        client.unregister_system_shared_memory("tc-input")
        seen["after_unregister"] = sorted(client.get_system_shared_memory_status(as_json=True).get("regions", {}))
        client.unregister_system_shared_memory()
    finally:
        shm.destroy_shared_memory_region(inputs)
        shm.destroy_shared_memory_region(outputs)
        client.close()
    return seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
