"""The detector's serving-path checks: predictions through ONNX Runtime and `models.detection`
(as the service runs them), the PyTorch vs ONNX Runtime parity comparison, and the split-level
figures a detection artifact reports (COCO mAP, precision and recall at the served threshold)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from models.detection import Detections, postprocess
from models.manifest import ParityReport, SplitMetrics
from models.preprocess import DecodeLimits, ImagePreprocessor, decode_image

from .console import progress
from .data.coco import DetectionSplit
from .metrics import CocoReport, coco_evaluate, compare_detections, precision_recall
from .nets.detector import Detector


def as_predictions(dets: list[Detections]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(boxes, scores, classes) per image, as coco_evaluate takes them."""
    return [(d.boxes, d.scores, d.classes) for d in dets]


def onnx_predict(
    sess: Any, split: DetectionSplit, pre: ImagePreprocessor, post: dict[str, Any], desc: str
) -> list[Detections]:
    """The serving path over a split: decode, letterbox, ONNX Runtime, models.detection."""
    limits = DecodeLimits()
    out: list[Detections] = []
    batch = 32
    for start in progress(range(0, len(split), batch), desc, total=math.ceil(len(split) / batch), unit="batch"):
        pairs = [pre(decode_image(im.path.read_bytes(), limits)) for im in split.images[start : start + batch]]
        boxes, scores = sess.run(["boxes", "scores"], {"images": np.stack([t for t, _ in pairs])})
        for j, (_, g) in enumerate(pairs):
            out.append(postprocess(boxes[j], scores[j], geometry=g, **post))
    return out


def parity_check(
    model: Detector, sess: Any, split: DetectionSplit, pre: ImagePreprocessor, post: dict[str, Any], tolerance: float
) -> ParityReport:
    """Torch vs ONNX Runtime on held-out images: raw outputs and final detections."""
    limits = DecodeLimits()
    model.eval()
    max_score, max_box_rel, matched, total, worst_px = 0.0, 0.0, 0, 0, 0.0
    for start in range(0, len(split), 16):
        pairs = [pre(decode_image(im.path.read_bytes(), limits)) for im in split.images[start : start + 16]]
        x = np.stack([t for t, _ in pairs])
        with torch.no_grad():
            t_boxes, t_scores = (v.numpy() for v in model(torch.from_numpy(x)))
        o_boxes, o_scores = sess.run(["boxes", "scores"], {"images": x})
        max_score = max(max_score, float(np.abs(t_scores - o_scores).max()))
        # Boxes are in pixels: compare them relative to the input size.
        max_box_rel = max(max_box_rel, float(np.abs(t_boxes - o_boxes).max()) / max(pre.size))
        for j, (_, g) in enumerate(pairs):
            a = postprocess(t_boxes[j], t_scores[j], geometry=g, **post)
            b = postprocess(o_boxes[j], o_scores[j], geometry=g, **post)
            near = np.abs(a.scores - post["score_threshold"]) <= tolerance
            a = Detections(a.boxes[~near], a.scores[~near], a.classes[~near])
            m, t, w = compare_detections(a, b, tolerance)
            matched, total, worst_px = matched + m, total + t, max(worst_px, w)
    agreement = matched / total if total else 1.0
    passed = bool(max_score <= tolerance and agreement >= 0.99 and worst_px <= 1.0)
    return ParityReport(
        samples=len(split),
        max_abs_diff=max_score,
        label_agreement=agreement,
        tolerance=tolerance,
        passed=passed,
        extra={
            "detections_compared": float(total),
            "max_box_diff_px": worst_px,
            "max_raw_box_diff_rel": max_box_rel,
        },
    )


def pick_warmup(dets: list[Detections], threshold: float) -> int:
    """A test image whose detections are far from every decision boundary (a robust load check)."""
    for i, d in enumerate(dets):
        if len(d) and np.all(np.abs(d.scores - threshold) > 0.05):
            return i
    return 0


def above(dets: list[Detections], threshold: float) -> list[Detections]:
    """Detections above the served threshold (what a client sees by default)."""
    out = []
    for d in dets:
        k = d.scores > threshold
        out.append(Detections(d.boxes[k], d.scores[k], d.classes[k]))
    return out


def split_report(
    dets: list[Detections], split: DetectionSplit, labels: list[str], threshold: float
) -> tuple[CocoReport, dict[str, float]]:
    """COCO metrics of low-threshold detections, and the headline values with precision and
    recall at the served `threshold` added."""
    report = coco_evaluate(split, labels, as_predictions(dets))
    precision, recall = precision_recall(dets, split, threshold)
    values = {**report.values(), "precision_at_threshold": round(precision, 5), "recall_at_threshold": round(recall, 5)}
    return report, values


def at_threshold(values: dict[str, float]) -> str:
    """'precision P, recall R' from a split's values."""
    return f"precision {values['precision_at_threshold']:.3f}, recall {values['recall_at_threshold']:.3f}"


def shifted_metrics(
    sess: Any,
    split: DetectionSplit,
    labels: list[str],
    pre: ImagePreprocessor,
    post: dict[str, Any],
    threshold: float,
    description: str,
) -> SplitMetrics:
    """The shifted split through the serving path: the same values as the test split's."""
    dets = onnx_predict(sess, split, pre, post, "onnx shifted")
    _, values = split_report(dets, split, labels, threshold)
    return SplitMetrics(split="shifted", samples=len(split), description=description, values=values)
