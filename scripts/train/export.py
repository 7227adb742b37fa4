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


# float32 rounding grows with the size of a value: a logit of 50 carries about 3.8e-6 per unit in
# the last place, and a deep network accumulates hundreds of them. An absolute tolerance alone
# refused a correct export (max |logit| 104, difference 1.5e-3 at a logit of 52: 3e-5 relative,
# every label the same); an export bug (an op with other semantics, a layer left in training
# mode) is off by far more than this.
RELATIVE_TOLERANCE = 1e-4


def parity_report(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    tolerance: float,
    relative: float = RELATIVE_TOLERANCE,
    min_agreement: float = 0.999,
    label_axis: int = -1,
) -> ParityReport:
    """Compare PyTorch (reference) and ONNX Runtime (candidate) outputs on the same inputs: every
    output within `tolerance + relative * |reference|` (numpy's allclose rule) and labels that
    agree on at least `min_agreement` of the samples."""
    from models.errors import ParityError

    reference = np.asarray(reference, dtype=np.float32)
    candidate = np.asarray(candidate, dtype=np.float32)
    if reference.shape != candidate.shape:
        raise ParityError(f"output shapes differ: torch {reference.shape}, onnx {candidate.shape}")
    if reference.size:
        exact = reference.astype(np.float64)
        diff = np.abs(exact - candidate)
        allowed = tolerance + relative * np.abs(exact)
        # How much of its allowance the worst output uses (> 1: out of tolerance; NaN: not finite).
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(diff == 0, 0.0, diff / allowed)  # an exact match passes a zero tolerance
        used = float(np.max(share))
        largest, worst = float(np.max(diff)), float(np.max(np.abs(reference)))
    else:
        used = largest = worst = 0.0
    agreement = float(np.mean(reference.argmax(label_axis) == candidate.argmax(label_axis)))
    passed = bool(np.isfinite(used) and used <= 1.0 and agreement >= min_agreement)
    return ParityReport(
        samples=int(reference.shape[0]),
        max_abs_diff=largest,
        label_agreement=agreement,
        tolerance=tolerance,
        passed=passed,
        extra={"relative_tolerance": relative, "tolerance_used": used, "max_abs_output": worst},
    )


def tolerance_text(report: ParityReport) -> str:
    """'1e-3' or '1e-3 + 1e-4 x |torch|': the rule a report was checked against."""
    relative = report.extra.get("relative_tolerance", 0.0)
    return f"{report.tolerance:g}" + (f" + {relative:g} x |torch|" if relative else "")


def parity_message(report: ParityReport) -> str:
    """The one-line summary of a classifier's parity report."""
    return (
        f"ONNX export: max |torch - onnx| = {report.max_abs_diff:.3g} (tolerance {tolerance_text(report)}), "
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
