"""The model card written beside each model the zoo installs: what it is, how good, and how to call it.

The call example is built from the model's own metadata, so it names the task API the model answers
and an input it takes; tests/e2e/test_model_cards.py runs every card's example against a server.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from nnserve_contract.model_spec import ModelSpec

from .api import Exported
from .family import Family

ADDRESS = "127.0.0.1:8001"  # `make serve`'s address; the test swaps in its server's


def quality_text(quality: Mapping[str, float]) -> str:
    # Six decimals near 1, where four would print a cosine of 0.99996 as 1.0000.
    return ", ".join(f"{k} {v:.6f}" if abs(1 - v) < 1e-3 else f"{k} {v:.4f}" for k, v in quality.items())


def call_example(name: str, spec: ModelSpec) -> str:
    """Python that calls `name` through the task API it answers, with an input it takes, and prints the answer."""
    pixels = f"np.zeros({tuple(spec.image_size)})"  # a blank image in natural units
    if spec.task == "classify":
        call = f"print(client.classify({name!r}, {pixels}, top_k=3))"
    elif spec.task == "generate" and spec.vocabulary:
        call = f"print(client.generate_text({name!r}, 'The ', max_tokens=40, temperature=0.8, seed=1))"
    elif spec.task == "generate":
        call = f"for event in client.generate({name!r}, num_samples=2, seed=1):\n    print(event)"
    elif spec.task == "encode" and spec.tokenizer:
        call = f"print(client.encode({name!r}, texts=['A sentence to embed.']).vectors.shape)"
    elif spec.task == "encode":
        call = f"print(client.encode({name!r}, {pixels}).vectors.shape)"
    else:
        call = f"print(client.segment({name!r}, {pixels}).pixel_counts)"
    return f"import numpy as np\nfrom nnserve_client import Client\n\nclient = Client({ADDRESS!r})\n{call}\n"


def write_card(family: Family, exported: Exported, quality: dict[str, float], fast: bool) -> None:
    spec = ModelSpec.from_props(
        {p.key: p.value for p in onnx.load(str(exported.path), load_external_data=False).metadata_props}
    )
    assert spec is not None, exported.path
    doc = (family.__doc__ or "").strip()
    example = call_example(exported.name, spec)
    (exported.path.parent.parent / "model_card.md").write_text(
        f"# {exported.name}\n\n{doc}\n\n"
        f"- family: {family.FAMILY}\n- task: {exported.task}\n"
        f"- held-out quality: {quality_text(quality)}{' (fast mode: tiny model, no bar)' if fast else ''}\n"
        f"- bar: {quality_text(family.QUALITY_BAR)}\n"
        f"- onnxruntime vs PyTorch, largest relative error: {exported.parity_error:.1e}\n\n"
        f"Call it (`pip install ./clients`, a server at {ADDRESS}):\n\n```python\n{example}```\n"
    )
