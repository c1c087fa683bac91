"""How onnxruntime sessions are made: execution providers, thread counts, session options.

Thread counts come from the container's CPU quota (cgroup), not the host's core count, so a pod
limited to 2 CPUs on a 64-core node does not start 64 threads per session.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from nnserve_server.core.errors import StartupError
from nnserve_server.settings import Settings

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the cgroup quota if one is set, else the CPUs it may run on."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpus(cgroup_root)
    return max(1, min(affinity, quota)) if quota else affinity


def _cgroup_cpus(root: Path) -> int | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else math.ceil(int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else math.ceil(quota_us / period_us)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Runtime:
    """What every session of this server is created with."""

    providers: tuple[str, ...]  # onnxruntime names, in order of preference
    missing_providers: tuple[str, ...]  # requested but not in this onnxruntime build
    cpus: int  # what the container may use: sizes threads and instances when settings leave them at 0
    onnxruntime_version: str = ort.__version__  # the GPU image's onnxruntime-gpu may differ from the CPU pin

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        available = set(ort.get_available_providers())
        chosen: list[str] = []
        missing: list[str] = []
        for short in settings.providers:
            name = PROVIDERS.get(short, short)
            (chosen if name in available else missing).append(name)
        if missing and not settings.allow_provider_fallback:
            raise StartupError(
                f"execution providers {missing} are not available in this onnxruntime "
                f"(available: {sorted(available)}); install the matching onnxruntime build "
                "or pass --allow-provider-fallback"
            )
        if missing:
            log.warning("execution providers %s are missing; falling back to %s", missing, chosen or ["CPU"])
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")  # onnxruntime places what others cannot run on the CPU
        return cls(tuple(chosen), tuple(missing), settings.cpus or cpu_quota())

    def session(self, model_path: Path, intra_op_threads: int, memory_arena: bool = True) -> ort.InferenceSession:
        """`memory_arena` off: freed tensors go back to the allocator instead of onnxruntime's arena, which
        keeps the largest run's memory for good (a 2048x2048 U-Net run kept 2.1 GB, and 3.4 GB after a
        second run; without the arena RSS fell back to 0.1 GB and the peak was 1.1-1.4 GB)."""
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = memory_arena
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle onnxruntime threads would spin, taking the cores that the gRPC loop needs between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(model_path), sess_options=options, providers=list(self.providers))
