"""A per-worker memory budget for the transient memory of requests: decoded images, parsed JSON.

Every limit on a single request (40 megapixels, a 20 MiB body) is safe alone, but a worker runs
several requests at once, and a pod runs several workers: eight concurrent 40-megapixel uploads
would need several GB. Work whose memory grows with the request holds its estimated peak in
this budget while it runs; when the budget is spent, further work waits its turn (first come,
first served) and answers 503 with Retry-After if its turn does not come within `wait_s`. A
single request that needs more than the whole budget is refused with 413.

The budget is derived from the pod's memory limit (`derive_budget`), so the worst legal
requests wait instead of getting the pod OOM-killed. Estimates come from the code that does the
work: `ImagePreprocessor.decode_cost` for images, `json_cost` (service/bodies.py) for JSON.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from models.errors import InvalidInput

log = logging.getLogger("graft.budget")

MB = 1 << 20
# Without a memory limit (a laptop, a VM without cgroup limits) each worker gets this much.
UNLIMITED_BUDGET = 1024 * MB
# Kept free per worker for what the budget does not count: ONNX Runtime's arena growing with
# batch size, response bodies, allocator slack. At least this, or a fifth of the worker's RSS.
HEADROOM = 96 * MB
FLOOR = 64 * MB
WAIT_S = 20.0


def _mb(n: float) -> str:
    return f"{n / MB:,.0f} MB"


class NotNow(Exception):
    """A hold that `AtOnce` cannot grant right away: do the work on a thread, where it may wait."""


@dataclass
class BudgetStats:
    held: int = 0  # bytes held right now
    peak: int = 0  # most bytes ever held at once
    waited: int = 0  # reservations that had to wait for their turn
    busy: int = 0  # 503s: the turn did not come within wait_s
    too_large: int = 0  # 413s: more than the whole budget


class MemoryBudget:
    """Bytes of transient request memory one worker may hold at once (thread-safe, FIFO)."""

    def __init__(self, limit: int, *, wait_s: float = WAIT_S, source: str = "") -> None:
        if limit <= 0:
            raise ValueError("a memory budget must be positive")
        self.limit = int(limit)
        self.wait_s = wait_s
        self.source = source  # how the limit was chosen, for messages and /models
        self.stats = BudgetStats()
        self._cond = threading.Condition()
        self._line: deque[object] = deque()

    @contextmanager
    def hold(self, n: int, *, wait: bool = True) -> Iterator[None]:
        """Hold `n` bytes for the duration of the `with` block (blocks the calling thread until
        they are free; with `wait=False`, raises NotNow instead of waiting)."""
        n = max(0, int(n))
        if n > self.limit:
            self.stats.too_large += 1
            raise InvalidInput(
                f"this request needs about {_mb(n)} of memory to process; a worker may spend at most "
                f"{_mb(self.limit)} on requests at once (GRAFT_REQUEST_MEMORY_MB{self.source and ', ' + self.source}). "
                "Send a smaller image or body",
                status_code=413,
            )
        self._acquire(n, wait)
        try:
            yield
        finally:
            with self._cond:
                self.stats.held -= n
                self._cond.notify_all()

    def _acquire(self, n: int, wait: bool = True) -> None:
        ticket = object()
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            if not wait and (self._line or self.stats.held + n > self.limit):
                raise NotNow(f"{_mb(n)} of the memory budget is not free right now")
            self._line.append(ticket)
            try:
                if self._line[0] is not ticket or self.stats.held + n > self.limit:
                    self.stats.waited += 1
                while self._line[0] is not ticket or self.stats.held + n > self.limit:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.stats.busy += 1
                        raise InvalidInput(
                            f"busy: other requests hold this worker's memory budget ({_mb(self.limit)}) "
                            "for large images or bodies; retry shortly",
                            status_code=503,
                        )
                    self._cond.wait(left)
                self.stats.held += n
                self.stats.peak = max(self.stats.peak, self.stats.held)
            finally:
                self._line.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now

    def describe(self) -> dict[str, object]:
        s = self.stats
        return {
            "limit_mb": round(self.limit / MB, 1),
            "source": self.source,
            "held_mb": round(s.held / MB, 1),
            "peak_mb": round(s.peak / MB, 1),
            "waited": s.waited,
            "busy_503": s.busy,
            "too_large_413": s.too_large,
        }


@dataclass(frozen=True)
class AtOnce:
    """The budget as seen by work done on the event loop (a lone request, service/served.py):
    it may hold up to `max_bytes` if they are free right now; anything larger, or anything that
    would have to wait its turn, raises NotNow and the work moves to a thread. The loop never
    blocks on the budget, and never spends long on one large image."""

    budget: MemoryBudget | None
    max_bytes: int

    def hold(self, n: int) -> AbstractContextManager[object]:
        if n > self.max_bytes:
            raise NotNow(f"{_mb(n)} is more than work on the event loop may hold ({_mb(self.max_bytes)})")
        return self.budget.hold(n, wait=False) if self.budget is not None else nullcontext()


def cgroup_memory_limit() -> int | None:
    """The container's memory limit in bytes (cgroup v2 memory.max or v1), None when unlimited."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw == "max":
            return None
        try:
            value = int(raw)
        except ValueError:
            continue
        # cgroup v1 reports "unlimited" as a huge page-aligned number.
        return value if value < (1 << 60) else None
    return None


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def derive_budget(
    *, explicit_mb: int | None, pod_limit_mb: int | None, workers: int, worker_rss: int, parent_rss: int
) -> tuple[int, str]:
    """(bytes, how it was chosen): GRAFT_REQUEST_MEMORY_MB when set; else each worker's share of
    the pod's memory limit after the server's parent process and this worker's own resident
    memory (models loaded), less headroom; else UNLIMITED_BUDGET."""
    if explicit_mb:
        return explicit_mb * MB, "set by GRAFT_REQUEST_MEMORY_MB"
    limit = pod_limit_mb * MB if pod_limit_mb else cgroup_memory_limit()
    if limit is None:
        return UNLIMITED_BUDGET, "no memory limit found; the default"
    share = (limit - parent_rss) / max(1, workers)
    headroom = max(HEADROOM, worker_rss // 5)
    budget = int(share - worker_rss - headroom)
    source = (
        f"derived from the {_mb(limit)} memory limit: ({_mb(limit)} - {_mb(parent_rss)} server process) / "
        f"{workers} worker(s) - {_mb(worker_rss)} this worker - {_mb(headroom)} headroom"
    )
    if budget < FLOOR:
        log.warning("memory budget %s is below %s; the pod's memory limit is too small for its models", budget, FLOOR)
        budget = FLOOR
        source += f", raised to the {_mb(FLOOR)} floor"
    return budget, source


def budget_for_this_worker(explicit_mb: int | None, pod_limit_mb: int | None, workers: int) -> MemoryBudget:
    """The budget of the calling worker process, sized after its models are loaded."""
    limit, source = derive_budget(
        explicit_mb=explicit_mb,
        pod_limit_mb=pod_limit_mb,
        workers=workers,
        worker_rss=_rss(os.getpid()),
        parent_rss=_rss(os.getppid()),
    )
    return MemoryBudget(limit, source=source)
