"""Serving logic for image classification: bytes -> tensor -> batched ONNX run -> top-k labels."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.manifest import ImagePreprocessing
from models.postprocess import rank, softmax, top_k_ranked
from models.preprocess import DecodeLimits, ImagePreprocessor

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

    def logits(self, items: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.stack(items) if len(items) > 1 else items[0][None]
        (logits,) = self.session.run(self.output_names[:1], {self.input_names[0]: batch})
        return logits

    def run_batch(self, items: Sequence[np.ndarray]) -> list[tuple[list[float], list[int]]]:
        # Softmax and ranking for the whole batch here, on the inference thread: per request on
        # the event loop they were small numpy calls that each drop and re-take the GIL, and
        # every re-take waits behind whichever decode thread holds it.
        probs = softmax(self.logits(items))
        return list(zip(probs.tolist(), rank(probs).tolist(), strict=True))

    def bytes_to_feeds(self, items: list[bytes]) -> dict[str, np.ndarray]:
        batch = np.stack([self.preprocessor.from_bytes(d, self.limits)[0] for d in items])
        return {self.input_names[0]: batch}

    def logits_for_bytes(self, data: bytes) -> np.ndarray:
        tensor, _ = self.preprocessor.from_bytes(data, self.limits)
        return self.logits([tensor])[0]

    async def predict(self, data: bytes, k: int) -> list[dict[str, Any]]:
        """Top-k labels for one encoded image (decoded off the event loop, batched with others)."""
        loop = asyncio.get_running_loop()
        tensor, _ = await loop.run_in_executor(self.cpu_executor, self.preprocessor.from_bytes, data, self.limits)
        probs, order = await self.batcher.submit(tensor)
        return top_k_ranked(probs, order, self.labels, k)
