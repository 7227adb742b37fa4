"""A version whose model crashes ONNX Runtime is refused once, not opened again in every worker.

ONNX Runtime is native code: a model that makes it crash while the session is created or run for
the first time (a bug in an operator kernel, a graph that exhausts memory) kills the worker
process, and no `except` runs. The worker is restarted, opens the newest version again, and dies
again: every worker of every pod that reads the registry goes down and stays down, for one file.

So a worker leaves a note while it opens a version: a file named after the version folder and its
own process id, removed once the open has ended either way (refused or served). A note whose
process no longer runs is the mark of a crash. Before opening a version with such a mark, the
worker opens it in a separate process first (`python -m models.probe`, the same checks as a
worker's open): if that process dies of a signal too, the version is refused with the reason,
and reported in /models like any other refused version; if it opens, the marks are cleared (the
worker had died of something else) and the version is opened as usual. A version without a mark
is opened directly, so a start or a reload costs two file operations more than before.

What this does not cover: the requests in flight on the worker that crashed the first time are
lost with it, and a crash while serving requests (not while opening) is not tied to a version.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("graft.models")

PROBE_TIMEOUT_S = 300.0  # a probe still opening after this long is stopped, and the version refused


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CrashGuard:
    """Notes of versions being opened, in `folder` (private to the server's user, kept across
    restarts of the server and of its workers)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:  # the service still starts; `opening` warns that crashes go unremembered
            log.warning("cannot create %s (%s)", self.folder, e)

    def _key(self, version_folder: Path) -> str:
        return hashlib.sha256(str(Path(version_folder).resolve()).encode()).hexdigest()[:32]

    @contextlib.contextmanager
    def opening(self, version_folder: Path) -> Iterator[None]:
        """Mark `version_folder` as being opened by this process for the duration of the block."""
        note = self.folder / f"{self._key(version_folder)}.{os.getpid()}"
        try:
            note.write_text(str(version_folder))
        except OSError as e:  # no note, no guard: the open itself still goes ahead
            log.warning("cannot write %s (%s): a crash while opening it would not be remembered", note, e)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                note.unlink()

    def crashes(self, version_folder: Path) -> list[int]:
        """Process ids that died while opening `version_folder` (their notes are still there)."""
        dead = []
        for note in self.folder.glob(self._key(version_folder) + ".*"):
            pid = note.suffix[1:]
            if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                dead.append(int(pid))
        return sorted(dead)

    def clear(self, version_folder: Path, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(OSError):
                (self.folder / f"{self._key(version_folder)}.{pid}").unlink()

    def verdict(self, version_folder: Path, name: str, threads: int, providers: tuple[str, ...]) -> str | None:
        """None when `version_folder` may be opened in this process; else why it is refused.

        Only a version that was being opened when a process died is probed: in a child process,
        with the same checks and session options as the worker's own open."""
        pids = self.crashes(version_folder)
        if not pids:
            return None
        died, label = ", ".join(map(str, pids)), f"{name}/{Path(version_folder).name}"
        log.warning("%s: process %s died while opening it; opening it in a probe process first", label, died)
        root = Path(__file__).resolve().parent.parent  # where `models` is importable from
        path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "models.probe", str(version_folder), name, str(threads), ",".join(providers)]
        try:
            probe = subprocess.run(
                command,
                env={**os.environ, "PYTHONPATH": path},
                capture_output=True,
                timeout=PROBE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return (
                f"a worker process died while opening this version (pid {died}), and a probe process "
                f"was still opening it after {PROBE_TIMEOUT_S:.0f} s"
            )
        if probe.returncode < 0:
            try:
                how = signal.Signals(-probe.returncode).name
            except ValueError:
                how = f"signal {-probe.returncode}"
            return (
                f"ONNX Runtime crashed opening this version: a worker process died while opening it "
                f"(pid {died}), and so did a separate probe process ({how})"
            )
        self.clear(version_folder, pids)  # it opens (or is refused for a reason the open will give)
        log.warning("%s: the probe process opened it; opening it here", label)
        return None
