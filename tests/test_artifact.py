"""The artifact contract: manifest round trip, and refusal of tampered or malformed artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.artifact import load_artifact, new_version, read_manifest, write_manifest
from models.errors import ArtifactError
from models.manifest import (
    ClassificationPostprocessing,
    DatasetInfo,
    ExportInfo,
    ImagePreprocessing,
    Manifest,
    ParityReport,
    TensorSpec,
    TrainingInfo,
)


def make_manifest(version: str, **over: object) -> Manifest:
    fields: dict[str, object] = dict(
        name="toy",
        version=version,
        task="image-classification",
        created_at="2026-01-01T00:00:00Z",
        labels=["a", "b"],
        inputs=[TensorSpec(name="input", dtype="float32", shape=["batch", 3, 8, 8])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", 2])],
        preprocessing=ImagePreprocessing(height=8, width=8),
        postprocessing=ClassificationPostprocessing(),
        base_model={"id": "toy", "source": "test"},
        training=TrainingInfo(strategy="full", dataset=DatasetInfo(name="toy", sha256="0" * 64)),
        export=ExportInfo(
            opset=17,
            exporter="test",
            onnxruntime_version="0",
            parity=ParityReport(samples=1, max_abs_diff=0.0, label_agreement=1.0, tolerance=1e-3, passed=True),
        ),
    )
    fields.update(over)
    return Manifest(**fields)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    version = new_version()
    folder = tmp_path / "toy" / version
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"not really onnx, but hashed all the same")
    (folder / "notes.txt").write_text("hello")
    write_manifest(folder, make_manifest(version))
    return folder


def test_round_trip_keeps_every_field(toy: Path) -> None:
    art = load_artifact(toy)
    assert art.manifest.schema_version == 1
    assert set(art.manifest.files) == {"model.onnx", "notes.txt"}
    raw = json.loads((toy / "manifest.json").read_text())
    assert next(iter(raw)) == "schema_version"  # schema_version comes first
    again = Manifest.model_validate_json(art.manifest.model_dump_json())
    assert again == art.manifest


def test_version_ids_sort_by_time_and_are_unique() -> None:
    from datetime import UTC, datetime

    a = new_version(datetime(2026, 1, 1, tzinfo=UTC))
    b = new_version(datetime(2026, 1, 2, tzinfo=UTC))
    c = new_version(datetime(2026, 1, 2, 0, 0, 0, 1000, tzinfo=UTC))  # 1 ms later, same second
    assert a < b < c
    assert len({new_version() for _ in range(50)}) == 50


def test_tampered_file_is_refused_naming_the_file(toy: Path) -> None:
    with open(toy / "model.onnx", "ab") as f:
        f.write(b"!")
    with pytest.raises(ArtifactError, match=r"checksum mismatch for model\.onnx"):
        load_artifact(toy)
    # Without verification it loads: the check is what refuses it.
    assert load_artifact(toy, verify=False).name == "toy"


def test_missing_file_is_refused(toy: Path) -> None:
    (toy / "notes.txt").unlink()
    with pytest.raises(ArtifactError, match=r"notes\.txt is missing"):
        load_artifact(toy)


def test_unknown_schema_version_is_refused(toy: Path) -> None:
    raw = json.loads((toy / "manifest.json").read_text())
    raw["schema_version"] = 99
    (toy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="schema_version 99 is not supported"):
        load_artifact(toy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("labels"), "labels: Field required"),
        (lambda m: m.update(task="speech"), "task"),
        (lambda m: m.update(surprise=1), "surprise: Extra inputs are not permitted"),
        (lambda m: m["preprocessing"].update(std=[0.0, 1.0, 1.0]), "std values must be positive"),
        (lambda m: m.update(labels=["a", "a"]), "labels must be unique"),
    ],
)
def test_invalid_manifest_is_refused_with_the_field_named(toy: Path, edit, message: str) -> None:
    raw = json.loads((toy / "manifest.json").read_text())
    edit(raw)
    (toy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=message):
        load_artifact(toy)


def test_garbage_manifest_and_wrong_folder(toy: Path, tmp_path: Path) -> None:
    (toy / "manifest.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(toy)
    with pytest.raises(ArtifactError, match="not a directory"):
        load_artifact(tmp_path / "nope")


def test_version_must_match_folder(tmp_path: Path) -> None:
    version = new_version()
    folder = tmp_path / "toy" / "20200101T000000000Z-abcdef"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"x")
    write_manifest(folder, make_manifest(version))
    with pytest.raises(ArtifactError, match="does not match the folder name"):
        load_artifact(folder)


def test_files_cannot_point_outside(toy: Path) -> None:
    raw = json.loads((toy / "manifest.json").read_text())
    raw["files"]["../../etc/passwd"] = "0" * 64
    (toy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        load_artifact(toy)


def test_writer_refuses_a_folder_without_the_model(tmp_path: Path) -> None:
    version = new_version()
    folder = tmp_path / "toy" / version
    folder.mkdir(parents=True)
    with pytest.raises(ArtifactError, match="model file 'model.onnx' is missing"):
        write_manifest(folder, make_manifest(version))
