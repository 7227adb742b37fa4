"""The naive peer for benchmarks: what a user would write without graft.

FastAPI + uvicorn + PyTorch eager, one image per forward pass, no batching, full-size JPEG
decoding, same weights as the graft artifact (its checkpoint.safetensors) and the same
preprocessing numbers. Started by scripts/bench.py:

    GRAFT_PEER_ARTIFACT=models/registry/image-classification/<version> \
        uvicorn scripts.bench.peer:app --port 3900
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from safetensors.torch import load_file

from models.artifact import load_artifact

ARTIFACT = load_artifact(Path(os.environ["GRAFT_PEER_ARTIFACT"]))
SPEC = ARTIFACT.manifest.preprocessing
LABELS = ARTIFACT.manifest.labels
torch.set_num_threads(int(os.environ.get("GRAFT_PEER_THREADS", "2")))

model = torchvision.models.mobilenet_v2(num_classes=len(LABELS))
model.load_state_dict(load_file(str(ARTIFACT.file("checkpoint.safetensors"))))
model.eval()
MEAN = torch.tensor(SPEC.mean).view(3, 1, 1)
STD = torch.tensor(SPEC.std).view(3, 1, 1)

app = FastAPI()


@app.post("/classify")
def classify(image: UploadFile = File(...)) -> dict:  # noqa: B008 (FastAPI's idiom)
    img = Image.open(io.BytesIO(image.file.read())).convert("RGB").resize((SPEC.width, SPEC.height))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    x = ((x - MEAN) / STD).unsqueeze(0)
    with torch.no_grad():
        probs = torch.softmax(model(x)[0], 0)
    top = torch.topk(probs, 5)
    return {
        "predictions": [{"label": LABELS[i], "score": float(s)} for s, i in zip(top.values, top.indices, strict=True)]
    }
