"""What a person reads next to the model: the model card and its plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.manifest import Manifest

from .export import tolerance_text

if TYPE_CHECKING:
    from models.detection import Detections

    from .data.coco import DetectionSplit


def _pyplot():
    """matplotlib without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, labels: Sequence[str], path: Path, title: str) -> Path:
    """The confusion matrix, rows normalised to recall, with the raw counts written in."""
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


def plot_history(history: list[dict[str, float]], path: Path, metric: str, title: str = "training") -> Path:
    """Training loss and the validation metric that picks the best epoch, per epoch."""
    plt = _pyplot()
    fig, ax1 = plt.subplots(figsize=(6, 3.6))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:red", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:red")
    if history and metric in history[0]:
        ax2 = ax1.twinx()
        ax2.plot(epochs, [h[metric] for h in history], "s-", color="tab:blue", label=metric)
        ax2.set_ylabel(metric, color="tab:blue")
    ax1.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_predictions(
    split: DetectionSplit, dets: list[Detections], labels: list[str], path: Path, count: int = 6
) -> Path:
    """A grid of test images: ground truth in white, predictions in colour with label and score."""
    from PIL import Image, ImageDraw

    from models.preprocess import DecodeLimits, decode_image

    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
    tiles = []
    for im, d in list(zip(split.images, dets, strict=True))[:count]:
        img = decode_image(im.path.read_bytes(), DecodeLimits())
        draw = ImageDraw.Draw(img)
        for b in im.boxes:
            draw.rectangle([float(v) for v in b], outline=(255, 255, 255), width=1)
        for b, s, c in zip(d.boxes, d.scores, d.classes, strict=True):
            colour = palette[int(c) % len(palette)]
            draw.rectangle([float(v) for v in b], outline=colour, width=2)
            text = f"{labels[int(c)]} {s:.2f}"
            x, y = float(b[0]), max(0.0, float(b[1]) - 11)
            draw.rectangle(draw.textbbox((x, y), text), fill=(0, 0, 0))
            draw.text((x, y), text, fill=colour)
        tiles.append(img)
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    cols = 3
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (40, 40, 40))
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * cell_w, (k // cols) * cell_h))
    sheet.save(path)
    return path


def _metrics_table(m: Manifest) -> list[str]:
    """The headline metrics; with a shifted split, its column beside the test split's."""
    shifted = m.metrics.shifted
    if shifted is None:
        return [
            f"## Metrics ({m.metrics.split} split, {m.metrics.samples:,} samples)",
            "",
            "| metric | value |",
            "| --- | --- |",
            *[f"| {k} | {v:.4f} |" for k, v in m.metrics.values.items()],
        ]
    lines = [
        "## Metrics",
        "",
        f"`{m.metrics.split}`: {m.metrics.samples:,} held-out samples from the training distribution. "
        f"`{shifted.split}`: {shifted.samples:,} samples from a shifted one, never used for any choice "
        f"during training{': ' + shifted.description if shifted.description else ''}.",
        "",
        f"| metric | {m.metrics.split} | {shifted.split} |",
        "| --- | --- | --- |",
    ]
    for k, v in m.metrics.values.items():
        other = shifted.values.get(k)
        lines.append(f"| {k} | {v:.4f} | {'' if other is None else f'{other:.4f}'} |")
    lines += [f"| {k} |  | {v:.4f} |" for k, v in shifted.values.items() if k not in m.metrics.values]
    return lines


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
        *_metrics_table(m),
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
        f"max abs difference {p.max_abs_diff:.2e} (tolerance {tolerance_text(p)}), "
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
