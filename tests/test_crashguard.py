"""A version that crashes ONNX Runtime while it is opened (service/crashguard.py): refused after
one crash per worker, never a crash loop, and the server keeps serving the version before it.

The crash is real (the process dies of SIGSEGV inside session creation), injected by a
`sitecustomize` on PYTHONPATH that makes `onnxruntime.InferenceSession` kill its own process for
any model whose folder holds a file named `crash-onnxruntime`: what a native bug in an operator
kernel does, on demand."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from service.crashguard import CrashGuard
from tests import faults
from tests.conftest import encode

HOOK = """
import os, signal
from pathlib import Path
try:
    import onnxruntime
except ImportError:
    onnxruntime = None
if onnxruntime is not None:
    _init = onnxruntime.InferenceSession.__init__

    def _crashing_init(self, path_or_bytes, *args, **kwargs):
        if isinstance(path_or_bytes, str) and (Path(path_or_bytes).parent / "crash-onnxruntime").exists():
            os.kill(os.getpid(), signal.SIGSEGV)
        _init(self, path_or_bytes, *args, **kwargs)

    onnxruntime.InferenceSession.__init__ = _crashing_init
"""


def crashing(folder: Path) -> None:
    """Mark a staged version so that the injected hook crashes whoever opens its model."""
    (folder / "crash-onnxruntime").write_text("this version kills ONNX Runtime\n")


@pytest.fixture
def hook(tmp_path: Path) -> str:
    folder = tmp_path / "hook"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(HOOK)
    return os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)


def _dead_pid() -> int:
    proc = psutil.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_note_lives_while_a_version_opens_and_marks_a_crash_only_when_its_process_died(tmp_path: Path) -> None:
    guard = CrashGuard(tmp_path / "notes")
    version = tmp_path / "registry" / "m" / "v1"
    with guard.opening(version):
        assert len(list(guard.folder.iterdir())) == 1
        assert guard.crashes(version) == []  # this process is still opening it
    assert list(guard.folder.iterdir()) == []
    with pytest.raises(RuntimeError), guard.opening(version):
        raise RuntimeError("refused")  # a refusal is not a crash
    assert list(guard.folder.iterdir()) == []

    dead = _dead_pid()
    (guard.folder / f"{guard._key(version)}.{dead}").write_text(str(version))
    assert guard.crashes(version) == [dead]
    assert guard.crashes(tmp_path / "registry" / "m" / "v2") == []


def test_an_unwritable_notes_folder_only_turns_the_guard_off(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    guard = CrashGuard(blocker / "opening")  # cannot be created: no error, the worker still starts
    with guard.opening(tmp_path / "registry" / "m" / "v1"):
        pass
    assert guard.crashes(tmp_path / "registry" / "m" / "v1") == []


def test_a_crash_mark_is_cleared_when_a_probe_opens_the_version(tmp_path: Path, image_artifact: Path) -> None:
    guard = CrashGuard(tmp_path / "notes")
    dead = _dead_pid()
    (guard.folder / f"{guard._key(image_artifact)}.{dead}").write_text(str(image_artifact))
    assert guard.verdict(image_artifact, "image-classification", 1, ("CPUExecutionProvider",)) is None
    assert guard.crashes(image_artifact) == []


def test_a_version_whose_probe_crashes_too_is_refused(
    tmp_path: Path, image_artifact: Path, hook: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "registry"
    version = registry / image_artifact.parent.name / faults.publish_copy(image_artifact, registry, mutate=crashing)
    guard = CrashGuard(tmp_path / "notes")
    dead = _dead_pid()
    (guard.folder / f"{guard._key(version)}.{dead}").write_text(str(version))
    monkeypatch.setenv("PYTHONPATH", hook)
    why = guard.verdict(version, "image-classification", 1, ("CPUExecutionProvider",))
    assert why is not None and "ONNX Runtime crashed" in why and "SIGSEGV" in why and str(dead) in why, why
    assert guard.crashes(version) == [dead]  # kept: a restarted worker refuses it again


def _worker_pids(supervisor: int) -> set[int]:
    return {
        p.pid
        for p in psutil.Process(supervisor).children(recursive=True)
        if "_bentoml_impl.worker" in " ".join(p.cmdline())
    }


def _entry(url: str) -> dict:
    return next(m for m in httpx.get(url + "/models").json()["models"] if m["name"] == "image-classification")


def _wait_for_refusal(url: str, version: str, timeout: float = 120) -> dict:
    deadline, entry = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        try:
            entry = _entry(url)
            if version in {e["version"] for e in entry["errors"]}:
                return entry
        except httpx.HTTPError:
            pass  # the worker is being replaced
        time.sleep(0.2)
    raise AssertionError(f"{version} was not refused within {timeout} s: {entry}")


def test_a_version_that_crashes_onnx_runtime_is_refused_at_start_and_on_reload(
    tmp_path: Path, image_artifact: Path, hook: str, fashion_test
) -> None:
    """At start the newest version kills the worker once; the replacement probes it, refuses it
    and serves the version before it. A second such version, found by polling, costs one more
    worker, not a loop; after that the worker stays the same process."""
    from scripts.server_process import BentoServer

    registry = tmp_path / "registry"
    good = image_artifact.name
    shutil.copytree(image_artifact, registry / image_artifact.parent.name / good)
    bad = faults.publish_copy(image_artifact, registry, mutate=crashing)
    env = {
        "PYTHONPATH": hook,
        "GRAFT_WORKERS": "1",
        "GRAFT_STATE_DIR": str(tmp_path / "state"),
        "GRAFT_RELOAD_INTERVAL": "0.5",
    }
    x, _ = fashion_test
    image = encode(Image.fromarray(x[0]), "PNG")
    with BentoServer(registry, env=env) as srv:
        entry = _wait_for_refusal(srv.url, bad)
        assert entry["served_version"] == good
        why = {e["version"]: e["error"] for e in entry["errors"]}[bad]
        assert "ONNX Runtime crashed" in why and "SIGSEGV" in why, why
        r = httpx.post(srv.url + "/classify", files={"image": ("x.png", image, "image/png")}, timeout=30)
        assert r.status_code == 200 and r.json()["model"]["version"] == good, r.text

        before = _worker_pids(srv.proc.pid)
        worse = faults.publish_copy(image_artifact, registry, mutate=crashing)
        entry = _wait_for_refusal(srv.url, worse)
        assert entry["served_version"] == good
        srv.wait_ready(60)
        after = _worker_pids(srv.proc.pid)
        assert len(after) == 1 and after != before  # the worker that found it died, once
        time.sleep(2)  # polls go on: the refused versions are not opened again
        assert _worker_pids(srv.proc.pid) == after
        r = httpx.post(srv.url + "/classify", files={"image": ("x.png", image, "image/png")}, timeout=30)
        assert r.status_code == 200 and r.json()["model"]["version"] == good, r.text
