"""Serving logic for sentiment: texts -> tokens -> batched ONNX runs -> label scores.

Each text of a request goes through the batcher as its own item, so texts from concurrent
requests share ONNX runs and a 64-text request is cut into runs of at most max_batch_size
(a request-sized item would make batch sizes unbounded: 32 such items could be 2,048 rows).
A batch is padded to its longest text; the attention mask keeps padding out of every other
text's logits, so a text gets the same answer alone or among others.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Encoding

from models.errors import ArtifactError, InvalidInput
from models.manifest import TextPreprocessing
from models.preprocess import MemoryHold
from models.text import TextTokenizer, TokenRow, load_text_tokenizer

from ..batching import QueueFull
from ..bodies import parse_held
from ..config import Settings
from ..served import ServedModel, register_task


def parse_sentiment_body(
    body: bytes, settings: Settings, budget: MemoryHold | None = None
) -> tuple[list[str], str | None]:
    """`{"texts": [...], "model"?: "..."}` from raw request bytes, or InvalidInput naming the problem.

    A large body is parsed with its memory held in `budget` (see service/bodies.py).
    """
    if not body:
        raise InvalidInput('empty body; send JSON like {"texts": ["..."]}')
    return parse_held(body, lambda payload: _sentiment_fields(payload, settings), budget)


def _sentiment_fields(payload: object, settings: Settings) -> tuple[list[str], str | None]:
    if not isinstance(payload, dict):
        raise InvalidInput(f'body must be a JSON object like {{"texts": ["..."]}}, got {_json_type(payload)}')
    unknown = sorted(set(payload) - {"texts", "model"})
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(map(repr, unknown))}; expected 'texts' and optional 'model'")
    if "texts" not in payload:
        raise InvalidInput("missing field 'texts' (a list of strings)")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidInput(f"'model' must be a string, got {_json_type(model)}")
    texts = validate_texts(payload["texts"], max_texts=settings.max_texts, max_chars=settings.max_text_chars)
    return texts, model or None


def validate_texts(texts: object, *, max_texts: int, max_chars: int) -> list[str]:
    """The request's `texts`, or InvalidInput naming the first problem and the limit."""
    if not isinstance(texts, list):
        raise InvalidInput(f"'texts' must be a list of strings, got {_json_type(texts)}")
    if not texts:
        raise InvalidInput("'texts' is empty; send at least one text")
    if len(texts) > max_texts:
        raise InvalidInput(
            f"'texts' has {len(texts)} items; the limit is {max_texts} per request (GRAFT_MAX_TEXTS)", status_code=413
        )
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"texts[{i}] must be a string, got {_json_type(t)}")
        if len(t) > max_chars:
            raise InvalidInput(
                f"texts[{i}] has {len(t)} characters; the limit is {max_chars} (GRAFT_MAX_TEXT_CHARS)",
                status_code=413,
            )
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            # JSON allows "\ud800" escapes; such a string is not text and the tokenizer refuses it.
            raise InvalidInput(f"texts[{i}] contains an unpaired UTF-16 surrogate at character {e.start}") from e
    return texts


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(v), type(v).__name__)


@register_task
class SentimentClassifier(ServedModel):
    task = "sentiment"
    bytes_input_name = "text"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        spec = self.manifest.preprocessing
        if not isinstance(spec, TextPreprocessing):
            raise ArtifactError(f"{self.artifact.path.name}: a sentiment model needs text preprocessing")
        self.tokenizer: TextTokenizer = load_text_tokenizer(spec, self.artifact.path)
        self.max_length = spec.max_length
        self.labels = self.manifest.labels

    def collate(self, items: Sequence[Encoding | TokenRow]) -> dict[str, np.ndarray]:
        return self.tokenizer.pad(items).feeds(self.input_names)

    def rows_from_bytes(self, items: list[bytes]) -> list[Encoding]:
        """v2 protocol: a BYTES tensor of UTF-8 texts, checked against the same limits as /sentiment."""
        texts = []
        for i, raw in enumerate(items):
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InvalidInput(f"text {i} is not valid UTF-8 (byte offset {e.start})") from e
        texts = validate_texts(texts, max_texts=self.settings.max_texts, max_chars=self.settings.max_text_chars)
        return self.tokenizer.encode(texts)

    def rows_from_tensors(self, tensors: dict[str, np.ndarray]) -> list[TokenRow]:
        """v2 protocol: token ids the client made itself, held to what the tokenizer could make:
        at most max_length tokens, ids inside the vocabulary, 0/1 attention, one segment."""
        shapes = {name: arr.shape for name, arr in tensors.items()}
        if len(set(shapes.values())) != 1:
            raise InvalidInput(f"inputs must all have one [batch, sequence] shape, got {shapes}")
        ids = tensors["input_ids"]
        n, length = ids.shape
        if not 1 <= length <= self.max_length:
            raise InvalidInput(
                f"sequence length {length} is outside 1 to {self.max_length}, this model's max_length "
                "(manifest preprocessing.max_length); truncate the token ids"
            )
        vocab = self.tokenizer.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise InvalidInput(
                f"input_ids holds {bad}, outside this model's vocabulary of {vocab} tokens (0 to {vocab - 1})"
            )
        mask = tensors.get("attention_mask")
        if mask is None:
            mask = np.ones_like(ids)
        elif not np.isin(mask, (0, 1)).all():
            raise InvalidInput("attention_mask must hold only 0 and 1")
        elif not mask.any(axis=1).all():
            raise InvalidInput(f"attention_mask row {int(np.argmin(mask.any(axis=1)))} attends to no token")
        types = tensors.get("token_type_ids")
        if types is None:
            types = np.zeros_like(ids)
        elif types.any():
            raise InvalidInput("token_type_ids must be all 0: this model classifies one text (one segment) at a time")
        return [TokenRow(ids[i], mask[i], types[i]) for i in range(n)]

    def logits_for_texts(self, texts: Sequence[str]) -> np.ndarray:
        """One padded batch straight through the model (tests; bypasses the batcher)."""
        return self.run_feeds(self.collate(self.tokenizer.encode(texts)))[self.output_names[0]]

    def answer(self, logits: np.ndarray) -> dict[str, Any]:
        # Plain Python on a handful of floats: this runs on the event loop once per text, and
        # numpy's ufuncs drop the GIL, so each call would queue behind the busy worker threads.
        z = logits.tolist()
        top = max(z)
        e = [math.exp(v - top) for v in z]
        total = sum(e)
        probs = [v / total for v in e]
        best = max(range(len(probs)), key=probs.__getitem__)
        return {
            "label": self.labels[best],
            "score": probs[best],
            "scores": dict(zip(self.labels, probs, strict=True)),
        }

    async def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """Scores for each text. One text: run at once when alone, else batched with others. Several:
        tokenized off the event loop, each text batched as its own item."""
        logits = self.output_names[0]
        if len(texts) == 1:
            row, _ = await self.run_one(lambda _hold: (self.tokenizer.encode(texts)[0], None), len(texts[0]))
            return [self.answer(row.outputs[logits])]
        b = self.batcher
        if b.pending + len(texts) > b.max_queue:
            # Refuse the whole request up front rather than tokenize it for nothing.
            raise QueueFull(f"{b.name}: {b.pending} texts queued, {len(texts)} more would pass {b.max_queue}")
        encodings = await asyncio.get_running_loop().run_in_executor(self.cpu_executor, self.tokenizer.encode, texts)
        return [self.answer(r.outputs[logits]) for r in await self.submit_all(encodings)]
