"""The shifted test split for sentiment: the held-out texts re-rendered the way other sources write.

A model fine-tuned on tweets meets text from forums, chat apps, reviews and transcripts, which
say the same things in other clothes: no @mentions, links or hashtags, other casing, dropped or
doubled punctuation, typos, emoji. `rerender` makes one such version of a text; `shifted_split`
applies it to every text of a test split with the labels kept, so the shifted split removes
nothing from training and is never used for any choice during training (only `evaluate` scores
it). Each text's edits come from a random generator seeded by (seed, text), so the split is
deterministic and a quick recipe's shifted texts are a subset of the default recipe's.

The edits keep the label: words are never swapped for others (an abbreviation list excepted, of
neutral words only), and the added emoji carry no sentiment. Casing changes do nothing to an
uncased tokenizer (the packaged MiniLM-L6 lowercases), but a cased `--backbone` sees them.

No torch here: tests and the study harness rebuild the split with this module alone.
"""

from __future__ import annotations

import random
import re

from .text import TextSplit

SPLIT_NAME = "test-rerendered"
DESCRIPTION = (
    "the test texts re-rendered as other sources write (deterministic per seed and text): @mentions, "
    "links and 'RT' prefixes dropped or replaced, hashtags made words, casing changed, punctuation "
    "dropped or doubled, chat abbreviations, typos in about 1 word of 8, neutral emoji; labels kept"
)

_MENTION_RE = re.compile(r"(?<!\w)@\w+")
_RT_RE = re.compile(r"^\s*(?:rt\s+)?@\w+:\s*", re.IGNORECASE)
_URL_RE = re.compile(r"\bhttps?\b\S*|\bt\.co/\S*|\bwww\.\S+", re.IGNORECASE)  # truncated "http:…" too
_WORD_RE = re.compile(r"[A-Za-z]{4,}")
_PUNCT_RE = re.compile(r"[.,;:!?\"'()\u2018\u2019\u201c\u201d\u2026-]")
_SPACES_RE = re.compile(r"\s+")

# Neutral words only: "good" -> "gud" would be fine too, but a list that leaves sentiment words
# alone cannot flip a label by mistake.
_CHAT = {"you": "u", "are": "r", "your": "ur", "please": "pls", "because": "bc", "with": "w/", "and": "&"}
_CHAT_RE = re.compile(r"\b(" + "|".join(_CHAT) + r")\b", re.IGNORECASE)
_EMOJI = ("\U0001f4f1", "\u2708\ufe0f", "\U0001f697", "\U0001f3c8", "\U0001f4f0", "\U0001f440", "\U0001f4ac")
# Neighbours on a QWERTY keyboard, for substitution typos.
_KEYS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEAR = {c: "".join(row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)) for row in _KEYS for i, c in enumerate(row)}


def _typo(word: str, rng: random.Random) -> str:
    """One keyboard slip inside a word: swap, drop, double or hit a neighbouring key."""
    i = rng.randrange(1, len(word) - 1)  # first and last letters stay: the word stays readable
    kind = rng.randrange(4)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    if kind == 2:
        return word[:i] + word[i] + word[i:]
    near = _NEAR.get(word[i].lower(), word[i])
    return word[:i] + rng.choice(near) + word[i + 1 :]


def _platform(text: str, rng: random.Random) -> str:
    """Strip what only tweets have: retweet prefixes, @mentions, links, hashtag signs."""
    text = _RT_RE.sub("", text)
    mention = rng.choice(["", "", "@user", "someone"])
    text = _MENTION_RE.sub(mention, text)
    text = _URL_RE.sub(rng.choice(["", "[link]"]), text)
    return text.replace("#", "")  # hashtags become words


def _casing(text: str, rng: random.Random) -> str:
    style = rng.randrange(4)
    if style == 0:
        return text.lower()
    if style == 1:
        return text.upper()
    if style == 2:
        return text[:1].upper() + text[1:].lower()
    return text


def _punctuation(text: str, rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return _PUNCT_RE.sub("", text)
    if style == 1:
        return re.sub(r"([!?.])", lambda m: m.group(1) * rng.randint(2, 3), text)
    return text


def rerender(text: str, rng: random.Random, typo_rate: float = 0.125) -> str:
    """One text as another source might write it; always differs from the input when it has a letter."""
    out = _platform(text, rng)
    if rng.random() < 0.5:
        out = _CHAT_RE.sub(lambda m: _CHAT[m.group(1).lower()], out)
    out = _punctuation(out, rng)
    out = _WORD_RE.sub(lambda m: _typo(m.group(0), rng) if rng.random() < typo_rate else m.group(0), out)
    out = _casing(out, rng)
    if rng.random() < 0.25:
        out = f"{out} {rng.choice(_EMOJI)}"
    out = _SPACES_RE.sub(" ", out).strip()
    if out.lower() == text.lower() or not out:
        # Nothing visible to an uncased tokenizer changed: force a typo in the longest word.
        base = out or text
        words = sorted(_WORD_RE.finditer(base), key=lambda m: -len(m.group(0)))
        for _ in range(8 if words else 0):  # a swap of two equal letters changes nothing: try again
            m = words[0]
            out = base[: m.start()] + _typo(m.group(0), rng) + base[m.end() :]
            if out.lower() != text.lower():
                return out
        out = f"{base} {rng.choice(_EMOJI)}"
    return out


def shifted_split(split: TextSplit, seed: int) -> TextSplit:
    """Every text of `split` re-rendered, labels kept; deterministic given the seed and the texts."""
    texts = [rerender(t, random.Random(f"{seed}\0{t}")) for t in split.texts]
    return TextSplit(texts, list(split.labels))
