"""The set of models this worker serves, loaded from the registry and swapped on reload.

For each model name the pool serves the version `models.servable` picks: the pinned one, else
the newest, falling back past any version that fails to open (schema, checksums, ONNX Runtime,
warm-up) and keeping what is already served. A refused version is remembered with its error and
the stamp of its files, and is retried only when one of its files changes. Swapping replaces one
dict entry, so a request already holding the old model finishes on it; the old batcher drains.

Readiness means "serving what can be served": a model name with nothing servable (an empty
folder, every version refused) is reported in /models, and does not take the worker out of
rotation as long as some model serves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from models import servable, versions
from models.errors import ArtifactError, InvalidInput

from .config import Settings
from .served import TASKS, ServedModel

log = logging.getLogger("graft.pool")


class ModelNotFound(InvalidInput):
    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=404)


@dataclass
class ModelState:
    """What /models reports for one model name."""

    name: str
    served: ServedModel | None = None
    errors: dict[str, str] = field(default_factory=dict)  # version -> why it was refused
    # version -> stamp of its files when refused: a version copied in half-way is retried once
    # any of its files changes, but a bad artifact is not reopened on every scan.
    refused_stamp: dict[str, versions.Stamp] = field(default_factory=dict)
    pinned: str | None = None
    loaded_at: float = 0.0

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "status": "ready" if self.served else "unavailable",
            "reason": None if self.served else self.reason(),
            "served_version": self.served.version if self.served else None,
            "pinned_version": self.pinned,
            "errors": [{"version": v, "error": e} for v, e in sorted(self.errors.items())],
        }
        if self.served:
            out["task"] = self.served.task
            out["manifest"] = self.served.describe()
        return out

    def reason(self) -> str:
        """Why nothing is served for this name, in one line."""
        if not self.errors:
            return "no version has been loaded yet"
        if set(self.errors) == {"-"}:
            return self.errors["-"]
        return f"every version was refused ({len(self.errors)}); see errors"


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
        """Ready when at least one model serves: a model name with nothing servable is reported in
        /models, never a reason to take every pod that shares the registry out of rotation."""
        return any(s.served is not None for s in self._states.values())

    # ---- loading ------------------------------------------------------------------------
    def _open(self, name: str, version: str) -> ServedModel:
        settings = self.settings
        opened = servable.open_version(
            settings.registry / name / version, name=name, threads=settings.ort_threads, providers=settings.providers
        )
        cls = TASKS[opened.artifact.manifest.task]
        return cls(opened, settings, infer_executor=self._infer, cpu_executor=self._cpu)

    def _try_open(self, state: ModelState, version: str) -> ServedModel | None:
        """Open one version, or record why it is refused (skipped while its files are unchanged)."""
        stamp = versions.version_stamp(self.settings.registry / state.name / version)
        if version in state.errors and state.refused_stamp.get(version) == stamp:
            return None  # refused before and unchanged since
        try:
            model = self._open(state.name, version)
        except Exception as e:  # any failure refuses this version; the scan goes on
            log.error("refusing %s/%s: %s", state.name, version, e)
            state.errors[version] = str(e)
            state.refused_stamp[version] = stamp
            return None
        state.errors.pop(version, None)
        state.refused_stamp.pop(version, None)
        log.info("loaded %s/%s (%s)", state.name, version, model.task)
        return model

    def _resolve(self, state: ModelState) -> ServedModel | None:
        """Open the version that should be served, or None to keep what is served."""
        root = self.settings.registry
        try:
            state.pinned = versions.read_pin(root, state.name)
            order = servable.serving_order(root, state.name)
        except (ArtifactError, OSError) as e:
            state.errors["CURRENT"] = str(e)
            return None
        state.errors.pop("CURRENT", None)
        present = set(order)
        for gone in [v for v in state.errors if v not in present and v != "CURRENT"]:
            state.errors.pop(gone, None)  # deleted versions are no longer news
            state.refused_stamp.pop(gone, None)
        if not order:
            state.errors["-"] = "no versions in the registry"
            return None
        current = state.served.version if state.served is not None else None
        version, model = servable.pick(order, current=current, try_open=lambda v: self._try_open(state, v))
        if state.pinned is not None and version != state.pinned and version is not None:
            log.error("pinned %s/%s is not servable; serving %s", state.name, state.pinned, version)
        return model

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
