"""Registry faults as operators cause them, for the lifecycle, servable and chaos tests.

Every helper writes into a registry the way a real publisher would: new versions through the
hidden staging folder and one rename (as `finetune` and `registry import` do), or, for the
faults themselves, exactly the half-finished or broken state the issue describes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from models import versions
from models.artifact import MANIFEST, new_version, write_manifest
from models.manifest import Manifest


def _new_id() -> str:
    version = new_version()
    time.sleep(0.002)  # version ids order by millisecond
    return version


def publish_copy(src: Path, registry: Path, *, mutate: Callable[[Path], None] | None = None) -> str:
    """Publish a copy of the artifact `src` as a new version of its model, atomically.

    `mutate(folder)` changes the staged copy before its manifest (and so every checksum) is
    rewritten: the result is a version whose checksums are right whatever `mutate` broke.
    """
    name, version = src.parent.name, _new_id()
    staged = versions.staging_folder(registry, name, version)
    shutil.copytree(src, staged, dirs_exist_ok=True)
    if mutate is not None:
        mutate(staged)
    manifest = Manifest.model_validate_json((staged / MANIFEST).read_text())
    write_manifest(staged, manifest.model_copy(update={"version": version}))
    versions.publish_folder(staged, registry, name, version)
    return version


def truncate_model(folder: Path) -> None:
    """model.onnx cut in half before it was hashed: ONNX Runtime cannot parse it."""
    path = folder / "model.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def future_opset(folder: Path) -> None:
    """model.onnx stamped with an opset this ONNX Runtime does not have (a newer exporter's)."""
    import onnx

    path = folder / "model.onnx"
    model = onnx.load(str(path))
    model.opset_import[0].version = 99
    onnx.save(model, str(path))


def unknown_op_domain(folder: Path) -> None:
    """model.onnx whose first node comes from an operator domain ONNX Runtime does not know."""
    import onnx

    path = folder / "model.onnx"
    model = onnx.load(str(path))
    model.graph.node[0].domain = "com.example.missing"
    model.opset_import.append(onnx.helper.make_opsetid("com.example.missing", 1))
    onnx.save(model, str(path))


def corrupt_after_hashing(folder: Path) -> None:
    """A byte range of model.onnx overwritten after the manifest was written: a checksum mismatch."""
    with open(folder / "model.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 64)


def copy_in_two_steps(src: Path, registry: Path) -> tuple[str, Callable[[], None]]:
    """Start copying `src` as a new version straight into its final folder, every file but
    model.onnx first (as `kubectl cp` of a folder may land); returns the version and a function
    that copies model.onnx, completing it."""
    name, version = src.parent.name, _new_id()
    staged = versions.staging_folder(registry, name, version)
    shutil.copytree(src, staged, dirs_exist_ok=True)
    manifest = Manifest.model_validate_json((staged / MANIFEST).read_text())
    write_manifest(staged, manifest.model_copy(update={"version": version}))
    final = registry / name / version
    final.mkdir(parents=True)
    for f in sorted(staged.iterdir()):
        if f.name != "model.onnx":
            shutil.copy2(f, final / f.name)

    def finish() -> None:
        shutil.copyfile(staged / "model.onnx", final / "model.onnx")
        versions.discard_staging(staged)

    return version, finish


def empty_model_folder(registry: Path, name: str) -> Path:
    """A model name with nothing in it (what `finetune --name NEW` left behind before staging moved)."""
    folder = registry / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def staging_only_model_folder(registry: Path, name: str) -> Path:
    """A model name holding only an old-style `.staging-*` folder, as a killed fine-tune left it."""
    folder = registry / name / f".staging-{new_version()}"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"half a model")
    return folder
