"""What the workers of one server tell each other: whether each is running a model right now (the
lone-request rule), and how many clients each is serving (connection balance, service/balance.py).

With one worker per CPU, each worker's ONNX Runtime runs on one thread (service/config.py): under
load that is the best use of the CPUs. A lone request, though, leaves every other CPU idle while
its model runs on one. A worker whose siblings run nothing may therefore run a batch of one on a
second session with a thread per CPU (service/served.py: `ServedModel.run_batch`).

The board is a small shared file (`/dev/shm`, else the temp folder) named after the `bentoml
serve` process that started the workers. Its first part has a slot per worker: -1 while that
worker runs a batch, else the time its last run ended. A worker takes the wide session only when
every other worker has run nothing for `QUIET_S`: a lone client, not a lull between two requests
of a loaded server. That margin matters. Two runs that overlap while one of them has threads on
every CPU make its spinning threads wait for CPUs the other holds, for up to a scheduler time
slice: with a plain "nobody is running right now" rule, two clients on two workers got half the
requests per second of one thread per worker. Its second part has, per worker, how many clients
it served recently and when it counted them. Reading the board costs a microsecond; it is
advisory, and a stale or torn value only costs one decision's quality.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("graft.siblings")

SLOTS = 64  # workers a server can have here; a worker with a higher index does not take part
QUIET_S = 0.05  # how long every other worker must have run nothing for a lone request to go wide
_SLOT = struct.Struct("d")
_CLIENTS = struct.Struct("dd")  # (clients served in the last window, when they were counted)
CLIENTS_AT = SLOTS * _SLOT.size  # where the second part of the board starts
BOARD_BYTES = CLIENTS_AT + SLOTS * _CLIENTS.size


def board_path(supervisor_pid: int) -> Path:
    shm = Path("/dev/shm")  # noqa: S108 (opened O_NOFOLLOW and owner-checked below; advisory bytes only)
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"graft-{supervisor_pid}-running"


class Siblings:
    """This worker's slot on the shared board, and a look at the others'."""

    def __init__(self, path: Path, index: int, workers: int) -> None:
        if not 0 <= index < workers <= SLOTS:
            raise ValueError(f"worker {index} of {workers}: the board has {SLOTS} slots, one per worker")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                raise ValueError(f"{path} belongs to another user")
            if os.fstat(fd).st_size < BOARD_BYTES:
                os.ftruncate(fd, BOARD_BYTES)
            self._board = mmap.mmap(fd, BOARD_BYTES)
        finally:
            os.close(fd)
        self.index, self.workers = index, workers
        self._runs = 0  # this worker's runs in progress (the event loop and the inference thread)
        self._lock = threading.Lock()
        self._others = struct.Struct(f"{workers}d")
        self._others_clients = struct.Struct(f"{2 * workers}d")
        _SLOT.pack_into(self._board, index * _SLOT.size, 0.0)
        _CLIENTS.pack_into(self._board, CLIENTS_AT + index * _CLIENTS.size, 0.0, 0.0)

    @classmethod
    def for_this_worker(cls, workers: int) -> Siblings | None:
        """The board of the server this worker belongs to; None outside `bentoml serve`, with one
        worker, or where no board can be made (logged)."""
        if workers < 2:
            return None
        try:
            import bentoml

            index = bentoml.server_context.worker_index
        except Exception:  # not under BentoML
            return None
        if index is None:
            return None
        try:
            return cls(board_path(os.getppid()), index - 1, workers)  # BentoML counts workers from 1
        except (OSError, ValueError) as e:
            log.warning("lone requests run on one thread: no shared board (%s)", e)
            return None

    def all_idle(self, quiet_s: float = QUIET_S) -> bool:
        """This worker runs nothing now, and every other worker has run nothing for `quiet_s`
        (asked just before a run starts: a run of another model in this worker counts as busy)."""
        if self._runs:
            return False
        since = time.monotonic() - quiet_s
        return all(
            0 <= ended < since or i == self.index for i, ended in enumerate(self._others.unpack_from(self._board))
        )

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Mark this worker busy for the duration of one batch."""
        with self._lock:
            self._runs += 1
            _SLOT.pack_into(self._board, self.index * _SLOT.size, -1.0)
        try:
            yield
        finally:
            with self._lock:
                self._runs -= 1
                if not self._runs:
                    _SLOT.pack_into(self._board, self.index * _SLOT.size, time.monotonic())

    # ---- connection balance (service/balance.py) ------------------------------------------------
    def publish_clients(self, count: int, now: float) -> None:
        """This worker served `count` clients in the window that ends `now` (time.monotonic)."""
        _CLIENTS.pack_into(self._board, CLIENTS_AT + self.index * _CLIENTS.size, float(count), now)

    def fewest_clients_elsewhere(self, since: float) -> int:
        """The fewest clients any other worker serves: its last count if it counted since `since`,
        else 0 (a worker that served nobody lately has not counted lately)."""
        values = self._others_clients.unpack_from(self._board, CLIENTS_AT)
        return min(
            (int(values[2 * i]) if values[2 * i + 1] >= since else 0 for i in range(self.workers) if i != self.index),
            default=0,
        )


def remove_board(supervisor_pid: int) -> None:
    """Delete a server's board (called by `bentoml serve`'s own process when it exits)."""
    with contextlib.suppress(OSError):
        board_path(supervisor_pid).unlink()
