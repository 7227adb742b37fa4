"""Turn raw model outputs into answers. Shared by evaluation and serving; numpy only."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[dict[str, float | str]]:
    """The k most probable labels of one probability vector, highest first (ties by label order)."""
    k = max(1, min(int(k), len(labels)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i], "score": float(probs[i])} for i in order]
