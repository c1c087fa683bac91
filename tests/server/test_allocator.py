"""`--allocator-retain-mb`: freed memory stays with the process for reuse (glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocates, touches and frees a 16 MiB array; prints how much of it the process still holds (MiB).
_PROBE = """
import os, sys
import numpy as np
from nnserve_server.process import allocator
if sys.argv[1] != "0":
    assert allocator.retain_freed_memory(int(sys.argv[1]) << 20)
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
np.ones(1024, np.float32)  # numpy's own first-use allocations, outside the count
before = resident()
array = np.ones(4 << 20, np.float32)
del array
print((resident() - before) / 2**20)
"""


def _held_mib(retain_mb: int) -> float:
    done = subprocess.run([sys.executable, "-c", _PROBE, str(retain_mb)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_for_reuse_instead_of_unmapped() -> None:
    """By default glibc maps a 16 MiB block afresh and unmaps it on free (the next one faults its pages
    in again); retained, the block comes from the heap and stays there for the next allocation."""
    assert _held_mib(0) < 4
    assert _held_mib(64) >= 12


def test_zero_leaves_the_allocator_alone() -> None:
    from nnserve_server.process import allocator

    assert allocator.retain_freed_memory(0) is False
