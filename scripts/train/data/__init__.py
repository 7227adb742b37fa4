"""Datasets for fine-tuning, one module per format: Fashion-MNIST and image folders (`images`),
CSV/JSONL texts (`text`, and `tokens` for their tokenized batches), COCO detection sets
(`coco`), and the generated detection demo scenes (`detection_demo`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np


def hash_arrays(*arrays: np.ndarray | Sequence[Any]) -> str:
    """sha256 over arrays (bytes) or sequences (their JSON), to identify a dataset exactly."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, np.ndarray):
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        else:
            h.update(json.dumps(list(a), ensure_ascii=False, default=str).encode())
    return h.hexdigest()
