"""Texts tokenized once by the serving tokenizer, and batches of similar lengths.

Batches are padded to their longest text, not to max_length: on tweets that is 2-3x cheaper.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from models.text import TextTokenizer

from .text import TextSplit


def length_batches(lengths: np.ndarray, batch_size: int, rng: random.Random, shuffle: bool) -> list[np.ndarray]:
    """Index batches of similar lengths (little padding); with shuffle, random within and across chunks."""
    idx = np.arange(len(lengths))
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    perm = idx.copy()
    rng.shuffle(perm)  # type: ignore[arg-type]
    chunk = batch_size * 50
    batches = []
    for i in range(0, len(perm), chunk):
        part = perm[i : i + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


class EncodedSplit:
    """A split tokenized once by the serving tokenizer; batches are padded on demand."""

    def __init__(self, split: TextSplit, tok: TextTokenizer) -> None:
        self.encodings = tok.encode(split.texts)
        self.labels = np.asarray(split.labels, dtype=np.int64)
        self.lengths = np.array([len(e.ids) for e in self.encodings])
        self.tok = tok

    def __len__(self) -> int:
        return len(self.encodings)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the texts at `idx`, padded to the longest of them."""
        b = self.tok.pad([self.encodings[i] for i in idx])
        return torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask)

    def in_order(self, batch_size: int) -> list[np.ndarray]:
        """Batches covering the split once, sorted by length (for prediction)."""
        return length_batches(self.lengths, batch_size, random.Random(0), shuffle=False)
