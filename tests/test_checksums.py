"""Remembered checksums (models/checksums.py): unchanged files are not hashed again, anything that
changes a file's stamp is, and the loader still compares every checksum with the manifest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models import checksums
from models.artifact import load_artifact, sha256_file
from models.checksums import ChecksumCache
from models.errors import ArtifactError
from tests.test_artifact import toy  # noqa: F401 (fixture: a small valid artifact folder)


class CountingHasher:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: Path) -> str:
        self.calls.append(Path(path).name)
        return sha256_file(path)


def verify(cache: ChecksumCache, folder: Path) -> list[str]:
    """Load `folder` through the cache; the names of the files that were actually hashed."""
    counting = CountingHasher()
    with cache.version(folder, counting) as hasher:
        load_artifact(folder, hash_file=hasher)
    return sorted(counting.calls)


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written by the test count as settled (in real use: changed more than SETTLE_S ago)."""
    monkeypatch.setattr(checksums, "SETTLE_S", -60.0)


def test_unchanged_files_are_hashed_once_across_loads(toy: Path, tmp_path: Path, settled: None) -> None:  # noqa: F811
    cache = ChecksumCache(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    assert verify(cache, toy) == ["model.onnx", "notes.txt"]
    assert verify(cache, toy) == []
    # Another process (a second worker, a restarted server) reads the same folder.
    assert verify(ChecksumCache(tmp_path / "cache"), toy) == []


def test_a_changed_file_is_hashed_again_and_refused(toy: Path, tmp_path: Path, settled: None) -> None:  # noqa: F811
    cache = ChecksumCache(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    verify(cache, toy)
    (toy / "model.onnx").write_bytes(b"tampered after the checksums were remembered")
    with pytest.raises(ArtifactError, match="checksum mismatch for model.onnx"):
        verify(cache, toy)


def test_a_file_swapped_for_one_of_the_same_size_and_times_is_hashed_again(
    toy: Path,  # noqa: F811
    tmp_path: Path,
    settled: None,
) -> None:
    cache = ChecksumCache(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    verify(cache, toy)
    notes = toy / "notes.txt"
    st = notes.stat()
    replacement = toy / "notes.new"
    replacement.write_text("HELLO")  # as long as "hello"
    replacement.rename(notes)
    os.utime(notes, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old modification time
    with pytest.raises(ArtifactError, match="checksum mismatch for notes.txt"):
        verify(cache, toy)


def test_files_changed_just_before_hashing_are_not_remembered(toy: Path, tmp_path: Path) -> None:  # noqa: F811
    # Fresh files (the fixture just wrote them): a second write in the same tick of the file clock
    # could keep their stamp, so their checksums are not trusted next time.
    cache = ChecksumCache(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    assert verify(cache, toy) == ["model.onnx", "notes.txt"]
    assert verify(cache, toy) == ["model.onnx", "notes.txt"]


def test_a_file_that_changes_while_hashed_is_not_remembered(toy: Path, tmp_path: Path, settled: None) -> None:  # noqa: F811
    cache = ChecksumCache(tmp_path / "cache")
    (tmp_path / "cache").mkdir()

    def hash_then_touch(path: Path) -> str:
        digest = sha256_file(path)
        if path.name == "notes.txt":
            path.write_text("hello")  # same content, new stamp: a copy still landing
        return digest

    with cache.version(toy, hash_then_touch) as hasher:
        load_artifact(toy, hash_file=hasher)
    assert verify(cache, toy) == ["notes.txt"]


def test_an_unreadable_cache_entry_only_costs_a_rehash(toy: Path, tmp_path: Path, settled: None) -> None:  # noqa: F811
    cache = ChecksumCache(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    verify(cache, toy)
    for entry in (tmp_path / "cache").glob("*.json"):
        entry.write_text("{not json")
    assert verify(cache, toy) == ["model.onnx", "notes.txt"]
    assert verify(cache, toy) == []
