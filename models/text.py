"""Text preprocessing, built from the manifest and shared by training, export parity and serving.

`TextTokenizer(spec, path)` loads the artifact's `tokenizer.json` with the `tokenizers` library
(no transformers, no torch), truncates every text at the manifest's `max_length`, and pads each
batch to its longest text only: a short request does not pay for a long one, and the attention
mask keeps padding from changing any text's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from .errors import ArtifactError
from .manifest import TextPreprocessing

# Names the pad token goes by in the tokenizer families graft has seen (BERT, RoBERTa, T5...).
_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>")


@dataclass(frozen=True)
class TokenBatch:
    """One padded batch: int64 arrays of shape (batch, longest text in the batch)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def feeds(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The arrays a graph asks for, by input name (graphs need not take token_type_ids)."""
        arrays = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }
        unknown = [n for n in names if n not in arrays]
        if unknown:
            raise ArtifactError(f"text model asks for inputs {unknown}; graft provides {sorted(arrays)}")
        return {n: arrays[n] for n in names}

    @property
    def lengths(self) -> np.ndarray:
        """Real (unpadded) token count of each text."""
        return self.attention_mask.sum(1)


@dataclass(frozen=True)
class TokenRow:
    """One text already turned into token ids elsewhere (a KServe v2 client's tensors): the three
    sequences `TextTokenizer.pad` reads from a tokenizers `Encoding`."""

    ids: np.ndarray
    attention_mask: np.ndarray
    type_ids: np.ndarray


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The pad token id: from the file's padding block, else by the usual pad token names."""
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in _PAD_TOKENS:
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            return tid
    raise ArtifactError("the tokenizer has no pad token; add one to tokenizer.json (padding.pad_id)")


class TextTokenizer:
    """The eval/serving tokenizer of one artifact: truncate at max_length, pad to the batch's longest."""

    def __init__(self, spec: TextPreprocessing, tokenizer_path: Path | str) -> None:
        self.spec = spec
        try:
            tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise ArtifactError(f"{tokenizer_path}: not a valid tokenizers JSON file ({e})") from e
        self.pad_id = pad_id_of(tok)
        # Padding is done here, not by the library: its "fixed" strategy (as saved by many hub
        # tokenizers) would pad every text to max_length and cost 2-5x the compute on tweets.
        tok.no_padding()
        tok.enable_truncation(max_length=spec.max_length)
        self._tok = tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        """Id of a token such as "[MASK]", or None when the vocabulary lacks it."""
        return self._tok.token_to_id(token)

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        """Tokenize without padding (each encoding at its own length, at most max_length)."""
        if self.spec.lowercase:
            texts = [t.lower() for t in texts]
        return self._tok.encode_batch(list(texts), add_special_tokens=True)

    def pad(self, encodings: Sequence[Encoding | TokenRow]) -> TokenBatch:
        """Right-pad encodings (or token rows) to the longest one among them."""
        n = len(encodings)
        longest = max((len(e.ids) for e in encodings), default=0)
        ids = np.full((n, longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, longest), dtype=np.int64)
        types = np.zeros((n, longest), dtype=np.int64)
        for i, e in enumerate(encodings):
            k = len(e.ids)
            ids[i, :k] = e.ids
            mask[i, :k] = e.attention_mask
            types[i, :k] = e.type_ids
        return TokenBatch(ids, mask, types)

    def __call__(self, texts: Sequence[str]) -> TokenBatch:
        """Texts to one padded batch (the whole path: evaluation, parity and serving)."""
        return self.pad(self.encode(texts))


def load_text_tokenizer(spec: TextPreprocessing, artifact_dir: Path | str) -> TextTokenizer:
    """The tokenizer an artifact declares in its manifest."""
    return TextTokenizer(spec, Path(artifact_dir) / spec.tokenizer_file)
