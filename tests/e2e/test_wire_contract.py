"""Our KServe v2 protos match Triton's wire contract: same names, numbers and types."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_python, run_tritonclient

DUMP = Path(__file__).with_name("dump_descriptors.py")


def dump(side: str) -> dict[str, dict[str, object]]:
    done = run_python(DUMP, side) if side == "ours" else run_tritonclient(DUMP, side)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_every_field_we_define_matches_tritons() -> None:
    ours, theirs = dump("ours"), dump("triton")
    assert ours["rpcs"] == theirs["rpcs"]
    mismatches = []
    for message, fields in ours["messages"].items():
        assert message in theirs["messages"], f"Triton has no message {message}"
        for field, spec in fields.items():  # type: ignore[attr-defined]
            if theirs["messages"][message].get(field) != spec:  # type: ignore[index]
                mismatches.append(f"{message}.{field}: ours {spec}, Triton's {theirs['messages'][message].get(field)}")  # type: ignore[index]
    assert mismatches == []
    # The messages on the inference path carry every field Triton's do.
    for message in ("ModelInferRequest", "ModelInferResponse", "InferTensorContents", "ModelStatistics"):
        assert ours["messages"][message] == theirs["messages"][message]
    for enum, values in ours["enums"].items():
        assert values == theirs["enums"][enum]
