"""Remembered sha256 checksums, so that a server verifies each artifact file once, not once per
worker and per start.

`models.artifact.load_artifact` checks every file of a version against the sha256 its manifest
records. Hashing a version's files (the model, its training checkpoint, the tokenizer: about
120 MB for the three default models) costs each worker a few tenths of a second of CPU at every
start, the same work every time. `ChecksumCache` remembers, per version folder, each file's
sha256 together with the file's stamp: device, inode, size, modification and change times
(nanoseconds). A file whose stamp is unchanged is the file that was hashed; any write to it,
a copy over it, or a different file moved in its place changes the stamp (the change time
cannot be set back by a user), and the file is hashed again. The cache stores what the hash
*was*; the loader still compares it with the manifest every time.

Two guards, from git's "racy clean" problem: a file changed within `SETTLE_S` of being hashed is
not remembered (file times tick coarsely, so a second write in the same tick could keep the
stamp), and a stamp that changed while the file was being hashed is not remembered either.

Workers of one server share a cache folder; a version's entry is read and written under a file
lock, so that the second worker to start waits for the first one's hashes instead of redoing
them. The folder must be private to the server's user (the caller checks; see service/state.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Files changed less than this long before they are hashed are hashed again next time.
SETTLE_S = 2.0

Stamp = tuple[int, int, int, int, int]
Hasher = Callable[[Path], str]


def file_stamp(path: Path) -> Stamp:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ChecksumCache:
    """sha256 of artifact files, remembered in `folder` (one small JSON file per version folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _entry(self, version_folder: Path) -> Path:
        key = hashlib.sha256(str(Path(version_folder).resolve()).encode()).hexdigest()[:32]
        return self.folder / f"{key}.json"

    @contextlib.contextmanager
    def version(self, version_folder: Path, hash_file: Hasher) -> Iterator[Hasher]:
        """A hasher for the files of one version: remembered checksums where the file's stamp is
        unchanged, `hash_file` otherwise. Holds the version's lock until the block ends; writes
        what it learned when the block ends without an exception."""
        entry = self._entry(version_folder)
        with open(entry.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                known = _read(entry)
                learned: dict[str, list[object]] = {}

                def hasher(path: Path) -> str:
                    key = str(Path(path).resolve())
                    stamp = file_stamp(path)
                    remembered = known.get(key)
                    if remembered is not None and tuple(remembered[:5]) == stamp:
                        return str(remembered[5])
                    started = time.time()
                    digest = hash_file(path)
                    settled = stamp[4] / 1e9 <= started - SETTLE_S
                    if settled and file_stamp(path) == stamp:
                        learned[key] = [*stamp, digest]
                    return digest

                yield hasher
                if learned:
                    _write(entry, {**known, **learned})
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, list[object]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no entry yet, or an unreadable one: hash again
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 6}


def _write(path: Path, data: dict[str, list[object]]) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError:
        return  # a full or read-only folder only costs the next start its hashing
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
