"""The set of models this worker serves, loaded from the registry and swapped on reload.

For each model name the pool serves one version: the pinned one (CURRENT), or else the newest
version that passes validation (schema, checksums, ONNX Runtime session, warm-up). A version
that fails is remembered with its error and never served. Swapping replaces one dict entry, so
a request already holding the old model finishes on it; the old batcher drains and closes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import versions
from models.artifact import load_artifact
from models.errors import ArtifactError, GraftError, InvalidInput

from .config import Settings
from .served import TASKS, ServedModel

log = logging.getLogger("graft.pool")


def _manifest_stamp(folder: Path) -> tuple[int, int] | None:
    try:
        st = (folder / "manifest.json").stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class ModelNotFound(InvalidInput):
    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=404)


@dataclass
class ModelState:
    """What /models reports for one model name."""

    name: str
    served: ServedModel | None = None
    errors: dict[str, str] = field(default_factory=dict)  # version -> why it was refused
    # version -> manifest stamp when refused: a version copied in half-way is retried once its
    # manifest changes, but a bad artifact is not reopened on every scan.
    refused_stamp: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    pinned: str | None = None
    loaded_at: float = 0.0

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "status": "ready" if self.served else "unavailable",
            "served_version": self.served.version if self.served else None,
            "pinned_version": self.pinned,
            "errors": [{"version": v, "error": e} for v, e in sorted(self.errors.items())],
        }
        if self.served:
            out["task"] = self.served.task
            out["manifest"] = self.served.describe()
        return out


class ModelPool:
    def __init__(self, settings: Settings, *, infer_executor: Executor, cpu_executor: Executor) -> None:
        self.settings = settings
        self._infer = infer_executor
        self._cpu = cpu_executor
        self._states: dict[str, ModelState] = {}
        self._lock = threading.Lock()  # one reload at a time
        self.generation = 0
        self.last_signature: tuple[tuple[str, float], ...] = ()

    # ---- lookup -------------------------------------------------------------------------
    def get(self, task: str, name: str | None = None) -> ServedModel:
        """The served model for a request: by name, or the default model of the task."""
        if name:
            state = self._states.get(name)
            if state is None:
                known = ", ".join(sorted(self._states)) or "none"
                raise ModelNotFound(f"unknown model {name!r} (known: {known})")
            if state.served is None:
                raise ModelNotFound(f"model {name!r} has no servable version; see GET /models")
            if state.served.task != task:
                raise InvalidInput(f"model {name!r} is a {state.served.task} model, not {task}")
            return state.served
        candidates = [s.served for s in self._states.values() if s.served and s.served.task == task]
        if not candidates:
            raise ModelNotFound(f"no {task} model is loaded; see GET /models")
        for m in candidates:
            if m.name == task:
                return m
        return sorted(candidates, key=lambda m: m.name)[0]

    def served(self) -> list[ServedModel]:
        return [s.served for s in self._states.values() if s.served is not None]

    def report(self) -> list[dict[str, Any]]:
        return [self._states[n].report() for n in sorted(self._states)]

    @property
    def ready(self) -> bool:
        """Ready when at least one model serves and every known model has a servable version."""
        return bool(self._states) and all(s.served is not None for s in self._states.values())

    # ---- loading ------------------------------------------------------------------------
    def _open(self, name: str, version: str) -> ServedModel:
        artifact = load_artifact(self.settings.registry / name / version)
        if artifact.name != name:
            raise ArtifactError(f"manifest name {artifact.name!r} does not match folder {name!r}")
        cls = TASKS.get(artifact.manifest.task)
        if cls is None:
            raise ArtifactError(f"task {artifact.manifest.task!r} is not supported by this service")
        model = cls(artifact, self.settings, infer_executor=self._infer, cpu_executor=self._cpu)
        model.warm_up()
        return model

    def _resolve(self, state: ModelState) -> ServedModel | None:
        """Open the version that should be served, or None if it is the one already served."""
        root = self.settings.registry
        try:
            state.pinned = versions.read_pin(root, state.name)
            order = versions.candidates(root, state.name)
        except (ArtifactError, OSError) as e:
            state.errors["CURRENT"] = str(e)
            return None
        state.errors.pop("CURRENT", None)
        if not order:
            state.errors["-"] = "no versions in the registry"
            return None
        state.errors.pop("-", None)
        for version in order:
            if state.served is not None and state.served.version == version:
                return None  # already serving the right one
            stamp = _manifest_stamp(root / state.name / version)
            if version in state.errors and state.refused_stamp.get(version) == stamp:
                continue  # refused before and unchanged since
            try:
                model = self._open(state.name, version)
            except (GraftError, OSError, ValueError, RuntimeError) as e:
                log.error("refusing %s/%s: %s", state.name, version, e)
                state.errors[version] = str(e)
                state.refused_stamp[version] = stamp
                continue
            state.errors.pop(version, None)
            state.refused_stamp.pop(version, None)
            log.info("loaded %s/%s (%s)", state.name, version, model.task)
            return model
        if state.pinned is not None and state.served is not None:
            log.error("pinned %s/%s is not servable; keeping %s", state.name, state.pinned, state.served.version)
        return None

    def scan(self) -> list[ServedModel]:
        """Bring every model to the version it should serve. Returns the replaced models.

        Blocking (opens sessions, runs warm-ups): call it from a thread, not the event loop.
        """
        with self._lock:
            root = self.settings.registry
            names = versions.list_models(root)
            self.last_signature = versions.signature(root)
            retired: list[ServedModel] = []
            for gone in set(self._states) - set(names):
                state = self._states.pop(gone)
                if state.served is not None:
                    retired.append(state.served)
            for name in names:
                state = self._states.setdefault(name, ModelState(name))
                new = self._resolve(state)
                if new is not None:
                    if state.served is not None:
                        retired.append(state.served)
                    state.served = new  # the swap: one reference assignment
                    state.loaded_at = time.time()
            self.generation += 1
            return retired

    async def reload(self) -> dict[str, Any]:
        """Rescan off the event loop, swap in new versions, drain and close the old ones."""
        before = {s.name: s.served.version for s in self._states.values() if s.served}
        retired = await asyncio.get_running_loop().run_in_executor(None, self.scan)
        for old in retired:
            await old.drain()
        after = {s.name: s.served.version for s in self._states.values() if s.served}
        changed = {n: {"from": before.get(n), "to": v} for n, v in after.items() if before.get(n) != v}
        return {"generation": self.generation, "changed": changed, "models": self.report()}
