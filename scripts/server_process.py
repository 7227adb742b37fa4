"""Start and stop a real `bentoml serve` on loopback (tests, benchmarks, the demo scripts)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BentoServer:
    """`with BentoServer(registry) as srv: httpx.get(srv.url + "/models")`.

    Waits for /readyz (models loaded and warmed up) and stops the whole process group on exit.
    `target` is the BentoML service to serve: graft's by default (benchmarks serve a peer too).
    """

    def __init__(
        self,
        registry: Path,
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
        ready_timeout: float = 120.0,
        log_path: Path | None = None,
        python: str | None = None,
        target: str = "service:Graft",
    ) -> None:
        self.registry = Path(registry)
        self.target = target
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = env or {}
        self.ready_timeout = ready_timeout
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"graft-serve-{self.port}.log"
        self.python = python or sys.executable
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0  # from launching `bentoml serve` to the first /readyz 200
        self._home: str | None = None  # this server's own BENTOML_HOME (see start)

    def start(self) -> BentoServer:
        # The checkout that started the server is the code it runs, whatever the venv's
        # editable install points at (another worktree, say).
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        # Each server its own BENTOML_HOME: every `bentoml serve` empties
        # $BENTOML_HOME/prometheus_multiproc_dir when it starts, so servers sharing one home reset
        # each other's /metrics (a test's second server wiped the session server's counters).
        self._home = tempfile.mkdtemp(prefix="graft-bentoml-home-")
        env = {
            **os.environ,
            "BENTOML_HOME": self._home,
            "PYTHONPATH": path,
            "MODEL_REGISTRY": str(self.registry),
            "BENTOML_DO_NOT_TRACK": "true",
            "ORT_DISABLE_TELEMETRY": "1",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        bentoml = str(Path(self.python).parent / "bentoml")
        cmd = [bentoml, "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)]
        self._log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.ready_or_stop()
        self.startup_s = time.monotonic() - t0
        return self

    def ready_or_stop(self) -> None:
        """wait_ready, stopping the server if it fails: a server that never got ready must not
        outlive the call that started it (its workers may be crash-looping)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float | None = None) -> float:
        """Poll /readyz until 200; returns seconds waited. Raises with the server log on failure."""
        start = time.monotonic()
        deadline = start + (timeout or self.ready_timeout)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:  # noqa: S310 (loopback)
                    if r.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout or self.ready_timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        self.proc = None
        self._log.close()
        if self._home:
            shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> BentoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
