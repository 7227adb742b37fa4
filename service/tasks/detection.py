"""Serving logic for object detection: bytes -> letterboxed tensor -> batched ONNX run -> boxes.

The graph returns dense boxes and scores for every location (see scripts/train/detector.py);
`models.detection.postprocess` thresholds, runs NMS and maps the boxes back to the uploaded
image's pixels with the `Geometry` the preprocessor recorded, so a box is right whatever the
image's size and aspect.

Uploads are decoded at full size (no JPEG draft mode): draft decoding shrinks a big JPEG by
1/2, 1/4 or 1/8 before we see it, and boxes must come back in the original's pixels.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.detection import Detections, postprocess
from models.manifest import DetectionPostprocessing, ImagePreprocessing
from models.preprocess import DecodeLimits, Geometry, ImagePreprocessor, MemoryHold

from ..served import ServedModel, register_task


@register_task
class ObjectDetector(ServedModel):
    task = "object-detection"
    bytes_input_name = "image"
    # Measured (docs/BENCHMARKS.md): the detector's images/s is flat from batch 1 to 64 on CPU,
    # while a batch of 32 letterboxed images holds hundreds of MB of activations in the arena.
    batch_cap = 4

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        spec = self.manifest.preprocessing
        post = self.manifest.postprocessing
        # models.servable refused versions with NMS in the graph or without boxes and scores.
        assert isinstance(spec, ImagePreprocessing) and isinstance(post, DetectionPostprocessing)
        self.preprocessor = ImagePreprocessor(spec)
        self.post = post
        self.limits = DecodeLimits(max_pixels=self.settings.max_image_pixels)
        self.labels = self.manifest.labels

    def prepare(self, data: bytes, hold: MemoryHold | None = None) -> tuple[np.ndarray, Geometry]:
        """Untrusted bytes to the model's input tensor and the geometry that undoes the letterbox
        (full-size decode, no JPEG draft), the decode's memory held in `hold` (by default the
        worker's memory budget)."""
        return self.preprocessor.from_bytes(data, self.limits, draft=False, budget=hold or self.budget)

    def collate(self, items: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return {self.input_names[0]: np.stack(items) if len(items) > 1 else items[0][None]}

    def rows_from_bytes(self, items: list[bytes]) -> list[np.ndarray]:
        """v2 BYTES input: letterboxed tensors; raw outputs are then in the model input's pixels."""
        return [self.prepare(d)[0] for d in items]

    def detections(
        self,
        outputs: tuple[np.ndarray, np.ndarray],
        geometry: Geometry,
        score_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> Detections:
        boxes, scores = outputs
        return postprocess(
            boxes,
            scores,
            score_threshold=self.post.score_threshold if score_threshold is None else score_threshold,
            nms_iou=self.post.nms_iou,
            max_detections=self.post.max_detections if max_detections is None else max_detections,
            geometry=geometry,
        )

    async def predict(
        self, data: bytes, score_threshold: float | None = None, max_detections: int | None = None
    ) -> dict[str, Any]:
        """Detections for one encoded image, boxes in its own pixels (decoded off the event loop)."""
        row, geometry = await self.run_one(lambda hold: self.prepare(data, hold), len(data))
        outputs = (row.outputs["boxes"], row.outputs["scores"])
        # NMS over up to 1,000 candidates (threshold 0) takes milliseconds: keep it off the loop.
        dets = await asyncio.get_running_loop().run_in_executor(
            self.cpu_executor, self.detections, outputs, geometry, score_threshold, max_detections
        )
        return {
            "width": geometry.orig_width,
            "height": geometry.orig_height,
            "detections": dets.to_json(self.labels),
        }
