"""Init container: download a registry archive, check its sha256, unpack it into MODEL_REGISTRY.

Runs in the graft image itself (standard library only): as an init container before the server
starts (into an emptyDir), or as a Job that publishes new versions onto the registry volume.

    MODEL_ARCHIVE_URL     http(s):// or file:// URL of a .tar.gz holding <name>/<version>/... folders
    MODEL_ARCHIVE_SHA256  expected sha256 of the archive (required unless MODEL_ARCHIVE_INSECURE=1)
    MODEL_REGISTRY        where to unpack (default /models), an emptyDir shared with the server

Make the archive from a registry with `tar -C models/registry -czf registry.tar.gz .`. The
server checks every artifact's own manifest checksums when it loads it; this script checks that
the download is the archive you meant.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


def fetch(url: str, dest: Path, timeout: float = 60.0) -> str:
    """Stream `url` into `dest`; returns the sha256 of what was written."""
    if not url.startswith(("https://", "http://", "file://")):
        raise SystemExit(f"MODEL_ARCHIVE_URL must be an http(s):// or file:// URL, got {url!r}")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:  # noqa: S310 (scheme checked)
        while chunk := response.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def unpack(archive: Path, registry: Path) -> list[str]:
    """Unpack into a staging folder inside `registry`, then move each new version folder in.

    Versions are immutable, so a version already present is kept as it is; a moved folder
    appears whole (a rename on one filesystem), so a server scanning the registry never sees a
    half-written version. A CURRENT pin in the archive replaces the one in the registry.
    Returns the `name/version` entries added.
    """
    staging = Path(tempfile.mkdtemp(dir=registry, prefix=".unpack-"))
    added: list[str] = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            # The "data" filter refuses absolute paths, links out of the tree and device files.
            tar.extractall(staging, filter="data")
        models = sorted(p for p in staging.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not models:
            raise SystemExit(f"{archive.name}: no model folders at the top level of the archive")
        for model in models:
            target = registry / model.name
            target.mkdir(exist_ok=True)
            for version in sorted(p for p in model.iterdir() if p.is_dir()):
                if not (target / version.name).exists():
                    os.replace(version, target / version.name)
                    added.append(f"{model.name}/{version.name}")
            pin = model / "CURRENT"
            if pin.is_file():
                os.replace(pin, target / "CURRENT")
        return added
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> int:
    url = os.environ.get("MODEL_ARCHIVE_URL", "")
    expected = os.environ.get("MODEL_ARCHIVE_SHA256", "").strip().lower()
    insecure = os.environ.get("MODEL_ARCHIVE_INSECURE") == "1"
    registry = Path(os.environ.get("MODEL_REGISTRY") or "/models")
    if not url:
        raise SystemExit("MODEL_ARCHIVE_URL is not set")
    if not expected and not insecure:
        raise SystemExit("MODEL_ARCHIVE_SHA256 is not set (set MODEL_ARCHIVE_INSECURE=1 to skip the check)")
    registry.mkdir(parents=True, exist_ok=True)
    # Download next to the registry (same volume), not into the small /tmp emptyDir.
    with tempfile.TemporaryDirectory(dir=registry, prefix=".download-") as tmp:
        archive = Path(tmp) / "registry.tar.gz"
        print(f"fetching {url}", flush=True)
        actual = fetch(url, archive)
        if expected and actual != expected:
            raise SystemExit(f"sha256 mismatch for {url}: expected {expected}, got {actual}")
        added = unpack(archive, registry)
    summary = ", ".join(added) or "nothing (every version was already there)"
    print(f"archive {actual[:12]}: added {summary} to {registry}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
