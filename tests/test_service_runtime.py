"""Worker-level runtime choices in service/runtime.py."""

from __future__ import annotations

import pytest

from service.runtime import disable_idle_tracing


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.delenv("GRAFT_TRACING", raising=False)
    return monkeypatch


def test_tracing_is_turned_off_when_bentoml_collects_none(clean_env) -> None:
    import os

    # BentoML's defaults: no exporter, sample rate unset (0): every span would be dropped.
    assert disable_idle_tracing() is True
    assert os.environ["OTEL_SDK_DISABLED"] == "true"


def test_tracing_is_left_alone_when_asked_or_configured(clean_env) -> None:
    import os

    clean_env.setenv("GRAFT_TRACING", "1")
    assert disable_idle_tracing() is False and "OTEL_SDK_DISABLED" not in os.environ

    clean_env.delenv("GRAFT_TRACING")
    from bentoml._internal.configuration.containers import BentoMLContainer

    tracing = BentoMLContainer.config.tracing
    saved = tracing.exporter_type.get(), tracing.sample_rate.get()
    try:
        tracing.exporter_type.set("otlp")
        tracing.sample_rate.set(0.5)
        assert disable_idle_tracing() is False and "OTEL_SDK_DISABLED" not in os.environ
    finally:
        tracing.exporter_type.set(saved[0])
        tracing.sample_rate.set(saved[1])
    assert tracing.exporter_type.get() is saved[0]

    clean_env.setenv("OTEL_SDK_DISABLED", "false")  # the operator's own OTel setting wins
    assert disable_idle_tracing() is False and os.environ["OTEL_SDK_DISABLED"] == "false"


def test_graft_tracing_0_forces_it_off(clean_env) -> None:
    import os

    clean_env.setenv("GRAFT_TRACING", "0")
    assert disable_idle_tracing() is True and os.environ["OTEL_SDK_DISABLED"] == "true"


@pytest.mark.parametrize(
    ("env", "workers", "ort_threads"),
    [
        ({"GRAFT_CPUS": "1"}, 1, 1),
        ({"GRAFT_CPUS": "2"}, 2, 1),
        ({"GRAFT_CPUS": "1.5"}, 2, 1),  # a fractional limit rounds up, like the kubelet's
        ({"GRAFT_CPUS": "16"}, 4, 4),  # at most 4 workers: each holds every model
        ({"GRAFT_CPUS": "2", "GRAFT_WORKERS": "1"}, 1, 2),
        ({"GRAFT_CPUS": "4", "GRAFT_WORKERS": "auto", "GRAFT_ORT_THREADS": "3"}, 4, 3),
    ],
)
def test_workers_and_threads_follow_the_cpus(monkeypatch, env, workers, ort_threads) -> None:
    from service.config import Settings

    for name in ("GRAFT_CPUS", "GRAFT_WORKERS", "GRAFT_ORT_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings.from_env()
    assert (s.workers, s.ort_threads) == (workers, ort_threads)


def test_bad_cpu_count_is_refused_by_name(monkeypatch) -> None:
    from service.config import Settings

    monkeypatch.setenv("GRAFT_CPUS", "two")
    with pytest.raises(ValueError, match="GRAFT_CPUS"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("argv", "supervisor"),
    [
        (["/venv/bin/bentoml", "serve", "service:Graft", "--port", "3000"], True),
        (["/venv/lib/python3.11/site-packages/bentoml/__main__.py", "serve", "service:Graft"], True),
        (["/venv/lib/python3.11/site-packages/_bentoml_impl/worker/service.py", "service:Graft"], False),
        (["/venv/bin/bentoml", "build"], False),
        (["/venv/bin/pytest", "serve"], False),
        (["python"], False),
    ],
)
def test_only_the_bentoml_serve_command_is_the_supervisor(argv, supervisor, monkeypatch) -> None:
    from service.runtime import serve_supervisor

    monkeypatch.delenv("GRAFT_LEAN_SUPERVISOR", raising=False)
    assert serve_supervisor(argv) is supervisor
    monkeypatch.setenv("GRAFT_LEAN_SUPERVISOR", "0")
    assert serve_supervisor(argv) is False


def test_the_supervisor_declares_the_same_service_without_the_worker_code() -> None:
    """`bentoml serve`'s own process gets the same service (name, workers, API routes, traffic)
    without importing FastAPI, ONNX Runtime, numpy or PIL."""
    import json
    import subprocess
    import sys

    probe = (
        "import json, sys\n"
        "sys.argv = [sys.argv[1], 'serve', 'service:Graft']\n"
        "import service.service as s\n"
        "svc = s.Graft\n"
        "heavy = sorted(m for m in ('fastapi', 'onnxruntime', 'numpy', 'PIL', 'tokenizers') if m in sys.modules)\n"
        "print(json.dumps({'supervisor': s.SUPERVISOR, 'heavy': heavy, 'name': svc.name,\n"
        "  'config': svc.config, 'routes': sorted(a.route for a in svc.apis.values())}, default=str))\n"
    )
    out = {}
    for prog in ("/venv/bin/bentoml", "/venv/bin/python"):
        run = subprocess.run([sys.executable, "-c", probe, prog], capture_output=True, text=True, check=True)
        out[prog] = json.loads(run.stdout.strip().splitlines()[-1])
    lean, full = out["/venv/bin/bentoml"], out["/venv/bin/python"]
    assert lean["supervisor"] is True and full["supervisor"] is False
    assert lean["heavy"] == [], lean["heavy"]
    assert {"fastapi", "numpy", "PIL"} <= set(full["heavy"])  # (ONNX Runtime: at the first session)
    assert {k: lean[k] for k in ("name", "config", "routes")} == {k: full[k] for k in ("name", "config", "routes")}
    assert lean["routes"] == ["/bentoml/classify", "/bentoml/detect", "/bentoml/sentiment"]
