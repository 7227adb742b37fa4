"""Write and load artifact folders: `model.onnx` + `manifest.json` + whatever the manifest lists.

Loading is strict. The manifest must parse and validate, every file it lists must exist with
the recorded sha256, and the model file and the tokenizer (for text) must be among them. A
failure raises ArtifactError with a message that names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from .errors import ArtifactError
from .manifest import Manifest, TextPreprocessing
from .versions import shared_file_mode

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def new_version(now: datetime | None = None) -> str:
    """A sortable, unique version id: UTC timestamp (to the millisecond) plus a random hex suffix.

    e.g. 20261127T211510123Z-4f2a9c. Ids sort by creation time, even within one second.
    """
    now = now or datetime.now(UTC)
    return f"{now.strftime('%Y%m%dT%H%M%S')}{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Artifact:
    """A verified artifact folder and its parsed manifest."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    def file(self, name: str) -> Path:
        """Path of a file the manifest lists; refuses names that are not listed."""
        if name not in self.manifest.files:
            raise ArtifactError(f"{self.path}: {name!r} is not listed in manifest.files")
        return self.path / name


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Fill `files` with the sha256 of every file in `folder` (except the manifest) and write it.

    The manifest is written to a temporary file and renamed, so a reader never sees half of it.
    """
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            files[p.relative_to(folder).as_posix()] = sha256_file(p)
    if manifest.model_file not in files:
        raise ArtifactError(f"{folder}: model file {manifest.model_file!r} is missing")
    manifest = manifest.model_copy(update={"files": files})
    # Round-trip through validation: never write something the loader would refuse.
    Manifest.model_validate(json.loads(manifest.model_dump_json()))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(manifest.model_dump_json(indent=2))
        f.write("\n")
        # mkstemp makes the file 0600: servers that read a shared registry as another user (the
        # image runs as uid 10001) would refuse every version published by someone else.
        os.fchmod(f.fileno(), shared_file_mode())
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def read_manifest(folder: Path) -> Manifest:
    """Parse and validate `manifest.json` without checking file hashes."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    if "schema_version" not in raw:
        raise ArtifactError(f"{path}: missing schema_version")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise ArtifactError(f"{path}: invalid manifest: {problems}") from e


def load_artifact(
    folder: Path | str, *, verify: bool = True, hash_file: Callable[[Path], str] = sha256_file
) -> Artifact:
    """Load an artifact folder; with `verify`, check every listed file's sha256 (computed by
    `hash_file`: a server passes one that remembers checksums, models.checksums)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a directory")
    manifest = read_manifest(folder)
    if manifest.version != folder.name:
        raise ArtifactError(f"{folder}: manifest version {manifest.version!r} does not match the folder name")
    required = {manifest.model_file}
    if isinstance(manifest.preprocessing, TextPreprocessing):
        required.add(manifest.preprocessing.tokenizer_file)
    if manifest.warmup is not None:
        required.add(manifest.warmup.file)
    missing = sorted(required - manifest.files.keys())
    if missing:
        raise ArtifactError(f"{folder}: manifest.files does not list {', '.join(missing)}")
    if verify:
        for rel, expected in manifest.files.items():
            p = (folder / rel).resolve()
            if folder.resolve() not in p.parents:
                raise ArtifactError(f"{folder}: file {rel!r} points outside the artifact")
            if not p.is_file():
                raise ArtifactError(f"{folder}: {rel} is missing")
            actual = hash_file(p)
            if actual != expected:
                raise ArtifactError(
                    f"{folder}: checksum mismatch for {rel} (manifest {expected[:12]}..., file {actual[:12]}...); "
                    "the file was changed after export"
                )
    return Artifact(path=folder, manifest=manifest)
