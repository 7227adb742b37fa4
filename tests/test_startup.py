"""What a start does: `bentoml serve`'s own process stays light, the workers hold the models and
give a lone request the CPUs their siblings are not using."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from service.config import Settings


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _loads_onnxruntime(pid: int) -> bool:
    return "onnxruntime_pybind11_state" in Path(f"/proc/{pid}/maps").read_text()


def test_the_supervisor_never_loads_the_model_runtime(server) -> None:
    """The process `bentoml serve` starts with reads the service's configuration and starts the
    workers; ONNX Runtime (and the rest of graft's worker code) is loaded by the workers only."""
    supervisor = server.proc.pid
    workers = [pid for pid in _children(supervisor) if _loads_onnxruntime(pid)]
    assert len(workers) == Settings.from_env().workers, _children(supervisor)
    assert not _loads_onnxruntime(supervisor)


def test_small_models_get_a_lone_request_session_with_several_workers(server) -> None:
    """Opened in the background once a worker is ready: poll /models (either worker) for it."""
    settings = Settings.from_env()
    wanted = settings.solo_threads if settings.workers >= 2 and settings.solo_threads >= 2 else None
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(server.url + "/models", timeout=10) as r:
            models = {m["name"]: m for m in json.load(r)["models"]}
        threads = {name: m["manifest"]["batching"]["lone_request_threads"] for name, m in models.items()}
        if threads["image-classification"] == wanted or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # The quick image classifier is a few MB: it gets one wherever there are two workers.
    assert threads["image-classification"] == wanted
    for name, m in models.items():
        size = (server.registry / name / m["served_version"] / "model.onnx").stat().st_size
        if size > settings.solo_max_mb * 2**20:
            assert threads[name] is None, name  # a second copy of a big model is not worth it
