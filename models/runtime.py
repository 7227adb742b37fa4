"""What serving and training both need from the machine: the CPUs this process may use and
ONNX Runtime sessions configured for them.

It lives here, below `service/` and the training code, so that a fine-tune opens its parity
session exactly as the server does without importing the server (and BentoML with it).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # onnxruntime is imported on first use: `import models` stays light
    import onnxruntime as ort

log = logging.getLogger("graft.runtime")

CPU_PROVIDER = "CPUExecutionProvider"


def cpu_quota() -> int | None:
    """CPUs granted by the cgroup (v2 cpu.max or v1 cfs quota), rounded up; None when unlimited.

    Containers see every host core in os.cpu_count(); a thread pool sized from that oversubscribes
    a pod limited to 2 CPUs. The quota is what the scheduler will actually give us.
    """
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    try:
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if q > 0 and p > 0:
            return max(1, -(-q // p))
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """CPUs this process may use: GRAFT_CPUS if set (Kubernetes passes the container's CPU limit),
    else the cgroup quota if set, else its affinity mask."""
    raw = os.environ.get("GRAFT_CPUS", "").strip()
    if raw:
        try:
            return max(1, math.ceil(float(raw)))
        except ValueError as e:
            raise ValueError(f"GRAFT_CPUS={raw!r} is not a number") from e
    quota = cpu_quota()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    return min(quota, affinity) if quota else affinity


def session_options(threads: int, *, spin_within_run: bool = False) -> ort.SessionOptions:
    """Options for a serving session: a fixed intra-op pool, no idle spinning, full graph opts.

    `spin_within_run`: the pool's threads spin between the operators of one run and stop when the
    run ends. For a small model whose operators take microseconds, waking a sleeping thread for
    each one costs what the second thread gains (measured on a 64x64 classifier, one image: 1.5 ms
    on one thread, 1.6 ms on two sleeping threads, 0.9-1.2 ms on two spinning ones). Used for the
    lone-request session only (service/served.py), never for the one that serves under load."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the CPU quota between requests and starve request decoding.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_within_run else "0")
    if spin_within_run:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def create_session(
    model_path: Path, *, threads: int, providers: tuple[str, ...] = (CPU_PROVIDER,), spin_within_run: bool = False
) -> ort.InferenceSession:
    """Open an ONNX model; providers not available in this onnxruntime build are skipped
    (GRAFT_ORT_STRICT=1 refuses instead)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available]
    missing = [p for p in providers if p not in available]
    if missing and os.environ.get("GRAFT_ORT_STRICT") == "1":
        raise RuntimeError(f"execution providers {missing} are not available (have {sorted(available)})")
    if not chosen:
        log.warning("none of %s is available (have %s); using CPU", providers, sorted(available))
        chosen = [CPU_PROVIDER]
    elif CPU_PROVIDER not in chosen:
        chosen.append(CPU_PROVIDER)
    return ort.InferenceSession(
        str(model_path), sess_options=session_options(threads, spin_within_run=spin_within_run), providers=chosen
    )
