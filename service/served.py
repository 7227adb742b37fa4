"""One loaded version of one model: its ONNX Runtime session, batcher and task logic.

Each task subclasses `ServedModel` in `service/tasks/` and registers itself in TASKS. The base
class does what every task shares: open the session, check the artifact's declared inputs
against the graph, build the batcher, and run the warm-up sample stored in the artifact.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any, ClassVar

import numpy as np

from models.artifact import Artifact
from models.errors import ArtifactError, InvalidInput

from .batching import Batcher
from .config import Settings
from .runtime import create_session

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

    def __init__(self, artifact: Artifact, settings: Settings, *, infer_executor: Executor, cpu_executor: Executor):
        self.artifact = artifact
        self.manifest = artifact.manifest
        self.settings = settings
        self.cpu_executor = cpu_executor
        self.infer_executor = infer_executor
        self.session = create_session(artifact.model_path, threads=settings.ort_threads, providers=settings.providers)
        self._check_io()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
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

    def _check_io(self) -> None:
        graph_inputs = {i.name for i in self.session.get_inputs()}
        declared = {i.name for i in self.manifest.inputs}
        if graph_inputs != declared:
            raise ArtifactError(
                f"{self.artifact.path}: manifest inputs {sorted(declared)} "
                f"do not match the graph's {sorted(graph_inputs)}"
            )

    @abstractmethod
    def run_batch(self, items: Sequence[Any]) -> Sequence[Any]:
        """Run the model on preprocessed items (on the inference thread); one result per item."""

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One unbatched ONNX run on raw input tensors; every output by name (v2 protocol)."""
        return dict(zip(self.output_names, self.session.run(None, feeds), strict=True))

    def bytes_to_feeds(self, items: list[bytes]) -> dict[str, np.ndarray]:
        """Encoded inputs (images, texts) to the model's input tensors, by the artifact's rules."""
        raise InvalidInput(f"{self.task} models take no BYTES input; send the declared tensors")

    @abstractmethod
    def warmup_outputs(self) -> np.ndarray:
        """Run the artifact's stored warm-up sample through the full serving path; raw outputs."""

    def warm_up(self) -> None:
        """Verify the model reproduces the output recorded at export; refuse it otherwise."""
        w = self.manifest.warmup
        if w is None:
            log.warning("%s:%s has no warm-up sample; serving it unverified", self.name, self.version)
            return
        got = np.asarray(self.warmup_outputs(), dtype=np.float32)
        expected = np.asarray(w.expected, dtype=np.float32)
        if got.shape != expected.shape:
            raise ArtifactError(f"{self.artifact.path}: warm-up output shape {got.shape} != recorded {expected.shape}")
        diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
        if not np.isfinite(diff) or diff > w.atol:
            raise ArtifactError(
                f"{self.artifact.path}: warm-up output differs from the one recorded at export "
                f"by {diff:.3g} (tolerance {w.atol:g}); the model or its preprocessing changed"
            )

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
