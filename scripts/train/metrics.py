"""Held-out metrics: accuracy, macro-F1 and the confusion matrix for classifiers; COCO mAP for
detectors (faster-coco-eval)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from models.detection import Detections

    from .data.coco import DetectionSplit


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


@dataclass
class CocoReport:
    map: float  # mAP@[.5:.95]
    map50: float
    map75: float
    per_class: dict[str, dict[str, float]]
    images: int
    objects: int

    def values(self) -> dict[str, float]:
        return {"map": round(self.map, 5), "map50": round(self.map50, 5), "map75": round(self.map75, 5)}


def coco_evaluate(
    split: DetectionSplit,
    labels: list[str],
    predictions: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> CocoReport:
    """COCO bbox metrics (faster-coco-eval) for per-image predictions (boxes xyxy, scores, labels)."""
    from faster_coco_eval import COCO, COCOeval_faster

    gt: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(labels)],
    }
    dets: list[dict[str, Any]] = []
    for i, (im, (boxes, scores, classes)) in enumerate(zip(split.images, predictions, strict=True)):
        gt["images"].append({"id": i + 1, "width": im.width, "height": im.height})
        for b, c in zip(im.boxes, im.labels, strict=True):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": int(c) + 1,
                    "bbox": [float(b[0]), float(b[1]), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for b, s, c in zip(boxes, scores, classes, strict=True):
            dets.append(
                {
                    "image_id": i + 1,
                    "category_id": int(c) + 1,
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                    "score": float(s),
                }
            )
    coco_gt = COCO(gt)
    if not dets:
        zero = {n: {"ap": 0.0, "ap50": 0.0, "objects": 0} for n in labels}
        return CocoReport(0.0, 0.0, 0.0, zero, len(split), split.objects)
    coco_dt = coco_gt.loadRes(dets)
    ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=lambda *a, **k: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = ev.stats
    # precision: [iou thresholds (10), recall points (101), classes, area ranges, max dets]
    precision = np.asarray(ev.eval["precision"])
    all_labels = np.concatenate([im.labels for im in split.images] or [np.zeros(0, np.int64)])
    counts = np.bincount(all_labels, minlength=len(labels))
    per_class = {}
    for k, name in enumerate(labels):
        p_all = precision[:, :, k, 0, -1]
        p50 = precision[0, :, k, 0, -1]
        ap = float(p_all[p_all > -1].mean()) if (p_all > -1).any() else 0.0
        ap50 = float(p50[p50 > -1].mean()) if (p50 > -1).any() else 0.0
        per_class[name] = {"ap": round(ap, 5), "ap50": round(ap50, 5), "objects": int(counts[k])}
    return CocoReport(
        map=max(0.0, float(stats[0])),
        map50=max(0.0, float(stats[1])),
        map75=max(0.0, float(stats[2])),
        per_class=per_class,
        images=len(split),
        objects=split.objects,
    )


def detection_counts(dets: list[Detections], split: DetectionSplit, threshold: float) -> tuple[int, int, int]:
    """(true positives, false positives, missed objects) of the detections scoring at least
    `threshold`: a detection is right when it has an unmatched object's class at IoU >= 0.5."""
    from models.detection import box_iou

    tp = fp = 0
    for d, im in zip(dets, split.images, strict=True):
        matched = np.zeros(len(im.labels), dtype=bool)
        for b, s, c in zip(d.boxes, d.scores, d.classes, strict=True):
            if s < threshold:
                continue
            cand = np.flatnonzero((im.labels == c) & ~matched)
            if len(cand):
                ious = box_iou(b, im.boxes[cand])
                j = int(ious.argmax())
                if ious[j] >= 0.5:
                    matched[cand[j]] = True
                    tp += 1
                    continue
            fp += 1
    return tp, fp, split.objects - tp


def precision_recall(dets: list[Detections], split: DetectionSplit, threshold: float) -> tuple[float, float]:
    """Precision and recall (IoU 0.5, same class) of the detections scoring at least `threshold`."""
    tp, fp, fn = detection_counts(dets, split, threshold)
    return tp / max(1, tp + fp), tp / max(1, tp + fn)


def pick_score_threshold(dets: list[Detections], split: DetectionSplit) -> tuple[float, float]:
    """The served default threshold: the one with the best F1 (IoU 0.5, same class) on validation."""
    best = (0.3, -1.0)
    for thr in np.round(np.arange(0.1, 0.81, 0.05), 2):
        tp, fp, fn = detection_counts(dets, split, float(thr))
        f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        if f1 > best[1]:
            best = (float(thr), f1)
    return best


def compare_detections(ref: Detections, cand: Detections, score_tol: float) -> tuple[int, int, float]:
    """(matched, total, max box diff in pixels) of torch detections found again by ONNX Runtime.

    A torch detection whose score is within `score_tol` of the threshold may legitimately be
    missing on the other side, so it does not count.
    """
    matched, total, worst = 0, 0, 0.0
    used = np.zeros(len(cand), dtype=bool)
    for b, c in zip(ref.boxes, ref.classes, strict=True):
        total += 1
        same = np.flatnonzero((cand.classes == c) & ~used)
        if len(same):
            diff = np.abs(cand.boxes[same] - b).max(1)
            j = int(diff.argmin())
            if diff[j] <= 1.0:
                used[same[j]] = True
                matched += 1
                worst = max(worst, float(diff[j]))
    return matched, total, worst
