"""Detection postprocessing: dense model outputs to a short list of boxes in original pixels.

numpy only, shared by training evaluation, the export parity check and the service, so the
metrics in a manifest are computed by the code that serves. The graph ends with decoded boxes
(`boxes`: N x L x 4, x1,y1,x2,y2 in model-input pixels) and per-class scores (`scores`:
N x L x C, in [0, 1]) for every location L; everything after that happens here:

    score threshold -> top candidates -> per-class NMS -> max detections -> Geometry.to_original
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .preprocess import Geometry

# Candidates kept before NMS; a dense head scores every location for every class.
PRE_NMS_TOP_K = 1000


@dataclass(frozen=True)
class Detections:
    """Detections of one image, highest score first."""

    boxes: np.ndarray  # (K, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (K,) float32
    classes: np.ndarray  # (K,) int64 label indices

    def __len__(self) -> int:
        return len(self.scores)

    def as_rows(self) -> np.ndarray:
        """(K, 6) float32 rows [x1, y1, x2, y2, score, class] (warm-up checks, parity)."""
        return np.concatenate(
            [self.boxes, self.scores[:, None], self.classes[:, None].astype(np.float32)], axis=1
        ).astype(np.float32)

    def to_json(self, labels: list[str]) -> list[dict[str, Any]]:
        """The HTTP shape: [{label, score, box: [x1, y1, x2, y2]}] (boxes rounded to 0.01 pixel)."""
        return [
            {
                "label": labels[int(c)],
                "score": round(float(s), 5),
                "box": [round(float(v), 2) for v in b],
            }
            for b, s, c in zip(self.boxes, self.scores, self.classes, strict=True)
        ]


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against M boxes."""
    return pairwise_iou(np.asarray(box)[None], boxes)[0]


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU between two sets of xyxy boxes."""
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, highest score first (ties: lower index first).

    One IoU matrix, then a walk down the score order; stops once `max_keep` boxes are kept.
    """
    order = np.argsort(-scores, kind="stable")
    over = pairwise_iou(boxes[order], boxes[order]) > iou_threshold
    suppressed = np.zeros(len(order), dtype=bool)
    keep: list[int] = []
    limit = len(order) if max_keep is None else max_keep
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(int(order[i]))
        if len(keep) >= limit:
            break
        suppressed |= over[i]
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
    geometry: Geometry | None = None,
) -> Detections:
    """One image's dense outputs (L x 4 boxes, L x C scores) to its final detections.

    NMS runs per class (a box only suppresses boxes of its own class), as COCO evaluation
    expects. With `geometry`, boxes come back in the original image's pixels.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    loc, cls = np.nonzero(scores > score_threshold)
    cand = scores[loc, cls]
    if cand.size > PRE_NMS_TOP_K:
        top = np.argsort(-cand, kind="stable")[:PRE_NMS_TOP_K]
        top.sort()  # keep (location, class) order so ties resolve the same way everywhere
        loc, cls, cand = loc[top], cls[top], cand[top]
    cand_boxes = boxes[loc]
    kept = [
        members[nms(cand_boxes[members], cand[members], nms_iou, max_keep=max_detections)]
        for members in (np.flatnonzero(cls == c) for c in np.unique(cls))
    ]
    keep = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    # Highest score first across classes; equal scores keep (location, class) order.
    keep = keep[np.lexsort((keep, -cand[keep]))][:max_detections]
    out_boxes = cand_boxes[keep]
    if geometry is not None and len(keep):
        out_boxes = geometry.to_original(out_boxes)  # undoes the letterbox and clips to the image
    return Detections(
        boxes=out_boxes.reshape(-1, 4).astype(np.float32),
        scores=cand[keep].astype(np.float32),
        classes=cls[keep].astype(np.int64),
    )
