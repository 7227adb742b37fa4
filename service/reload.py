"""Hot reload across every worker of one server.

BentoML runs N worker processes; an HTTP call to /admin/reload reaches only one of them. That
worker reloads itself and raises a shared signal (a token in a small state folder: a counter
incremented under a file lock, so tokens only grow whatever the wall clock does); every
worker's watcher notices the token within `SIGNAL_POLL_S`, reloads, and records what it now
serves in `worker-<pid>.json`. The admin call waits for all live workers to report the token,
so its answer says whether the server converged. With GRAFT_RELOAD_INTERVAL > 0 the watcher
also polls the registry itself (cheap mtime fingerprint), which is how separate pods behind a
Kubernetes Service converge without anyone calling them one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from models import versions

from .crashguard import process_alive
from .pool import ModelPool

log = logging.getLogger("graft.reload")

SIGNAL_POLL_S = 0.25


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def default_state_dir(registry: Path) -> Path:
    """The state folder the workers of one `bentoml serve` share: private to this user, one per
    server process (the workers' parent) and registry, under $TMPDIR."""
    key = hashlib.sha256(str(Path(registry).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"graft-state-{os.getuid()}-{os.getppid()}-{key}"


def checksum_dir(state_dir: Path | None) -> Path:
    """Where workers remember artifact checksums (models.checksums): under GRAFT_STATE_DIR when set,
    else one private folder per user under $TMPDIR. Unlike the reload state, it outlives the
    server, so that a restart does not hash unchanged files again."""
    if state_dir is not None:
        folder = Path(state_dir) / "checksums"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return folder
    return private_dir(Path(tempfile.gettempdir()) / f"graft-checksums-{os.getuid()}")


def private_dir(path: Path) -> Path:
    """Create `path` (mode 0700), or accept it only if it is a real folder owned by this user
    that no one else can write: in a shared /tmp, anyone could have made it first, and whoever
    writes the reload token or the worker reports steers every worker."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder (a link?)"
    elif st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not to this process's uid {os.getuid()}"
    elif st.st_mode & 0o022:
        problem = f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    if problem:
        raise RuntimeError(f"state folder {path} {problem}; remove it, or set GRAFT_STATE_DIR to a private folder")
    return path


def remove_stale_state_dirs(own: Path) -> None:
    """Delete the default state folders of this user's servers that have exited (the server's
    pid is in the name), so that /tmp does not collect one folder per `bentoml serve` run."""
    prefix = f"graft-state-{os.getuid()}-"
    for folder in own.parent.glob(prefix + "*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if folder == own or not pid.isdigit() or process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            st = folder.lstat()
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                shutil.rmtree(folder)


class ReloadSignal:
    """A folder shared by the workers of one server (GRAFT_STATE_DIR, default under /tmp)."""

    def __init__(self, registry: Path, state_dir: Path | None = None) -> None:
        if state_dir is None:
            self.dir = private_dir(default_state_dir(registry))
            remove_stale_state_dirs(self.dir)
        else:  # the operator's choice (e.g. a volume): used as given
            self.dir = Path(state_dir)
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._token_file = self.dir / "reload-token"
        self._lock_file = self.dir / "reload-token.lock"

    def request(self) -> int:
        """Ask every worker to reload; returns the token they will acknowledge (the previous one
        plus one, incremented under a file lock so that two workers asking at once both count)."""
        with open(self._lock_file, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                token = self.current() + 1
                _write_atomic(self._token_file, str(token))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return token

    def current(self) -> int:
        try:
            return int(self._token_file.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def report(self, pid: int, token: int, generation: int, served: dict[str, str]) -> None:
        body = {"pid": pid, "token": token, "generation": generation, "served": served, "at": time.time()}
        _write_atomic(self.dir / f"worker-{pid}.json", json.dumps(body))

    def workers(self) -> dict[int, dict[str, Any]]:
        """Reports of live workers (files of dead ones are removed)."""
        out: dict[int, dict[str, Any]] = {}
        for p in self.dir.glob("worker-*.json"):
            try:
                body = json.loads(p.read_text())
                pid = int(body["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if process_alive(pid):
                out[pid] = body
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
        return out


class Reloader:
    """One per worker: watches the signal (and optionally the registry) and reloads the pool."""

    def __init__(self, pool: ModelPool, signal: ReloadSignal, interval_s: float) -> None:
        self.pool = pool
        self.signal = signal
        self.interval_s = interval_s
        self.seen_token = signal.current()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    def served(self) -> dict[str, str]:
        return {m.name: m.version for m in self.pool.served()}

    def publish(self) -> None:
        """Record what this worker serves, for the admin reload's convergence check."""
        try:
            self.signal.report(os.getpid(), self.seen_token, self.pool.generation, self.served())
        except OSError as e:  # a full or read-only state folder must not fail a reload
            log.error("cannot record this worker's state in %s: %s", self.signal.dir, e)

    async def reload(self, token: int | None = None) -> dict[str, Any]:
        """Reload this worker (serialised), then record which token it has caught up with."""
        async with self._lock:
            token = token if token is not None else self.signal.current()
            result = await self.pool.reload()
            self.seen_token = max(self.seen_token, token)
            self.publish()
            return result

    async def _watch(self) -> None:
        next_registry_check = time.monotonic() + self.interval_s if self.interval_s > 0 else float("inf")
        while True:
            await asyncio.sleep(SIGNAL_POLL_S)
            try:
                token = self.signal.current()
                if token > self.seen_token:
                    await self.reload(token)
                elif time.monotonic() >= next_registry_check:
                    next_registry_check = time.monotonic() + self.interval_s
                    sig = await asyncio.get_running_loop().run_in_executor(
                        None, versions.signature, self.pool.settings.registry
                    )
                    if sig != self.pool.last_signature:
                        log.info("registry changed; reloading")
                        await self.reload()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the watcher must survive a bad scan
                self.last_error = str(e)
                log.exception("reload watcher: %s", e)

    def start(self) -> None:
        self.publish()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="graft-reload-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload_everywhere(self, expected_workers: int, timeout_s: float = 45.0) -> dict[str, Any]:
        """Admin reload: this worker now, the others through the signal; wait until all caught up
        (at most `timeout_s`, under BentoML's 60 s request timeout, so the answer is ours)."""
        try:
            token = self.signal.request()
        except OSError as e:  # the state folder is unwritable: still reload this worker, and say so
            log.error("cannot signal the other workers: %s", e)
            result = await self.reload()
            result["workers"] = {"expected": expected_workers, "reloaded": 1, "converged": False, "error": str(e)}
            return result
        result = await self.reload(token)
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.signal.workers()
            caught_up = {pid: w for pid, w in workers.items() if w.get("token", 0) >= token}
            if len(caught_up) >= expected_workers or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        served_sets = {json.dumps(w["served"], sort_keys=True) for w in caught_up.values()}
        result["workers"] = {
            "expected": expected_workers,
            "reloaded": len(caught_up),
            "converged": len(caught_up) >= expected_workers and len(served_sets) == 1,
            "served": {str(pid): w["served"] for pid, w in caught_up.items()},
        }
        return result
