"""Pieces every fine-tune recipe shares: seeding, progress, metrics, plots, ONNX export,
parity checks and publishing an artifact folder atomically into the registry."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from models import versions
from models.artifact import MANIFEST, load_artifact, new_version, write_manifest
from models.errors import ParityError
from models.manifest import Manifest, ParityReport

T = TypeVar("T")


# ---- reproducibility and progress --------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed python, numpy and torch; make torch pick deterministic kernels where it can."""
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


def pick_device(request: str | None = "auto"):
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


def describe_device(device) -> str:
    """What the manifest records: `cpu`, or the device with its name (`cuda:0 (NVIDIA H100 80GB HBM3)`)."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def module_device(module):
    """The device a module's parameters live on (the CPU for a module without any)."""
    import torch

    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def progress(it: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A tqdm bar on stderr; in logs (no TTY) it updates every 10 s instead of redrawing."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    yield from tqdm(
        it,
        desc=desc,
        total=total,
        unit=unit,
        dynamic_ncols=True,
        mininterval=0.2 if tty else 10.0,
        disable=os.environ.get("GRAFT_NO_PROGRESS") == "1",
    )


def log(msg: str) -> None:
    """Status lines go to stderr; stdout is reserved for the artifact path printed last."""
    print(f"[graft] {msg}", file=sys.stderr, flush=True)


@contextmanager
def timed(label: str) -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start
        log(f"{label}: {out['seconds']:.1f} s")


def hash_arrays(*arrays: np.ndarray | Sequence[Any]) -> str:
    """sha256 over arrays (bytes) or sequences (their JSON), to identify a dataset exactly."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, np.ndarray):
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        else:
            h.update(json.dumps(list(a), ensure_ascii=False, default=str).encode())
    return h.hexdigest()


# ---- metrics -----------------------------------------------------------------------------
@dataclass
class ClassificationReport:
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    confusion: np.ndarray
    samples: int

    def values(self) -> dict[str, float]:
        return {"accuracy": round(self.accuracy, 5), "macro_f1": round(self.macro_f1, 5)}


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> ClassificationReport:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    n = len(labels)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    cm = np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n), where=denom > 0)
    per_class = {
        label: {
            "precision": round(float(precision[i]), 5),
            "recall": round(float(recall[i]), 5),
            "f1": round(float(f1[i]), 5),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    present = support > 0
    return ClassificationReport(
        accuracy=float(tp.sum() / max(1, len(y_true))),
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        per_class=per_class,
        confusion=cm,
        samples=len(y_true),
    )


# ---- plots -------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, labels: Sequence[str], path: Path, title: str) -> Path:
    plt = _pyplot()
    n = len(labels)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> Path:
    """Training loss and validation metric per epoch."""
    plt = _pyplot()
    fig, ax1 = plt.subplots(figsize=(6, 3.6))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:red", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:red")
    metric = next((k for k in ("val_accuracy", "val_map50", "val_macro_f1") if k in history[0]), None)
    if metric:
        ax2 = ax1.twinx()
        ax2.plot(epochs, [h[metric] for h in history], "s-", color="tab:blue", label=metric)
        ax2.set_ylabel(metric, color="tab:blue")
    ax1.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- export and parity -------------------------------------------------------------------
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
    import onnx

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


def require_parity(report: ParityReport, what: str = "ONNX export") -> None:
    """Fail loudly: an export that does not match PyTorch must not become an artifact."""
    msg = (
        f"{what}: max |torch - onnx| = {report.max_abs_diff:.3g} (tolerance {report.tolerance:g}), "
        f"label agreement {report.label_agreement:.4%} over {report.samples} samples"
    )
    if not report.passed:
        raise ParityError("parity check FAILED: " + msg)
    log("parity ok: " + msg)


def ort_session(path: Path, threads: int | None = None):
    """An ONNX Runtime session configured like the service's."""
    from models.runtime import available_cpus, create_session

    return create_session(path, threads=threads or available_cpus())


def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 256, desc: str = "") -> np.ndarray:
    outs = []
    rng = range(0, len(x), batch)
    for i in progress(rng, desc, total=len(rng), unit="batch") if desc else rng:
        outs.append(fn(x[i : i + batch]))
    return np.concatenate(outs) if outs else np.zeros((0,))


