"""Triton's classification extension: an output answered as its top-k classes instead of its values.

A requested output with the `classification` parameter (tritonclient's `class_count`) comes back as
a BYTES tensor of `"value:index"` strings, `"value:index:label"` where the model has labels, the k
highest values of each batch row in descending order (k is capped at the row's length, as Triton
does). Only vectors have classes: a row of a higher rank is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nnserve_server.core.errors import InvalidInput

PARAMETER = "classification"
MAX_CLASSES = 1 << 16  # a bound on the strings one request may ask for per row


def check_count(output: str, count: int) -> None:
    if not 1 <= count <= MAX_CLASSES:
        raise InvalidInput(
            f"output '{output}': the {PARAMETER} parameter asks for {count} classes; ask for 1..{MAX_CLASSES}"
        )


def top_classes(output: str, values: np.ndarray, count: int, labels: Sequence[str], batched: bool) -> np.ndarray:
    """`values` ([batch, classes] for a batched model, [classes] otherwise) as top-`count` strings,
    shaped [batch, k] or [k]."""
    rows = values if batched else values.reshape(1, -1) if values.ndim == 1 else values
    if values.dtype.kind not in "biuf" or rows.ndim != 2 or (batched and values.ndim != 2):
        per_row = list(values.shape[1:] if batched else values.shape)
        raise InvalidInput(
            f"output '{output}' is {values.dtype} of shape {per_row} per row; the {PARAMETER} parameter needs "
            "one vector of numbers per row"
        )
    k = min(count, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    named = len(labels) == rows.shape[1]
    integer = values.dtype.kind in "biu"
    strings = np.empty(order.shape, dtype=object)
    for row, indices in enumerate(order):
        for column, index in enumerate(indices):
            value = rows[row, index]
            text = f"{int(value)}:{index}" if integer else f"{float(value):f}:{index}"
            strings[row, column] = (f"{text}:{labels[index]}" if named else text).encode()
    return strings if batched or values.ndim == 2 else strings.reshape(-1)
