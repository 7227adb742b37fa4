"""Serving logic for sentiment: texts -> tokens -> batched ONNX runs -> label scores.

Each text of a request goes through the batcher as its own item, so texts from concurrent
requests share ONNX runs and a 64-text request is cut into runs of at most max_batch_size
(a request-sized item would make batch sizes unbounded: 32 such items could be 2,048 rows).
A batch is padded to its longest text; the attention mask keeps padding out of every other
text's logits, so a text gets the same answer alone or among others.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Encoding

from models.errors import ArtifactError, InvalidInput
from models.manifest import TextPreprocessing
from models.text import TextTokenizer, load_text_tokenizer

from ..batching import QueueFull
from ..config import Settings
from ..served import ServedModel, register_task


def parse_sentiment_body(body: bytes, settings: Settings) -> tuple[list[str], str | None]:
    """`{"texts": [...], "model"?: "..."}` from raw request bytes, or InvalidInput naming the problem."""
    if not body:
        raise InvalidInput('empty body; send JSON like {"texts": ["..."]}')
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start})") from e
    try:
        payload = json.loads(decoded)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
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
            raise ArtifactError(f"{self.artifact.path}: a sentiment model needs text preprocessing")
        self.tokenizer: TextTokenizer = load_text_tokenizer(spec, self.artifact.path)
        self.labels = self.manifest.labels

    def run_batch(self, items: Sequence[Encoding]) -> list[np.ndarray]:
        batch = self.tokenizer.pad(items)
        (logits,) = self.session.run(self.output_names[:1], batch.feeds(self.input_names))
        return list(logits)

    def bytes_to_feeds(self, items: list[bytes]) -> dict[str, np.ndarray]:
        """v2 protocol: a BYTES tensor of UTF-8 texts, checked against the same limits as /sentiment."""
        texts = []
        for i, raw in enumerate(items):
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InvalidInput(f"text {i} is not valid UTF-8 (byte offset {e.start})") from e
        texts = validate_texts(texts, max_texts=self.settings.max_texts, max_chars=self.settings.max_text_chars)
        return self.tokenizer(texts).feeds(self.input_names)

    def logits_for_texts(self, texts: Sequence[str]) -> np.ndarray:
        """One padded batch straight through the model (warm-up and tests; bypasses the batcher)."""
        return np.stack(self.run_batch(self.tokenizer.encode(texts)))

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
        """Scores for each text; tokenized off the event loop, each text batched with others."""
        b = self.batcher
        if b.pending + len(texts) > b.max_queue:
            # Refuse the whole request up front rather than queue part of it.
            raise QueueFull(f"{b.name}: {b.pending} texts queued, {len(texts)} more would pass {b.max_queue}")
        loop = asyncio.get_running_loop()
        encodings = await loop.run_in_executor(self.cpu_executor, self.tokenizer.encode, texts)
        logits = await asyncio.gather(*(b.submit(e) for e in encodings))
        return [self.answer(x) for x in logits]
