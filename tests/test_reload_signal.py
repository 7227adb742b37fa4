"""The folder a server's workers share to pass reloads on: tokens that only grow, and a default
location nobody else can plant."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from service.reload import ReloadSignal, default_state_dir, private_dir


def _ask(state_dir: str, n: int, out) -> None:
    signal = ReloadSignal(Path("/nonexistent-registry"), Path(state_dir))
    out.put([signal.request() for _ in range(n)])


def test_tokens_from_concurrent_workers_are_distinct_and_increasing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ask, args=(str(tmp_path), 40, out)) for _ in range(3)]
    for p in procs:
        p.start()
    tokens = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    every = [t for batch in tokens for t in batch]
    assert sorted(every) == list(range(1, 121)), "each request must get its own token"
    assert all(batch == sorted(batch) for batch in tokens)
    assert ReloadSignal(Path("/x"), tmp_path).current() == 120


def test_default_state_folder_is_private_and_per_server(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    folder = default_state_dir(Path("/some/registry"))
    assert folder.parent == tmp_path
    assert f"-{os.getuid()}-{os.getppid()}-" in folder.name  # one per user and per `bentoml serve`
    signal = ReloadSignal(Path("/some/registry"))
    assert signal.dir == folder and folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("plant", ["world-writable", "symlink", "other-owner"])
def test_a_planted_state_folder_is_refused(tmp_path: Path, plant: str) -> None:
    target = tmp_path / "graft-state"
    if plant == "world-writable":
        target.mkdir()
        target.chmod(0o777)
    elif plant == "symlink":
        (tmp_path / "theirs").mkdir(mode=0o700)
        target.symlink_to(tmp_path / "theirs")
    else:
        if os.getuid() != 0:
            pytest.skip("needs root to make a folder owned by someone else")
        target.mkdir(mode=0o700)
        os.chown(target, 4242, 4242)
    with pytest.raises(RuntimeError, match="GRAFT_STATE_DIR"):
        private_dir(target)


def test_state_folders_of_exited_servers_are_removed(tmp_path: Path, monkeypatch) -> None:
    import subprocess
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that has exited
    stale = tmp_path / f"graft-state-{os.getuid()}-{gone.pid}-abc"
    live = tmp_path / f"graft-state-{os.getuid()}-{os.getpid()}-abc"  # a running server's
    other = tmp_path / "graft-state-unrelated"
    for folder in (stale, live, other):
        folder.mkdir(mode=0o700)
        (folder / "reload-token").write_text("3")
    signal = ReloadSignal(Path("/some/registry"))
    assert signal.dir.is_dir() and not stale.exists() and live.is_dir() and other.is_dir()
