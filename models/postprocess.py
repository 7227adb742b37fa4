"""Turn raw model outputs into answers. Shared by evaluation and serving; numpy only."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def rank(probs: np.ndarray) -> np.ndarray:
    """Indices that sort each row of probabilities from most to least probable (ties by index)."""
    return np.argsort(-np.asarray(probs), axis=-1, kind="stable")


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[dict[str, float | str]]:
    """The k most probable labels of one probability vector, highest first (ties by label order)."""
    return top_k_ranked(np.asarray(probs).tolist(), rank(probs).tolist(), labels, k)


def top_k_ranked(probs: list[float], order: list[int], labels: list[str], k: int) -> list[dict[str, float | str]]:
    """`top_k` from a row already ranked (plain lists: no numpy call, so the GIL is never dropped)."""
    k = max(1, min(int(k), len(labels)))
    return [{"label": labels[i], "score": probs[i]} for i in order[:k]]
