"""Where and how a fine-tune runs: seeds, CPU threads, and the torch device it trains on.

Only the trained layers and their batches go to a GPU; evaluation, export and the parity check
run on the CPU, as ONNX Runtime will run the exported model.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch; make torch pick deterministic kernels where it can.

    Call it before anything touches CUDA: it sets CUBLAS_WORKSPACE_CONFIG, which CUDA reads once.
    """
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def configure_threads() -> int:
    """Use every CPU this process may run on (GRAFT_TRAIN_THREADS overrides)."""
    import torch

    from models.runtime import available_cpus

    n = int(os.environ.get("GRAFT_TRAIN_THREADS") or available_cpus())
    torch.set_num_threads(max(1, n))
    return n


def pick_device(request: str | None = "auto") -> torch.device:
    """The torch device to train on: `auto` takes the first CUDA GPU when torch sees one, else
    the CPU; `cpu`, `cuda`, `cuda:N` and `mps` are taken as asked and refused with a message
    when this machine does not have them.

    On CUDA, TF32 matmuls and convolutions are switched off: the exported model runs in float32
    on ONNX Runtime, and the parity check compares against float32 PyTorch outputs.
    """
    import torch

    want = (request or "auto").strip().lower()
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(want)
    except RuntimeError as e:
        raise SystemExit(f"--device {request!r}: {e}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {request}: torch {torch.__version__} sees no CUDA GPU on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SystemExit(f"--device {request}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        full_float32()
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise SystemExit(f"--device {request}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise SystemExit(f"--device {request}: graft trains on cpu, cuda or mps, not {device.type}")
    return device


def full_float32() -> None:
    """No TF32 in CUDA matmuls and convolutions (torch's newer switch where it has one)."""
    import torch

    if hasattr(torch.backends, "fp32_precision"):
        torch.backends.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def describe_device(device: torch.device) -> str:
    """What the manifest records: `cpu`, or the device with its name (`cuda:0 (NVIDIA H100 80GB HBM3)`)."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module's parameters live on (the CPU for a module without any)."""
    import torch

    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
