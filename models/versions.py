"""Registry layout: `<root>/<name>/<version>/` folders, an optional `<name>/CURRENT` pin, and
`<root>/.staging/` where new versions are assembled before an atomic rename publishes them.

This module only reads and writes the layout; it does not open models. Which version is
served is decided in `models.servable`: the pinned one, or else the newest version that opens.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import ArtifactError

PIN_FILE = "CURRENT"
# Hidden, at the registry root, never inside a model folder: a half-built version (a fine-tune
# still running, or killed) must not make a model name look like it has nothing to serve.
STAGING_DIR = ".staging"
REPO_REGISTRY = Path(__file__).resolve().parent / "registry"


def default_registry() -> Path:
    """The registry every tool and the server use unless told otherwise: $MODEL_REGISTRY, else
    models/registry in this checkout."""
    return Path(os.environ.get("MODEL_REGISTRY") or REPO_REGISTRY)


def staging_folder(root: Path, name: str, version: str) -> Path:
    """A new, empty folder on the registry's filesystem where a version is assembled."""
    folder = Path(root) / STAGING_DIR / name / version
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def publish_folder(staged: Path, root: Path, name: str, version: str) -> Path:
    """Move a complete staged version into place with one rename: readers see all of it or none."""
    if not _NAME.match(name):
        raise ArtifactError(f"{name!r} is not a valid model name (letters, digits, '.', '_', '-'; at most 64)")
    final = Path(root) / name / version
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise ArtifactError(f"{final} already exists")
    os.replace(staged, final)
    with contextlib.suppress(OSError):  # the per-name staging folder, when no other build uses it
        staged.parent.rmdir()
    return final


def discard_staging(staged: Path) -> None:
    """Remove a staged version that will not be published (and its per-name folder when empty)."""
    shutil.rmtree(staged, ignore_errors=True)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[0-9]{8}T[0-9]{6}([0-9]{3})?Z-[0-9a-f]{6,12}$")


def is_version_name(s: str) -> bool:
    return bool(_VERSION.match(s))


def shared_file_mode() -> int:
    """0644 less the umask: registry files are read by servers running as another user.

    The umask is read from /proc (os.umask can only read it by changing it, process-wide).
    """
    umask = 0o022
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
                break
    except (OSError, ValueError, IndexError):
        pass
    return 0o644 & ~umask


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
        os.fchmod(f.fileno(), shared_file_mode())  # mkstemp's 0600 would hide the pin from the servers
    os.replace(tmp, path)


def candidates(root: Path, name: str) -> list[str]:
    """Versions to try, in order: the pinned one alone, else every version newest first."""
    pin = read_pin(root, name)
    if pin is not None:
        return [pin]
    return list(reversed(list_versions(root, name)))


Stamp = tuple[tuple[str, int, int], ...]


def version_stamp(folder: Path) -> Stamp:
    """(file, size, mtime) of every file in a version folder: changes whenever any file does.

    A version copied in two steps (manifest first, model later, as `kubectl cp` may) is refused
    at first and must be retried once its files change, whichever file lands last.
    """
    out = []
    try:
        for p in sorted(Path(folder).rglob("*")):
            try:
                st = p.stat()
            except OSError:
                continue
            if p.is_file():
                out.append((p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    except OSError:
        return ()
    return tuple(out)


def signature(root: Path) -> tuple[object, ...]:
    """A cheap fingerprint of the registry (names, pins, every version's files) to detect changes by polling."""
    root = Path(root)
    items: list[object] = []
    for name in list_models(root):
        folder = root / name
        try:
            pin = folder / PIN_FILE
            if pin.exists():
                st = pin.stat()
                items.append((f"{name}/{PIN_FILE}", st.st_size, st.st_mtime_ns))
            else:
                items.append((name,))
            for v in list_versions(root, name):
                items.append((f"{name}/{v}", version_stamp(folder / v)))
        except OSError:
            continue
    return tuple(items)