# ---- publishing ---------------------------------------------------------------------------
@dataclass
class Staging:
    """A folder being filled with an artifact's files; published by an atomic rename."""

    registry: Path
    name: str
    version: str = field(default_factory=new_version)

    def __post_init__(self) -> None:
        self.folder = versions.staging_folder(self.registry, self.name, self.version)

    def path(self, filename: str) -> Path:
        return self.folder / filename

    def publish(self, manifest: Manifest) -> Path:
        """Write the manifest (with checksums), verify the folder loads, then rename it into place."""
        write_manifest(self.folder, manifest)
        load_artifact(self.folder)  # the loader's verdict, not ours, before anyone can see it
        return versions.publish_folder(self.folder, self.registry, self.name, self.version)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def write_model_card(folder: Path, manifest: Manifest, images: Sequence[str] = ()) -> Path:
    """A human-readable report next to the model: what it is, how it was made, how good it is."""
    m = manifest
    lines = [
        f"# {m.name} {m.version}",
        "",
        f"Task: **{m.task}**. Base model: `{m.base_model.id}` ({m.base_model.source}, licence {m.base_model.license}).",
        f"Strategy: **{m.training.strategy}**, recipe `{m.training.recipe}`, {m.training.epochs} epoch(s), "
        f"seed {m.training.seed}, {m.training.wall_time_s:.0f} s on {m.training.device}.",
        f"Trainable parameters: {m.training.trainable_params:,} of {m.training.total_params:,}.",
        "",
        f"Dataset: `{m.training.dataset.name}` (sha256 `{m.training.dataset.sha256[:16]}...`), splits "
        + ", ".join(f"{k} {v:,}" for k, v in m.training.dataset.splits.items())
        + ".",
        "",
        f"## Metrics ({m.metrics.split} split, {m.metrics.samples:,} samples)",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in m.metrics.values.items()],
    ]
    if m.metrics.baselines:
        lines += ["", "### Baselines", "", "| baseline | metric | value |", "| --- | --- | --- |"]
        for b, vals in m.metrics.baselines.items():
            lines += [f"| {b} | {k} | {v:.4f} |" for k, v in vals.items()]
    if m.metrics.per_class:
        keys = list(next(iter(m.metrics.per_class.values())).keys())
        lines += [
            "",
            "### Per class",
            "",
            "| label | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for label, vals in m.metrics.per_class.items():
            lines.append(f"| {label} | " + " | ".join(f"{vals[k]:.4g}" for k in keys) + " |")
    notes = m.training.notes + m.metrics.notes
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    p = m.export.parity
    lines += [
        "",
        "## Export",
        "",
        f"ONNX opset {m.export.opset}, {m.export.exporter}; onnxruntime {m.export.onnxruntime_version}.",
        f"Parity against PyTorch on {p.samples:,} held-out inputs through the serving preprocessing: "
        f"max abs difference {p.max_abs_diff:.2e} (tolerance {p.tolerance:g}), "
        f"label agreement {p.label_agreement:.4%}.",
    ]
    q = m.export.quantization
    if q is not None:
        lines.append(
            f"Quantization {q.mode}: accuracy {q.accuracy_fp32} -> {q.accuracy_int8} "
            f"(delta {q.accuracy_delta}), speed-up x{q.speedup}. {q.notes}"
        )
    for img in images:
        lines += ["", f"![{img}]({img})"]
    path = folder / "model_card.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def dump_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


__all__ = ["MANIFEST"]


def small_data_schedule(cfg: dict[str, Any], n_train: int, *, epochs_given: bool) -> tuple[dict[str, Any], str | None]:
    """More epochs for a small training set, so that it still gets `min_steps` optimizer steps.

    A recipe's epoch count is tuned on its demo data (tens of thousands of examples); a team's
    80 reviews or 50 photos would get two or three steps from it, and a one-cycle schedule that
    rises and falls within them learns nothing. Capped at `max_epochs`; patience grows with the
    epochs so that early stopping does not end the run after a noisy epoch. An explicit
    --epochs is kept as given.
    """
    min_steps = int(cfg.get("min_steps") or 0)
    steps = max(1, math.ceil(n_train / cfg["batch_size"]))
    want = min(int(cfg.get("max_epochs") or 50), math.ceil(min_steps / steps))
    if epochs_given or want <= cfg["epochs"]:
        return cfg, None
    patience = max(int(cfg["patience"]), want // 4)
    note = (
        f"small training set: {n_train} examples are {steps} step(s) an epoch, so {want} epochs instead of the "
        f"recipe's {cfg['epochs']} (at least {min_steps} steps, at most {cfg.get('max_epochs') or 50} epochs); "
        f"early stopping after {patience} epochs without a validation gain"
    )
    return {**cfg, "epochs": want, "patience": patience}, note
