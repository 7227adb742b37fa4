"""Serving logic for image classification: bytes -> tensor -> batched ONNX run -> top-k labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.manifest import ImagePreprocessing
from models.postprocess import rank, softmax, top_k_ranked
from models.preprocess import DecodeLimits, ImagePreprocessor, MemoryHold

from ..served import ServedModel, register_task


@register_task
class ImageClassifier(ServedModel):
    task = "image-classification"
    bytes_input_name = "image"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        spec = self.manifest.preprocessing
        assert isinstance(spec, ImagePreprocessing)
        self.preprocessor = ImagePreprocessor(spec)
        self.limits = DecodeLimits(max_pixels=self.settings.max_image_pixels)
        self.labels = self.manifest.labels

    def prepare(self, data: bytes, hold: MemoryHold | None = None) -> np.ndarray:
        """Untrusted bytes to the model's input tensor, the decode's memory held in `hold` (by
        default the worker's memory budget)."""
        return self.preprocessor.from_bytes(data, self.limits, budget=hold or self.budget)[0]

    def collate(self, items: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return {self.input_names[0]: np.stack(items) if len(items) > 1 else items[0][None]}

    def finish(self, outputs: dict[str, np.ndarray]) -> list[tuple[list[float], list[int]]]:
        # Softmax and ranking once for the whole batch: per request they were small numpy calls
        # that each drop and re-take the GIL, and every re-take could wait behind another thread.
        probs = softmax(outputs[self.output_names[0]])
        return list(zip(probs.tolist(), rank(probs).tolist(), strict=True))

    def rows_from_bytes(self, items: list[bytes]) -> list[np.ndarray]:
        return [self.prepare(d) for d in items]

    def logits_for_bytes(self, data: bytes) -> np.ndarray:
        return self.run_feeds(self.collate([self.prepare(data)]))[self.output_names[0]][0]

    async def predict(self, data: bytes, k: int) -> list[dict[str, Any]]:
        """Top-k labels for one encoded image (run at once when alone, else batched with others)."""
        row, _ = await self.run_one(lambda hold: (self.prepare(data, hold), None), len(data))
        probs, order = row.extra
        return top_k_ranked(probs, order, self.labels, k)
