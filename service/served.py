"""One loaded version of one model: its ONNX Runtime session, batcher and task logic.

Each task subclasses `ServedModel` in `service/tasks/` and registers itself in TASKS. The base
class does what every task shares: hold the verified session (`models.servable.open_version`
opened it, checked its inputs and ran its warm-up sample) and build the batcher.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any, ClassVar

import numpy as np

from models.errors import InvalidInput
from models.servable import OpenedVersion

from .batching import Batcher
from .config import Settings

log = logging.getLogger("graft.served")

TASKS: dict[str, type[ServedModel]] = {}


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
        self, opened: OpenedVersion, settings: Settings, *, infer_executor: Executor, cpu_executor: Executor
    ) -> None:
        self.artifact = opened.artifact
        self.manifest = opened.artifact.manifest
        self.session = opened.session
        self.settings = settings
        self.cpu_executor = cpu_executor
        self.infer_executor = infer_executor
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

    @abstractmethod
    def run_batch(self, items: Sequence[Any]) -> Sequence[Any]:
        """Run the model on preprocessed items (on the inference thread); one result per item."""

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One unbatched ONNX run on raw input tensors; every output by name (v2 protocol)."""
        return dict(zip(self.output_names, self.session.run(None, feeds), strict=True))

    def bytes_to_feeds(self, items: list[bytes]) -> dict[str, np.ndarray]:
        """Encoded inputs (images, texts) to the model's input tensors, by the artifact's rules."""
        raise InvalidInput(f"{self.task} models take no BYTES input; send the declared tensors")

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
            },
        }

    async def drain(self) -> None:
        """Let queued requests finish (after a swap); the session is freed with the last reference."""
        await self.batcher.drain()
