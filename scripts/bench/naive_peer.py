"""The naive peer: the FastAPI + ONNX Runtime server a user would write without graft.

A plain `def` route (FastAPI runs it in its thread pool), python-multipart's `UploadFile`, the
whole image decoded, ONNX Runtime with its default session options, one image per run, no
batching. Same model file and preprocessing numbers as the graft artifact it is pointed at.
Started by the serving benchmark (scripts/bench/serving.py):

    GRAFT_PEER_ARTIFACT=models/registry/image-classification/<version> \
        uvicorn scripts.bench.naive_peer:app --port 3900
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image

ARTIFACT = Path(os.environ["GRAFT_PEER_ARTIFACT"])
MANIFEST = json.loads((ARTIFACT / "manifest.json").read_text())
SPEC, LABELS = MANIFEST["preprocessing"], MANIFEST["labels"]
MEAN = np.array(SPEC["mean"], dtype=np.float32).reshape(3, 1, 1)
STD = np.array(SPEC["std"], dtype=np.float32).reshape(3, 1, 1)

session = ort.InferenceSession(str(ARTIFACT / "model.onnx"), providers=["CPUExecutionProvider"])
INPUT = session.get_inputs()[0].name

app = FastAPI()


@app.post("/classify")
def classify(image: UploadFile = File(...)) -> dict:  # noqa: B008 (FastAPI's idiom)
    img = Image.open(io.BytesIO(image.file.read())).convert("RGB").resize((SPEC["width"], SPEC["height"]))
    x = (np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0 - MEAN) / STD
    logits = session.run(None, {INPUT: x[None]})[0][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:5]
    return {"predictions": [{"label": LABELS[i], "score": float(probs[i])} for i in top]}
