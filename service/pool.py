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
import contextlib
import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import servable, versions
from models.checksums import ChecksumCache
from models.errors import ArtifactError, InvalidInput

from .budget import MemoryBudget
from .config import Settings
from .crashguard import CrashGuard
from .served import TASKS, ServedModel
from .siblings import Siblings

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
    problem: str | None = None  # why the name as a whole has nothing new to offer (no versions, bad pin)
    pinned: str | None = None
    loaded_at: float = 0.0

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "status": "ready" if self.served else "unavailable",
            "reason": None if self.served else self.reason(),
            "served_version": self.served.version if self.served else None,
            "pinned_version": self.pinned,
            "problem": self.problem,
            "errors": [{"version": v, "error": e} for v, e in sorted(self.errors.items())],
        }
        if self.served:
            out["task"] = self.served.task
            out["manifest"] = self.served.describe()
        return out

    def reason(self) -> str:
        """Why nothing is served for this name, in one line."""
        if self.problem:
            return self.problem
        if self.errors:
            return f"every version was refused ({len(self.errors)}); see errors"
        return "no version has been loaded yet"


class ModelPool:
    def __init__(
        self,
        settings: Settings,
        *,
        infer_executor: Executor,
        cpu_executor: Executor,
        budget: MemoryBudget | None = None,
        checksums: ChecksumCache | None = None,
        siblings: Siblings | None = None,
        crash_guard: CrashGuard | None = None,
    ) -> None:
        self.settings = settings
        self.crash_guard = crash_guard  # versions that crashed a process while opening (None: off)
        self.siblings = siblings  # the lone-request rule (service/siblings.py); None: off
        # While True (the worker's first scan), versions open without their lone-request session:
        # `open_solo_sessions` adds them once the worker is ready, so they never delay a start.
        self.defer_solo = True
        self.budget = budget
        self.checksums = checksums  # remembered sha256 of files verified before (None: hash every time)
        self._infer = infer_executor
        self.cpu_executor = cpu_executor  # decoding, tokenizing, parsing large bodies
        self._states: dict[str, ModelState] = {}
        self._lock = threading.Lock()  # one reload at a time
        self.generation = 0
        self.last_signature: tuple[object, ...] = ()
        self.problem: str | None = None  # the registry as a whole could not be read
        # Seconds spent opening versions, by step (models.servable.OpenedVersion.timings), summed.
        self.open_timings: dict[str, float] = {}

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
        candidates = [s.served for s in self._snapshot() if s.served and s.served.task == task]
        if not candidates:
            raise ModelNotFound(f"no {task} model is loaded; see GET /models")
        for m in candidates:
            if m.name == task:
                return m
        return sorted(candidates, key=lambda m: m.name)[0]

    def _snapshot(self) -> list[ModelState]:
        # A scan adds and removes names from another thread: iterating the dict itself could
        # raise "dictionary changed size during iteration"; list() copies it in one step.
        return list(self._states.values())

    def served(self) -> list[ServedModel]:
        return [s.served for s in self._snapshot() if s.served is not None]

    def report(self) -> list[dict[str, Any]]:
        return [s.report() for s in sorted(self._snapshot(), key=lambda s: s.name)]

    @property
    def ready(self) -> bool:
        """Ready when at least one model serves: a model name with nothing servable is reported in
        /models, never a reason to take every pod that shares the registry out of rotation."""
        return any(s.served is not None for s in self._snapshot())

    # ---- loading ------------------------------------------------------------------------
    def _public(self, message: str) -> str:
        """Errors name `<name>/<version>`, never the server's own paths (they reach /models)."""
        root = self.settings.registry
        for prefix in {str(root), str(root.resolve())}:
            message = message.replace(prefix + "/", "").replace(prefix, "<registry>")
        return message

    def _guarded(self, folder: Path) -> contextlib.AbstractContextManager[None]:
        """While a version is being opened: the note that lets a crash be told apart (crashguard)."""
        return self.crash_guard.opening(folder) if self.crash_guard is not None else contextlib.nullcontext()

    def _open(self, name: str, version: str) -> ServedModel:
        settings = self.settings
        folder = settings.registry / name / version
        if self.crash_guard is not None:
            why = self.crash_guard.verdict(folder, name, settings.ort_threads, settings.providers)
            if why is not None:
                raise ArtifactError(why)
        with self._guarded(folder):
            opened = servable.open_version(
                folder,
                name=name,
                threads=settings.ort_threads,
                providers=settings.providers,
                checksums=self.checksums,
            )
        for step, seconds in opened.timings.items():
            self.open_timings[step] = self.open_timings.get(step, 0.0) + seconds
        cls = TASKS[opened.artifact.manifest.task]
        model = cls(
            opened,
            settings,
            infer_executor=self._infer,
            cpu_executor=self.cpu_executor,
            budget=self.budget,
            siblings=self.siblings,
        )
        if not self.defer_solo:
            self._open_solo(model)
        return model

    def _open_solo(self, model: ServedModel) -> None:
        """Add a model's lone-request session; a failure only leaves it without one (logged)."""
        try:
            with self._guarded(self.settings.registry / model.name / model.version):
                opened = model.open_solo(self.settings.solo_threads, self.settings.solo_max_mb)
            if opened:
                log.info(
                    "%s/%s: lone requests run on %d threads", model.name, model.version, self.settings.solo_threads
                )
        except Exception as e:
            log.warning("%s/%s: no lone-request session (%s: %s)", model.name, model.version, type(e).__name__, e)

    def open_solo_sessions(self) -> None:
        """Give every served model its lone-request session (after the first scan; blocking)."""
        with self._lock:
            self.defer_solo = False
            for model in self.served():
                if model.solo_session is None:
                    self._open_solo(model)

    def _try_open(self, state: ModelState, version: str, refused: list[str]) -> ServedModel | None:
        """Open one version, or record why it is refused (skipped while its files are unchanged)."""
        stamp = versions.version_stamp(self.settings.registry / state.name / version)
        if version in state.errors and state.refused_stamp.get(version) == stamp:
            return None  # refused before and unchanged since
        try:
            model = self._open(state.name, version)
        except Exception as e:  # any failure refuses this version; the scan goes on
            message = self._public(str(e))
            log.error("refusing %s/%s: %s", state.name, version, message)
            state.errors[version] = message
            state.refused_stamp[version] = stamp
            refused.append(version)
            return None
        state.errors.pop(version, None)
        state.refused_stamp.pop(version, None)
        log.info("loaded %s/%s (%s)", state.name, version, model.task)
        return model

    def _resolve(self, state: ModelState, refused: list[str]) -> ServedModel | None:
        """Open the version that should be served, or None to keep what is served."""
        root = self.settings.registry
        try:
            state.pinned = versions.read_pin(root, state.name)
            order = servable.serving_order(root, state.name)
        except (ArtifactError, OSError) as e:
            state.problem = self._public(str(e))
            return None
        present = set(order)
        for gone in [v for v in state.errors if v not in present]:
            state.errors.pop(gone, None)  # deleted versions are no longer news
            state.refused_stamp.pop(gone, None)
        state.problem = None if order else "no versions in the registry (a version appears when it is published)"
        current = state.served.version if state.served is not None else None
        version, model = servable.pick(order, current=current, try_open=lambda v: self._try_open(state, v, refused))
        if state.pinned is not None and version != state.pinned and version is not None:
            state.problem = f"pinned version {state.pinned} is not servable; serving {version}"
            log.error("pinned %s/%s is not servable; serving %s", state.name, state.pinned, version)
        return model

    def scan(self) -> tuple[list[ServedModel], dict[str, dict[str, Any]]]:
        """Bring every model to the version it should serve.

        Returns the replaced models (to drain) and each model's outcome: the version served
        before and after, and the versions refused by this scan. Never raises for anything in
        the registry: an unreadable registry keeps what is served. Blocking (opens sessions, runs
        warm-ups): call it from a thread, not the event loop.
        """
        with self._lock:
            root = self.settings.registry
            retired: list[ServedModel] = []
            outcomes: dict[str, dict[str, Any]] = {}
            try:
                if not root.is_dir():
                    raise FileNotFoundError(f"registry folder {root} does not exist")
                names = versions.list_models(root)
                self.last_signature = versions.signature(root)
                self.problem = None
            except OSError as e:  # an NFS hiccup or a missing mount: keep serving what we have
                self.problem = self._public(f"cannot read the registry: {e}")
                log.error("%s; keeping the %d model(s) already served", self.problem, len(self.served()))
                self.generation += 1
                return retired, outcomes
            for gone in set(self._states) - set(names):
                state = self._states.pop(gone)
                outcomes[gone] = {"from": state.served.version if state.served else None, "to": None, "refused": []}
                if state.served is not None:
                    retired.append(state.served)
            for name in names:
                state = self._states.setdefault(name, ModelState(name))
                before = state.served.version if state.served else None
                refused: list[str] = []
                try:
                    new = self._resolve(state, refused)
                except Exception as e:  # a bug must not stop the other models' scan
                    log.exception("scanning %s failed", name)
                    state.problem = self._public(f"scan failed: {type(e).__name__}: {e}")
                    new = None
                if new is not None:
                    if state.served is not None:
                        retired.append(state.served)
                    state.served = new  # the swap: one reference assignment
                    state.loaded_at = time.time()
                outcomes[name] = {
                    "from": before,
                    "to": state.served.version if state.served else None,
                    "refused": refused,
                }
            self.generation += 1
            return retired, outcomes

    async def reload(self) -> dict[str, Any]:
        """Rescan off the event loop, swap in new versions, drain and close the old ones."""
        retired, outcomes = await asyncio.get_running_loop().run_in_executor(None, self.scan)
        for old in retired:
            await old.drain()
        changed = {n: {"from": o["from"], "to": o["to"]} for n, o in outcomes.items() if o["from"] != o["to"]}
        return {
            "generation": self.generation,
            "changed": changed,
            "outcomes": outcomes,
            "registry_problem": self.problem,
            "models": self.report(),
        }
