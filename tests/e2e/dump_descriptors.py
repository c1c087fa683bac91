"""Prints the `inference` package's messages and RPCs as JSON, from our stubs or from tritonclient's.

One process per side: both define `package inference` and cannot share a descriptor pool.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def describe(message: Any, prefix: str = "") -> dict[str, dict[str, list[object]]]:
    out = {}
    name = prefix + message.name
    out[name] = {
        f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else ""]
        for f in message.fields
    }
    for nested in message.nested_types:
        out.update(describe(nested, name + "."))
    return out


def main(side: str) -> None:
    if side == "ours":
        from nnserve_contract.stubs import grpc_predict_v2_pb2 as service
        from nnserve_contract.stubs import model_config_pb2 as config
    else:
        from tritonclient.grpc import model_config_pb2 as config
        from tritonclient.grpc import service_pb2 as service
    messages: dict[str, dict[str, list[object]]] = {}
    for module in (service, config):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            messages.update(describe(message))
    rpcs = {
        m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
        for m in service.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    }
    enums = {e.name: {v.name: v.number for v in e.values} for e in config.DESCRIPTOR.enum_types_by_name.values()}
    print(json.dumps({"messages": messages, "rpcs": rpcs, "enums": enums}))


if __name__ == "__main__":
    main(sys.argv[1])
