"""The idiomatic BentoML peer: a one-model image classifier written the way BentoML's docs write one.

`@bentoml.service` with `@bentoml.api(batchable=True)` over a list of PIL images (BentoML's adaptive
batching merges concurrent requests into one call), ONNX Runtime with its default session
options, one worker. Same model file and preprocessing numbers as the graft artifact it is
pointed at. Started by the serving benchmark (scripts/bench/serving.py):

    GRAFT_PEER_ARTIFACT=models/registry/image-classification/<version> \
        bentoml serve scripts.bench.bentoml_peer:Classifier --port 3901

A client sends one image per request, as a list of one: multipart field `images`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from PIL.Image import Image

ARTIFACT = Path(os.environ.get("GRAFT_PEER_ARTIFACT", "."))


@bentoml.service
class Classifier:
    def __init__(self) -> None:
        import onnxruntime as ort

        manifest = json.loads((ARTIFACT / "manifest.json").read_text())
        self.spec, self.labels = manifest["preprocessing"], manifest["labels"]
        self.mean = np.array(self.spec["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.array(self.spec["std"], dtype=np.float32).reshape(3, 1, 1)
        self.session = ort.InferenceSession(str(ARTIFACT / "model.onnx"), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def preprocess(self, image: Image) -> np.ndarray:
        img = image.convert("RGB").resize((self.spec["width"], self.spec["height"]))
        return (np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0 - self.mean) / self.std

    @bentoml.api(batchable=True)
    def classify(self, images: list[Image]) -> list[dict[str, Any]]:
        batch = np.stack([self.preprocess(image) for image in images])
        logits = self.session.run(None, {self.input: batch})[0]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return [
            {"predictions": [{"label": self.labels[i], "score": float(p[i])} for i in np.argsort(-p)[:5]]}
            for p in probs
        ]
