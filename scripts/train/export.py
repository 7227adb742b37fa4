"""Export to ONNX and compare the exported graph with PyTorch (the parity gate's numbers)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import ParityReport

from .console import log, progress


def export_onnx(
    model: Any,
    example: tuple[Any, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int = 17,
) -> dict[str, Any]:
    """Export to one self-contained ONNX file with the TorchScript-based exporter.

    The dynamo exporter writes external data by default and fails on data-dependent shapes in
    detection models; the classic exporter handles every graph graft ships and is fast.
    """
    import onnx
    import torch

    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    info = {
        "opset": opset,
        "exporter": f"torch.onnx (TorchScript) torch {torch.__version__}",
        "seconds": round(time.perf_counter() - start, 2),
        "bytes": path.stat().st_size,
    }
    log(f"exported {path.name}: {info['bytes'] / 1e6:.1f} MB in {info['seconds']} s")
    return info


def parity_report(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    tolerance: float,
    min_agreement: float = 0.999,
    label_axis: int = -1,
) -> ParityReport:
    """Compare PyTorch (reference) and ONNX Runtime (candidate) outputs on the same inputs."""
    from models.errors import ParityError

    reference = np.asarray(reference, dtype=np.float32)
    candidate = np.asarray(candidate, dtype=np.float32)
    if reference.shape != candidate.shape:
        raise ParityError(f"output shapes differ: torch {reference.shape}, onnx {candidate.shape}")
    diff = float(np.max(np.abs(reference - candidate))) if reference.size else 0.0
    agreement = float(np.mean(reference.argmax(label_axis) == candidate.argmax(label_axis)))
    passed = bool(np.isfinite(diff) and diff <= tolerance and agreement >= min_agreement)
    return ParityReport(
        samples=int(reference.shape[0]),
        max_abs_diff=diff,
        label_agreement=agreement,
        tolerance=tolerance,
        passed=passed,
    )


def parity_message(report: ParityReport) -> str:
    """The one-line summary of a classifier's parity report."""
    return (
        f"ONNX export: max |torch - onnx| = {report.max_abs_diff:.3g} (tolerance {report.tolerance:g}), "
        f"label agreement {report.label_agreement:.4%} over {report.samples} samples"
    )


def ort_session(path: Path, threads: int | None = None):
    """An ONNX Runtime session configured like the service's."""
    from models.runtime import available_cpus, create_session

    return create_session(path, threads=threads or available_cpus())


def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 256, desc: str = "") -> np.ndarray:
    """`fn` over `x` in batches, outputs concatenated (a progress bar when `desc` is given)."""
    outs = []
    rng = range(0, len(x), batch)
    for i in progress(rng, desc, total=len(rng), unit="batch") if desc else rng:
        outs.append(fn(x[i : i + batch]))
    return np.concatenate(outs) if outs else np.zeros((0,))
