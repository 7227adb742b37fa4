"""Registry layout: `<root>/<name>/<version>/` folders and an optional `<name>/CURRENT` pin.

This module only reads and writes the layout; it does not open models. Which version is
served is decided by the loader: the pinned one, or else the newest version that validates.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import ArtifactError

PIN_FILE = "CURRENT"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[0-9]{8}T[0-9]{6}([0-9]{3})?Z-[0-9a-f]{6,12}$")


def is_version_name(s: str) -> bool:
    return bool(_VERSION.match(s))


def list_models(root: Path) -> list[str]:
    """Model names in the registry (folders with a valid name), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def list_versions(root: Path, name: str) -> list[str]:
    """Version folders of one model, oldest first (version ids sort by time)."""
    folder = Path(root) / name
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and is_version_name(p.name))


def read_pin(root: Path, name: str) -> str | None:
    """The pinned version, or None when there is no CURRENT file. A malformed pin is an error."""
    path = Path(root) / name / PIN_FILE
    if not path.is_file():
        return None
    pin = path.read_text(encoding="utf-8", errors="replace").strip()
    if not is_version_name(pin):
        raise ArtifactError(f"{path}: {pin!r} is not a version id")
    return pin


def write_pin(root: Path, name: str, version: str | None) -> None:
    """Pin `version` (atomic rename), or remove the pin when version is None."""
    folder = Path(root) / name
    path = folder / PIN_FILE
    if version is None:
        path.unlink(missing_ok=True)
        return
    if not (folder / version).is_dir():
        raise ArtifactError(f"{folder}: no version {version}")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".CURRENT.")
    with os.fdopen(fd, "w") as f:
        f.write(version + "\n")
    os.replace(tmp, path)


def candidates(root: Path, name: str) -> list[str]:
    """Versions to try, in order: the pinned one alone, else every version newest first."""
    pin = read_pin(root, name)
    if pin is not None:
        return [pin]
    return list(reversed(list_versions(root, name)))


def signature(root: Path) -> tuple[tuple[str, float], ...]:
    """A cheap fingerprint of the registry (folder and pin mtimes) to detect changes by polling."""
    root = Path(root)
    items: list[tuple[str, float]] = []
    for name in list_models(root):
        folder = root / name
        try:
            items.append((name, folder.stat().st_mtime))
            pin = folder / PIN_FILE
            if pin.exists():
                items.append((f"{name}/{PIN_FILE}", pin.stat().st_mtime))
            for v in list_versions(root, name):
                manifest = folder / v / "manifest.json"
                items.append((f"{name}/{v}", manifest.stat().st_mtime if manifest.exists() else 0.0))
        except OSError:
            continue
    return tuple(items)
