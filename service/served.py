"""One loaded version of one model: its ONNX Runtime session, batcher and task logic.

Each task subclasses `ServedModel` in `service/tasks/` and registers itself in TASKS. The base
class does what every task shares: hold the verified session (`models.servable.open_version`
opened it, checked its inputs and ran its warm-up sample), build the batcher, and run batches.

Every request reaches ONNX Runtime through the batcher, one item per input row: the task routes
(an image, a text) and the KServe v2 route (each row of the declared tensors, or each BYTES
element) alike, so every route shares one queue bound and one batch size limit. A task supplies
how items become input tensors (`collate`), optionally what to compute once per batch rather than
per request (`finish`), and how v2 rows become items (`rows_from_tensors`, `rows_from_bytes`).

A request with one small input (an image of a few hundred kB, a text) is prepared right on the
event loop (`run_one`): a thread hand-off there and back costs more than decoding it. Whether the
model then runs on the loop or on the inference thread is the batcher's call (service/batching.py).

Each worker's session has the worker's share of the CPUs (`ort_threads`), the right size under
load. A batch of one while the server's other workers have been idle for a moment runs instead on
the model's solo session, with a thread per CPU (`open_solo`, service/siblings.py): a lone client
gets the machine, not a share of it.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from models.errors import InvalidInput
from models.preprocess import DECODER_BYTES, MemoryHold
from models.runtime import CPU_PROVIDER, create_session
from models.servable import OpenedVersion, check_warmup

from .batching import Batcher, QueueFull
from .budget import AtOnce, MemoryBudget, NotNow
from .config import Settings
from .siblings import Siblings

log = logging.getLogger("graft.served")

TASKS: dict[str, type[ServedModel]] = {}
X = TypeVar("X")

# What an input may be to be prepared on the event loop: at most this many bytes as sent, and at
# most this much decoding memory (`ImagePreprocessor.decode_cost`: the decoder's fixed allowance
# plus about half a megapixel), a few milliseconds of work. Larger inputs are decoded on a thread,
# so that probes and other connections never wait long behind one big upload.
LOOP_INPUT_BYTES = 512 * 1024
LOOP_HOLD_BYTES = DECODER_BYTES + 2 * 2**20


@dataclass(frozen=True)
class RowResult:
    """One item's share of a batched run: its row of every output, and what the task's `finish`
    computed for it (None when the task computes nothing)."""

    outputs: dict[str, np.ndarray]
    extra: Any = None


def register_task(cls: type[ServedModel]) -> type[ServedModel]:
    """Class decorator: route artifacts whose manifest.task matches `cls.task` to `cls`."""
    TASKS[cls.task] = cls
    return cls


class ServedModel(ABC):
    task: ClassVar[str]
    # What a BYTES tensor holds for this task in the v2 protocol: "image", "text", or None.
    bytes_input_name: ClassVar[str | None] = None
    # Largest batch worth forming for this task when the operator has not set one for the model:
    # None means the global GRAFT_MAX_BATCH_SIZE. Big batches of big tensors only grow the arena.
    batch_cap: ClassVar[int | None] = None

    def __init__(
        self,
        opened: OpenedVersion,
        settings: Settings,
        *,
        infer_executor: Executor,
        cpu_executor: Executor,
        budget: MemoryBudget | None = None,
        siblings: Siblings | None = None,
    ) -> None:
        self.artifact = opened.artifact
        self.manifest = opened.artifact.manifest
        self.session = opened.session
        self.settings = settings
        self.cpu_executor = cpu_executor
        self.infer_executor = infer_executor
        self.budget = budget  # the worker's memory budget for decoding (None: unbounded, in tools)
        # The lone-request session (`open_solo`): a thread per CPU, used for a batch of one while
        # no worker of this server runs a model (`siblings`). None until opened, or not wanted.
        self.siblings = siblings
        self.solo_session: Any = None
        self.solo_threads = 0
        self.input_names = opened.input_names
        self.output_names = opened.output_names
        cfg = settings.batching(self.manifest.name)
        max_batch = cfg.max_batch_size
        if self.batch_cap is not None and self.manifest.name not in settings.batching_per_model:
            max_batch = min(max_batch, self.batch_cap)
        self.batcher: Batcher[Any, Any] = Batcher(
            self.run_batch,
            executor=infer_executor,
            max_batch_size=max_batch,
            max_latency_ms=cfg.max_latency_ms,
            max_queue=cfg.max_queue,
            loop_run_ms=cfg.loop_run_ms,
            name=f"{self.manifest.name}:{self.manifest.version}",
        )

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def ref(self) -> dict[str, str]:
        """The {name, version} every response carries."""
        return {"name": self.name, "version": self.version}

    # ---- the one place a batch meets ONNX Runtime (on the event loop or the inference thread) ----
    @abstractmethod
    def collate(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        """Stack or pad prepared items into the model's input tensors, by input name."""

    def finish(self, outputs: dict[str, np.ndarray]) -> Sequence[Any] | None:
        """Per-batch work on the outputs, one entry per item (e.g. softmax), or None."""
        return None

    def run_feeds(self, feeds: dict[str, np.ndarray], session: Any = None) -> dict[str, np.ndarray]:
        """One ONNX run on input tensors (on `session`, default the model's); every output by name."""
        return dict(zip(self.output_names, (session or self.session).run(None, feeds), strict=True))

    def run_batch(self, items: Sequence[Any]) -> list[RowResult]:
        """Run the model on prepared items; one result per item, in order. A lone item while the
        whole server is idle runs on every CPU (the solo session); anything else on this worker's
        share. Both sessions are the same model file: the same answer either way (to float rounding:
        the thread count changes the order of sums)."""
        feeds = self.collate(items)
        siblings, session = self.siblings, None
        if siblings is None:
            outputs = self.run_feeds(feeds)
        else:
            if len(items) == 1 and self.solo_session is not None and siblings.all_idle():
                session = self.solo_session
            with siblings.running():
                outputs = self.run_feeds(feeds, session)
        extras = self.finish(outputs)
        return [
            RowResult({name: out[i] for name, out in outputs.items()}, None if extras is None else extras[i])
            for i in range(len(items))
        ]

    def open_solo(self, threads: int, max_mb: int) -> bool:
        """Open the lone-request session (a thread per CPU, spinning only within a run) and run
        the warm-up sample on it; False when not wanted: no siblings board, no more threads than
        the worker's own session has, a model on an accelerator (the device is the lone request's
        already), or a model file over `max_mb` (a second copy in memory would cost more than the
        latency is worth)."""
        path = self.artifact.model_path
        providers = tuple(self.session.get_providers())
        if (
            self.siblings is None
            or threads <= max(1, self.settings.ort_threads)
            or providers != (CPU_PROVIDER,)
            or path.stat().st_size > max_mb * 2**20
        ):
            return False
        session = create_session(path, threads=threads, providers=providers, spin_within_run=True)
        check_warmup(self.artifact, session)  # the same outputs as the serving session, and warm
        self.solo_session, self.solo_threads = session, threads
        return True

    # ---- a request's way in ------------------------------------------------------------------
    async def run_one(self, prepare: Callable[[MemoryHold | None], tuple[Any, X]], size: int) -> tuple[RowResult, X]:
        """One request with one input of `size` bytes (an image, a text): `prepare(hold)` turns it
        into a batcher item, plus whatever its answer needs later (a detection's geometry),
        holding its decoding memory in `hold`; then the item is batched with other requests'.

        A small input is prepared right here on the event loop (`prepare` raises NotNow when its
        decoding would need more memory than that allows, or would have to wait for it); a large
        one on a decode thread.
        """
        try:
            if size > LOOP_INPUT_BYTES:
                raise NotNow(f"{size} bytes")
            item, extra = prepare(AtOnce(self.budget, LOOP_HOLD_BYTES))
        except NotNow:
            item, extra = await asyncio.get_running_loop().run_in_executor(self.cpu_executor, prepare, self.budget)
        return await self.batcher.submit(item), extra

    async def submit_all(self, items: Sequence[Any]) -> list[RowResult]:
        """Queue every item of one request for batching and wait for all of them. A request that
        would take the queue past its bound is refused whole (503), not queued in part."""
        b = self.batcher
        if b.pending + len(items) > b.max_queue:
            raise QueueFull(f"{b.name}: {b.pending} items queued, {len(items)} more would pass {b.max_queue}")
        return list(await asyncio.gather(*(b.submit(item) for item in items)))

    # ---- the KServe v2 route's way in ----------------------------------------------------------
    def rows_from_tensors(self, tensors: dict[str, np.ndarray]) -> list[Any]:
        """Declared input tensors (already checked against the manifest's names, dtypes and fixed
        dimensions, batch first) to one batcher item per row. Image tasks: the one image tensor."""
        (arr,) = tensors.values()
        return list(arr)

    def rows_from_bytes(self, items: list[bytes]) -> list[Any]:
        """Encoded inputs (images, texts) to batcher items, by the artifact's rules (decode threads)."""
        raise InvalidInput(f"{self.task} models take no BYTES input; send the declared tensors")

    def bytes_to_feeds(self, items: list[bytes]) -> dict[str, np.ndarray]:
        """Encoded inputs straight to input tensors (benchmarks: no batcher)."""
        return self.collate(self.rows_from_bytes(items))

    def describe(self) -> dict[str, Any]:
        """Metadata for /models and the v2 protocol."""
        return {
            **self.manifest.summary(),
            "inputs": [i.model_dump() for i in self.manifest.inputs],
            "outputs": [o.model_dump() for o in self.manifest.outputs],
            "providers": self.session.get_providers(),
            "batching": {
                "max_batch_size": self.batcher.max_batch_size,
                "max_latency_ms": self.batcher.max_latency_s * 1000.0,
                "batches": self.batcher.stats.batches,
                "items": self.batcher.stats.items,
                "largest_batch": self.batcher.stats.max_seen,
                "on_event_loop": self.batcher.stats.on_loop,
                # threads a lone request runs on while the server is otherwise idle (None: the
                # worker's own share, ort_threads); service/siblings.py
                "lone_request_threads": self.solo_threads if self.solo_session is not None else None,
            },
        }

    async def drain(self) -> None:
        """Let queued requests finish (after a swap); the session is freed with the last reference."""
        await self.batcher.drain()
