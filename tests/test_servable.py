"""The one servability rule (models.servable) as the server's pool and `scripts.registry` apply it:
every load failure refuses a version and never stops a scan, the newest working version is
served (at startup too), refusals are retried when any file changes, and nothing in /models
names the server's own paths. No HTTP here: tests/test_lifecycle.py replays the same faults
against a real `bentoml serve`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import service.tasks  # noqa: F401 (registers the task classes)
from models import servable, versions
from models.errors import ArtifactError
from scripts import registry as registry_cli
from service.config import Settings
from service.pool import ModelPool
from tests import faults

pytestmark = pytest.mark.slow  # needs the quick artifacts

NAME = "image-classification"


@pytest.fixture
def reg(tmp_path: Path, image_artifact: Path) -> Path:
    """A registry holding one good version of the quick image classifier."""
    root = tmp_path / "registry"
    shutil.copytree(image_artifact, root / NAME / image_artifact.name)
    return root


@pytest.fixture
def pool(reg: Path):
    settings = dataclasses.replace(Settings.from_env(), registry=reg, ort_threads=1)
    executor = ThreadPoolExecutor(1)
    yield ModelPool(settings, infer_executor=executor, cpu_executor=executor)
    executor.shutdown()


def entry(pool: ModelPool, name: str = NAME) -> dict:
    return next(m for m in pool.report() if m["name"] == name)


@pytest.mark.parametrize(
    ("break_it", "needle"),
    [
        (faults.truncate_model, "ONNX Runtime cannot load model.onnx"),
        (faults.future_opset, "ONNX Runtime cannot load model.onnx"),
        (faults.unknown_op_domain, "com.example.missing"),
        (None, "checksum mismatch for model.onnx"),
    ],
)
def test_a_bad_newest_version_is_refused_and_a_fresh_start_serves_the_previous_one(
    reg: Path, pool: ModelPool, image_artifact: Path, break_it, needle: str
) -> None:
    bad = faults.publish_copy(image_artifact, reg, mutate=break_it)
    if break_it is None:
        faults.corrupt_after_hashing(reg / NAME / bad)
    retired, outcomes = pool.scan()  # a server starting with the bad version newest
    assert pool.ready and not retired
    e = entry(pool)
    assert e["status"] == "ready" and e["served_version"] == image_artifact.name
    errors = {x["version"]: x["error"] for x in e["errors"]}
    assert needle in errors[bad], errors
    assert outcomes[NAME] == {"from": None, "to": image_artifact.name, "refused": [bad]}
    # the same rule in the registry tool
    assert servable.served_version(reg, NAME) == image_artifact.name


def test_a_refused_version_is_not_reopened_until_one_of_its_files_changes(
    reg: Path, pool: ModelPool, image_artifact: Path, monkeypatch
) -> None:
    pool.scan()
    version, finish = faults.copy_in_two_steps(image_artifact, reg)  # manifest lands, model.onnx not yet
    opened: list[str] = []
    real_open = pool._open
    monkeypatch.setattr(pool, "_open", lambda name, v: (opened.append(v), real_open(name, v))[1])

    _, outcomes = pool.scan()
    assert outcomes[NAME]["refused"] == [version] and "model.onnx is missing" in entry(pool)["errors"][0]["error"]
    assert entry(pool)["served_version"] == image_artifact.name
    pool.scan()
    assert opened == [version], "an unchanged refused version must not be reopened on every scan"

    finish()  # model.onnx arrives: only the model file changed, not the manifest
    _, outcomes = pool.scan()
    assert outcomes[NAME] == {"from": image_artifact.name, "to": version, "refused": []}
    assert entry(pool)["errors"] == [] and opened == [version, version]


def test_model_names_with_nothing_servable_are_reported_not_a_readiness_failure(
    reg: Path, pool: ModelPool, image_artifact: Path
) -> None:
    faults.empty_model_folder(reg, "empty-model")
    faults.staging_only_model_folder(reg, "being-trained")
    every_version_bad = reg / "all-bad"
    every_version_bad.mkdir()
    shutil.copytree(image_artifact, every_version_bad / image_artifact.name)  # wrong name in its manifest
    pool.scan()
    assert pool.ready
    report = {m["name"]: m for m in pool.report()}
    assert report[NAME]["status"] == "ready"
    for name in ("empty-model", "being-trained"):
        assert report[name]["status"] == "unavailable" and "no versions" in report[name]["reason"]
    assert report["all-bad"]["status"] == "unavailable" and "every version was refused" in report["all-bad"]["reason"]
    assert "does not match folder 'all-bad'" in report["all-bad"]["errors"][0]["error"]
    # Staging happens outside model folders: a published version leaves none behind.
    faults.publish_copy(image_artifact, reg)
    assert not (reg / versions.STAGING_DIR / NAME).exists()
    assert sorted(p.name for p in (reg / NAME).iterdir() if p.name.startswith(".")) == []


def test_the_report_names_no_absolute_path(reg: Path, pool: ModelPool, image_artifact: Path) -> None:
    faults.publish_copy(image_artifact, reg, mutate=faults.truncate_model)
    (reg / "pinned-badly").mkdir()
    (reg / "pinned-badly" / versions.PIN_FILE).write_text("not-a-version\n")
    pool.scan()
    text = json.dumps(pool.report())
    assert str(reg) not in text and str(reg.resolve()) not in text and "/tmp" not in text, text
    pinned = entry(pool, "pinned-badly")
    assert "is not a version id" in pinned["reason"] and pinned["reason"].startswith("pinned-badly/CURRENT")


def test_an_unreadable_registry_keeps_what_is_served(reg: Path, pool: ModelPool, tmp_path: Path) -> None:
    pool.scan()
    moved = tmp_path / "elsewhere"
    reg.rename(moved)  # the volume went away for a moment
    retired, _ = pool.scan()
    assert not retired and pool.ready and entry(pool)["status"] == "ready"
    assert pool.problem and "does not exist" in pool.problem and str(reg) not in pool.problem
    moved.rename(reg)
    pool.scan()
    assert pool.problem is None


def test_a_bad_pin_keeps_serving_and_says_why(reg: Path, pool: ModelPool, image_artifact: Path) -> None:
    bad = faults.publish_copy(image_artifact, reg, mutate=faults.truncate_model)
    versions.write_pin(reg, NAME, bad)
    pool.scan()
    e = entry(pool)
    assert e["served_version"] == image_artifact.name and e["pinned_version"] == bad
    assert f"pinned version {bad} is not servable" in e["problem"]


def test_registry_tool_uses_the_same_rule(reg: Path, image_artifact: Path, capsys) -> None:
    good = image_artifact.name
    old = faults.publish_copy(image_artifact, reg)  # an extra good version, older than the bad one
    bad = faults.publish_copy(image_artifact, reg, mutate=faults.future_opset)
    cli = ["--registry", str(reg)]

    assert registry_cli.main([*cli, "list"]) == 0
    out = capsys.readouterr().out
    assert f"* {NAME}/{old}" in out and f"  {NAME}/{bad}  REFUSED: " in out

    # pin refuses what the server would refuse (ONNX Runtime cannot load it), with the reason
    assert registry_cli.main([*cli, "pin", NAME, bad]) == 2
    assert "ONNX Runtime cannot load" in capsys.readouterr().err
    assert versions.read_pin(reg, NAME) is None

    # prune --keep 1 keeps the newest (bad) folder and the version a fresh server would serve
    assert registry_cli.main([*cli, "prune", NAME, "--keep", "1"]) == 0
    assert sorted(versions.list_versions(reg, NAME)) == sorted([old, bad])
    assert not (reg / NAME / good).exists()
    assert servable.served_version(reg, NAME) == old


def test_registry_import_publishes_atomically_and_cleans_up(reg: Path, image_artifact: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert registry_cli.main(["--registry", str(other), "import", str(reg / NAME / image_artifact.name)]) == 0
    assert servable.served_version(other, NAME) == image_artifact.name
    assert not any((other / versions.STAGING_DIR).iterdir())
    manifest = other / NAME / image_artifact.name / "manifest.json"
    assert manifest.stat().st_mode & 0o044, "a published manifest must be readable by the server's user"

    broken = tmp_path / "broken" / NAME / "20991231T000000000Z-abcdef"
    faults_src = reg / NAME / faults.publish_copy(image_artifact, reg, mutate=faults.truncate_model)
    shutil.copytree(faults_src, broken.parent / faults_src.name)
    assert registry_cli.main(["--registry", str(other), "import", str(broken.parent / faults_src.name)]) == 2
    assert not (other / NAME / faults_src.name).exists()
    assert not any((other / versions.STAGING_DIR).iterdir()), "a failed import must leave nothing staged"


def test_open_version_turns_any_exception_into_a_refusal(image_artifact: Path, monkeypatch) -> None:
    def explode(*_a, **_k):
        raise KeyError("a bug somewhere in a task's code")

    monkeypatch.setattr(servable, "check_warmup", explode)
    with pytest.raises(ArtifactError, match="warm-up failed: .a bug somewhere"):
        servable.open_version(image_artifact, name=NAME)


def test_manifests_and_pins_are_written_readable_by_other_users(reg: Path, image_artifact: Path) -> None:
    old = os.umask(0o022)
    try:
        version = faults.publish_copy(image_artifact, reg)
        versions.write_pin(reg, NAME, version)
    finally:
        os.umask(old)
    assert (reg / NAME / version / "manifest.json").stat().st_mode & 0o777 == 0o644
    assert (reg / NAME / versions.PIN_FILE).stat().st_mode & 0o777 == 0o644
