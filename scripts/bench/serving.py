"""Serving benchmark: graft over HTTP against the servers a user would pick instead, and against the
in-process ceiling, all in one run.

    python -m scripts.bench                        # writes docs/BENCHMARKS.md, docs/bench.json, docs/bench.png
    python -m scripts.bench --duration 6 --concurrency 1 16

For /classify, on a 96x96 and a 640x480 JPEG, at concurrency 1, 16 and 64:

* graft, in its default configuration (`GRAFT_WORKERS=auto`) and the other worker count;
* graft called the way BentoML's client calls it (`/bentoml/classify`, service/bento_api.py);
* graft with `GRAFT_FASTPATH=0`: the inference route through BentoML's whole ASGI stack, which is
  what service/fastpath.py's short way saves;
* an idiomatic BentoML service (scripts/bench/bentoml_peer.py: `@bentoml.api(batchable=True)`,
  default ONNX Runtime session, one worker);
* a naive FastAPI + ONNX Runtime server (scripts/bench/naive_peer.py: one image per run);
* the ceiling: the same model and preprocessing in this process, no HTTP (`Ceiling`).

All of them serve the same model file. /sentiment and /detect are measured for graft against
their ceilings. Load comes from `wrk` (C, one thread, closed loop, keep-alive), so the client
costs the machine as little as possible; every load point runs in rounds, the servers taking
turns, and the ceiling is re-sampled between rounds, so that a slow spell on a shared machine
lands on all of them alike. Cold starts (`bentoml serve` to the first `/readyz` 200) of graft
with three models and of the one-model BentoML service alternate the same way.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.artifact import load_artifact
from models.servable import open_version, served_version
from models.versions import default_registry
from scripts.server_process import REPO, BentoServer, free_port

DOCS = REPO / "docs"
COLD_STARTS = 4  # starts per server for the cold-start median
TOKEN = "bench-admin-token"  # noqa: S105 (a loopback-only benchmark server)
TWEET = "the flight was delayed three hours and nobody at the gate could tell us anything, not great"
GRAFT, GRAFT_OTHER = "graft", "graft (other workers)"
VIA_CLIENT = "graft, BentoML client's route"
FULL_STACK = "graft, full ASGI stack"  # GRAFT_FASTPATH=0: what service/fastpath.py saves
BENTOML_PEER, NAIVE_PEER = "BentoML service", "FastAPI + ONNX Runtime"

WRK_SCRIPT = r"""
local path = os.getenv("BENCH_BODY")
local f = assert(io.open(path, "rb")); local body = f:read("*all"); f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,"p50":%d,"p95":%d,"p99":%d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def photo_jpeg(width: int, height: int) -> bytes:
    """A real photo (scikit-image's astronaut) as a JPEG of the given size."""
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((width, height))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "graftbenchboundary7d3f"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class Case:
    """One thing measured: a route of graft's with one payload, and which servers take it."""

    key: str  # e.g. classify-96
    route: str  # graft's route, e.g. /classify
    task: str
    payload: bytes  # what the ceiling preprocesses: image bytes or text
    what: str  # the payload in words
    peers: bool  # the peers and BentoML's route are measured too (image classification)


TASK_OF = {"classify": "image-classification", "sentiment": "sentiment", "detect": "object-detection"}


def cases(endpoints: list[str]) -> list[Case]:
    small, photo = photo_jpeg(96, 96), photo_jpeg(640, 480)
    small_what, photo_what = f"96x96 JPEG, {len(small):,} bytes", f"640x480 JPEG, {len(photo):,} bytes"
    out = []
    if "classify" in endpoints:
        out.append(Case("classify-96", "/classify", "image-classification", small, small_what, True))
        out.append(Case("classify-640", "/classify", "image-classification", photo, photo_what, True))
    if "sentiment" in endpoints:
        out.append(
            Case("sentiment", "/sentiment", "sentiment", TWEET.encode(), f"one {len(TWEET)}-character text", False)
        )
    if "detect" in endpoints:
        out.append(Case("detect-640", "/detect", "object-detection", photo, photo_what, False))
    return out


@dataclass(frozen=True)
class Target:
    """A server's way to take a case: the URL and the request body it expects."""

    url: str
    body: bytes
    content_type: str


def target_for(label: str, server: Any, case: Case) -> Target:
    if case.task == "sentiment":
        return Target(server.url + case.route, json.dumps({"texts": [TWEET]}).encode(), "application/json")
    if label == BENTOML_PEER:  # a batchable API takes a list: one image as `images`
        body, ctype = multipart("images", "photo.jpg", case.payload)
        return Target(server.url + "/classify", body, ctype)
    body, ctype = multipart("image", "photo.jpg", case.payload)
    route = "/bentoml" + case.route if label == VIA_CLIENT else case.route
    return Target(server.url + route, body, ctype)


def wrk(url: str, body: bytes, content_type: str, concurrency: int, duration: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "body").write_bytes(body)
        (Path(tmp) / "post.lua").write_text(WRK_SCRIPT)
        env = {**os.environ, "BENCH_BODY": str(Path(tmp) / "body"), "BENCH_CONTENT_TYPE": content_type}
        cmd = [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{duration:g}s",
            "--timeout",
            "30s",
            "-s",
            str(Path(tmp) / "post.lua"),
            url,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    r = json.loads(line)
    seconds = r["duration_us"] / 1e6
    return {
        "concurrency": concurrency,
        "rps": round(r["requests"] / seconds, 1),
        "p50_ms": r["p50"] / 1000,
        "p95_ms": r["p95"] / 1000,
        "p99_ms": r["p99"] / 1000,
        "errors": r["status_errors"] + r["socket_errors"],
        "requests": r["requests"],
    }


class Ceiling:
    """Raw in-process ONNX Runtime, no HTTP: model-only at each batch size, then payload bytes ->
    the service's own preprocessing (`bytes_to_feeds`) -> one ORT run per batch, single-threaded
    Python like a hand-written script. Built from the service's task class, so the work per
    request is exactly what the server does minus HTTP, batching and (for detection) NMS.

    The end-to-end rate is sampled again in every round of every load point (`sample`), between
    the servers' turns, so that it sees the same spells of a shared machine as they do."""

    def __init__(self, task: str, artifact_dir: Path, payload: bytes, threads: int, seconds: float = 3.0) -> None:
        import dataclasses
        from concurrent.futures import ThreadPoolExecutor

        import service.tasks  # noqa: F401 (registers the task classes)
        from service.config import Settings
        from service.served import TASKS

        settings = dataclasses.replace(Settings.from_env(), ort_threads=threads)
        self.pool = ThreadPoolExecutor(1)
        self.task, self.payload = task, payload
        opened = open_version(artifact_dir, threads=threads)
        self.model = TASKS[task](opened, settings, infer_executor=self.pool, cpu_executor=self.pool)
        feeds1 = self.model.bytes_to_feeds([payload])
        model_only = {}
        for bs in (1, 4, 16, 32, 64):
            batch = {k: np.repeat(v, bs, axis=0) for k, v in feeds1.items()}
            self.model.run_feeds(batch)
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 2:
                self.model.run_feeds(batch)
                runs += 1
            model_only[bs] = round(runs * bs / (time.perf_counter() - start), 1)
        self.best_bs = max(model_only, key=model_only.get)
        lat = []
        for _ in range(100 if task == "object-detection" else 200):
            t0 = time.perf_counter()
            self.model.run_feeds(self.model.bytes_to_feeds([payload]))
            lat.append((time.perf_counter() - t0) * 1000)
        self.samples: list[float] = [self.sample(seconds)]
        self.result: dict[str, Any] = {
            "model_only_ips": model_only,
            "best_batch": self.best_bs,
            "model_only_best_ips": model_only[self.best_bs],
            "single_p50_ms": round(statistics.median(lat), 2),
            "single_p99_ms": round(float(np.percentile(lat, 99)), 2),
        }
        self.summarise()

    def sample(self, seconds: float) -> float:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.model.run_feeds(self.model.bytes_to_feeds([self.payload] * self.best_bs))
            n += self.best_bs
        return n / (time.perf_counter() - start)

    def summarise(self) -> dict[str, Any]:
        self.result["end_to_end_ips"] = round(statistics.median(self.samples), 1)
        self.result["end_to_end_samples"] = [round(x, 1) for x in self.samples]
        return self.result

    def close(self) -> None:
        self.pool.shutdown()


def worker_rss_mb(server: BentoServer) -> float:
    assert server.proc is not None
    out = subprocess.run(["ps", "-eo", "pid,ppid,rss,args"], capture_output=True, text=True).stdout
    total = 0
    for line in out.splitlines()[1:]:
        parts = line.split(None, 3)
        if parts[1] == str(server.proc.pid) and "_bentoml_impl.worker" in parts[3]:
            total += int(parts[2])
    return round(total / 1024, 1)


class NaivePeer:
    """The naive FastAPI + ONNX Runtime server (scripts/bench/naive_peer.py), under uvicorn."""

    def __init__(self, artifact_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "GRAFT_PEER_ARTIFACT": str(artifact_dir)}
        uvicorn = str(Path(sys.executable).parent / "uvicorn")
        cmd = [uvicorn, "scripts.bench.naive_peer:app", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen([*cmd, "--log-level", "warning"], cwd=REPO, env=env)
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/docs", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the naive peer did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def bentoml_peer(registry: Path, artifact_dir: Path) -> BentoServer:
    """The idiomatic one-model BentoML service (scripts/bench/bentoml_peer.py), not started yet."""
    return BentoServer(
        registry, target="scripts.bench.bentoml_peer:Classifier", env={"GRAFT_PEER_ARTIFACT": str(artifact_dir)}
    )


READY_LINE = re.compile(
    r"graft worker ready: .*loaded and warmed up in ([0-9.]+) s \((.*?)\), ([0-9.-]+) s after the process started"
)


def worker_breakdown(server: BentoServer) -> list[dict[str, float]]:
    """Each worker's start, from its `graft worker ready` log line: seconds from process start to
    ready, the model loading in all, and its steps (verify, session, checks)."""
    out = []
    for match in READY_LINE.finditer(server.log_tail(2000)):
        steps = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", match.group(2))}
        out.append({"ready_after_process_start": float(match.group(3)), "models": float(match.group(1)), **steps})
    return out


ENDPOINTS = ("classify", "sentiment", "detect")


def copy_served(src: Path, dst: Path) -> dict[str, str]:
    """Copy each model's served version into a scratch registry (the reload run adds versions)."""
    served = {}
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        version = served_version(src, folder.name)
        if version:
            shutil.copytree(folder / version, dst / folder.name / version)
            served[folder.name] = version
    return served


def model_recipe(folder: Path) -> str:
    """`default recipe`, `quick recipe, int8`: how a benchmarked model was built, from its manifest."""

    m = load_artifact(folder).manifest
    int8 = ", int8" if m.export.quantization is not None else ""
    return f"{m.training.recipe} recipe{int8}"


def clone_version(registry: Path, name: str) -> str:
    """Drop a copy of the served version in as a new version, atomically, as an operator would."""
    from models.artifact import MANIFEST, new_version, write_manifest
    from models.manifest import Manifest

    src = registry / name / served_version(registry, name)
    version = new_version()
    tmp = registry / name / f".incoming-{version}"
    shutil.copytree(src, tmp)
    manifest = Manifest.model_validate_json((tmp / MANIFEST).read_text())
    write_manifest(tmp, manifest.model_copy(update={"version": version}))
    os.replace(tmp, registry / name / version)
    return version


def median_point(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One load point from several interleaved rounds: medians of each statistic, errors summed."""
    med = {k: statistics.median(r[k] for r in rounds) for k in ("rps", "p50_ms", "p95_ms", "p99_ms")}
    return {
        "concurrency": rounds[0]["concurrency"],
        **{k: round(v, 2) for k, v in med.items()},
        "errors": sum(r["errors"] for r in rounds),
        "requests": sum(r["requests"] for r in rounds),
        "rounds_rps": [r["rps"] for r in rounds],
    }


def reload_run(
    srv: BentoServer, registry: Path, body: bytes, ctype: str, seconds: float, rounds: int
) -> dict[str, Any]:
    """p99 of /classify at concurrency 4, steady vs while new versions are swapped in every 2 s;
    the two phases alternate `rounds` times so that drift on a shared machine hits both alike."""
    import threading

    import httpx

    outcomes: list[str] = []

    def swapper(stop: threading.Event) -> None:
        while not stop.wait(2.0):
            version = clone_version(registry, "image-classification")
            r = httpx.post(srv.url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
            outcomes.append(f"{version}:{r.status_code}")

    steady, during = [], []
    for _ in range(rounds):
        steady.append(wrk(srv.url + "/classify", body, ctype, 4, seconds))
        stop = threading.Event()
        t = threading.Thread(target=swapper, args=(stop,), daemon=True)
        t.start()
        during.append(wrk(srv.url + "/classify", body, ctype, 4, seconds))
        stop.set()
        t.join(timeout=90)
    served = httpx.get(srv.url + "/models", timeout=10).json()
    entry = next(m for m in served["models"] if m["name"] == "image-classification")
    last = outcomes[-1].split(":")[0] if outcomes else None
    return {
        "steady": median_point(steady),
        "during_reload": median_point(during),
        "seconds_per_phase": seconds,
        "rounds": rounds,
        "reloads": len(outcomes),
        "reloads_ok": sum(o.endswith(":200") for o in outcomes),
        "last_version_served": entry.get("served_version") == last,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.splitlines()[0])
    p.add_argument("--registry", default=str(default_registry()))
    p.add_argument("--duration", type=float, default=12.0, help="seconds per load point, over all rounds")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per load point (medians reported)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--endpoints", nargs="+", choices=ENDPOINTS, default=list(ENDPOINTS))
    p.add_argument("--cold-starts", type=int, default=COLD_STARTS, help="starts per server for the cold-start median")
    p.add_argument("--no-peers", action="store_true", help="graft and the ceiling only")
    p.add_argument("--no-reload", action="store_true", help="skip the p99-during-reload run")
    p.add_argument("--out", default=str(DOCS))
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required: apt-get install -y wrk")
    from service.config import available_cpus

    cpus = available_cpus()
    scratch = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    try:
        served = copy_served(Path(args.registry), scratch)
        if "image-classification" not in served:
            raise SystemExit(f"no image-classification model in {args.registry}: run `make models-quick` first")
        endpoints = [
            e
            for e in args.endpoints
            if {"classify": "image-classification", "detect": "object-detection"}.get(e, e) in served
        ]
        results = run_all(args, scratch, served, cases(endpoints), cpus)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_report(results, Path(args.out))
    print(json.dumps(results, indent=2))
    return 0


def run_all(args: argparse.Namespace, registry: Path, served: dict[str, str], todo: list[Case], cpus: int) -> dict:
    """Start every server (idle ones cost nothing), then measure each case round by round."""
    from service.config import workers_for

    workers = {GRAFT: workers_for(cpus), GRAFT_OTHER: 1 if workers_for(cpus) > 1 else 2}
    classifier = registry / "image-classification" / served["image-classification"]
    results: dict[str, Any] = {
        "machine": {
            "cpus": cpus,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "duration_s": args.duration,
        "rounds": args.rounds,
        "models": dict(served),
        "recipes": {task: model_recipe(registry / task / version) for task, version in served.items()},
        "workers": workers,
        "cases": {},
        "cold_start": {},
        "rss_mb_idle": {},
        "rss_mb": {},
    }
    ceilings: dict[str, Ceiling] = {}
    for case in todo:
        print(f"[bench] ceiling for {case.key} (in-process ONNX Runtime)...", file=sys.stderr)
        ceilings[case.key] = Ceiling(case.task, registry / case.task / served[case.task], case.payload, threads=cpus)
        results["cases"][case.key] = {
            "route": case.route,
            "task": case.task,
            "payload": case.what,
            "ceiling": ceilings[case.key].result,
            "runs": {},
        }
    servers: dict[str, Any] = {}
    try:
        servers.update(cold_starts(args, registry, classifier, workers, results))
        for label, srv in servers.items():
            if label != BENTOML_PEER:
                results["rss_mb_idle"][label] = worker_rss_mb(srv)
        if not args.no_peers:
            print("[bench] starting the naive peer (FastAPI + ONNX Runtime)...", file=sys.stderr)
            servers[NAIVE_PEER] = NaivePeer(classifier)
            env = {"GRAFT_ADMIN_TOKEN": TOKEN, "GRAFT_WORKERS": str(workers[GRAFT]), "GRAFT_FASTPATH": "0"}
            servers[FULL_STACK] = BentoServer(registry, env=env).start()
        seconds = args.duration / args.rounds
        for case in todo:
            labels = [GRAFT, GRAFT_OTHER]
            if case.peers and not args.no_peers:
                labels = [GRAFT, VIA_CLIENT, FULL_STACK, GRAFT_OTHER, BENTOML_PEER, NAIVE_PEER]
            targets = {
                label: target_for(label, servers[GRAFT if label == VIA_CLIENT else label], case) for label in labels
            }
            for t in targets.values():
                wrk(t.url, t.body, t.content_type, 4, 2)  # warm-up
            for c in args.concurrency:
                print(f"[bench] {case.key} at concurrency {c}...", file=sys.stderr)
                rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in targets}
                for _ in range(args.rounds):
                    for label, t in targets.items():
                        rounds[label].append(wrk(t.url, t.body, t.content_type, c, seconds))
                    ceilings[case.key].samples.append(ceilings[case.key].sample(seconds))
                for label in targets:
                    results["cases"][case.key]["runs"].setdefault(label, []).append(median_point(rounds[label]))
            ceilings[case.key].summarise()
        for label in (GRAFT, GRAFT_OTHER):
            results["rss_mb"][label] = worker_rss_mb(servers[label])
        if not args.no_reload:
            print("[bench] p99 during hot reloads...", file=sys.stderr)
            body, ctype = multipart("image", "photo.jpg", photo_jpeg(640, 480))
            results["reload"] = reload_run(servers[GRAFT], registry, body, ctype, 6.0, args.rounds)
    finally:
        for srv in servers.values():
            srv.stop()
        for ceil in ceilings.values():
            ceil.close()
    return results


def cold_starts(
    args: argparse.Namespace, registry: Path, classifier: Path, workers: dict[str, int], results: dict[str, Any]
) -> dict[str, Any]:
    """`bentoml serve` to the first /readyz 200, the servers taking turns; the last start of each
    stays up for the load runs. graft's first start hashes the artifacts' files; later starts find
    their checksums remembered (models/checksums.py), as a restarted server does."""
    labels = [GRAFT, GRAFT_OTHER] + ([] if args.no_peers else [BENTOML_PEER])
    starts: dict[str, list[float]] = {label: [] for label in labels}
    steps: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    kept: dict[str, Any] = {}
    for i in range(max(1, args.cold_starts)):
        for label in labels:
            print(f"[bench] cold start {i + 1} of {label}...", file=sys.stderr)
            if label == BENTOML_PEER:
                srv = bentoml_peer(registry, classifier)
            else:
                env = {"GRAFT_ADMIN_TOKEN": TOKEN, "GRAFT_WORKERS": str(workers[label])}
                srv = BentoServer(registry, env=env)
            srv.start()
            starts[label].append(srv.startup_s)
            if label != BENTOML_PEER:
                deadline = time.monotonic() + 30  # the other workers' ready lines, for the breakdown
                while len(worker_breakdown(srv)) < workers[label] and time.monotonic() < deadline:
                    time.sleep(0.2)
                steps[label].append(median_steps(worker_breakdown(srv)))
            if i == max(1, args.cold_starts) - 1:
                kept[label] = srv
            else:
                srv.stop()
    for label in labels:
        results["cold_start"][label] = {
            "median_s": round(statistics.median(starts[label]), 2),
            "samples_s": [round(x, 2) for x in starts[label]],
            "first_s": round(starts[label][0], 2),
            "restart_median_s": round(statistics.median(starts[label][1:] or starts[label]), 2),
            "steps_first": steps[label][0] if steps[label] else {},
            "steps_restart": median_steps(steps[label][1:]) if len(steps[label]) > 1 else {},
        }
    return kept


def median_steps(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for row in rows for k in row}
    return {k: round(statistics.median(row[k] for row in rows if k in row), 2) for k in sorted(keys)}


# ---- the report ---------------------------------------------------------------------------------
TARGET_C1 = "p50 and p99 no worse than the naive FastAPI + ONNX Runtime server's"
CEILING_TARGETS = {"classify-96": 0.85, "classify-640": 0.9}
PEER_FACTOR = 2.5
COLD_MARGIN_S = 0.75


def _at(points: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((p for p in points if p["concurrency"] == concurrency), None)


def names(results: dict[str, Any]) -> dict[str, str]:
    """Labels as the report shows them (worker counts spelled out)."""

    def workers(n: int) -> str:
        return f"{n} worker{'s' if n > 1 else ''}"

    w = results["workers"]
    return {
        GRAFT: f"graft ({workers(w[GRAFT])}, default)",
        GRAFT_OTHER: f"graft ({workers(w[GRAFT_OTHER])})",
        VIA_CLIENT: f"graft via BentoML's client ({workers(w[GRAFT])})",
        FULL_STACK: f"graft, full BentoML ASGI stack (GRAFT_FASTPATH=0, {workers(w[GRAFT])})",
        BENTOML_PEER: "idiomatic BentoML service (1 worker)",
        NAIVE_PEER: "naive FastAPI + ONNX Runtime",
    }


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(what, measured, met) for each target of issue 21 that this run measured."""
    rows: list[tuple[str, str, bool]] = []
    for key, e in results["cases"].items():
        runs, label = e["runs"], key.split("-")[-1] + (" px" if key.startswith("classify") else "")
        g1, n1 = _at(runs.get(GRAFT, []), 1), _at(runs.get(NAIVE_PEER, []), 1)
        if g1 and n1:
            met = g1["p50_ms"] <= n1["p50_ms"] and g1["p99_ms"] <= n1["p99_ms"]
            rows.append(
                (
                    f"/classify {label}, concurrency 1: {TARGET_C1}",
                    f"p50 {g1['p50_ms']:.2f} vs {n1['p50_ms']:.2f} ms, p99 {g1['p99_ms']:.2f} vs {n1['p99_ms']:.2f} ms",
                    met,
                )
            )
        g16 = _at(runs.get(GRAFT, []), 16)
        if g16 and key in CEILING_TARGETS:
            ceiling = e["ceiling"]["end_to_end_ips"]
            ratio = g16["rps"] / ceiling
            rows.append(
                (
                    f"/classify {label}, concurrency 16: {CEILING_TARGETS[key]}x the in-process ceiling or more",
                    f"{ratio:.2f}x ({g16['rps']:,.0f} req/s vs {ceiling:,.0f} img/s)",
                    ratio >= CEILING_TARGETS[key],
                )
            )
            peers = {p: _at(runs.get(p, []), 16) for p in (BENTOML_PEER, NAIVE_PEER)}
            if all(peers.values()):
                factors = {p: g16["rps"] / pt["rps"] for p, pt in peers.items() if pt}
                rows.append(
                    (
                        f"/classify {label}, concurrency 16: {PEER_FACTOR}x every peer or more",
                        ", ".join(f"{f:.1f}x {names(results)[p]}" for p, f in factors.items()),
                        min(factors.values()) >= PEER_FACTOR,
                    )
                )
    cold = results["cold_start"]
    if GRAFT in cold and BENTOML_PEER in cold:
        g, b = cold[GRAFT]["median_s"], cold[BENTOML_PEER]["median_s"]
        rows.append(
            (
                f"cold start, three models: no more than the one-model BentoML service's + {COLD_MARGIN_S} s",
                f"{g:.2f} s vs {b:.2f} s ({g - b:+.2f} s; median of {len(cold[GRAFT]['samples_s'])} starts each)",
                g <= b + COLD_MARGIN_S,
            )
        )
    return rows


def write_report(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    m, label = results["machine"], names(results)
    lines = [
        "# Serving benchmarks",
        "",
        "Generated by `python -m scripts.bench` in one run: every number below was measured side by side",
        f"on the same machine. Machine: {m['cpus']} CPUs, {m['processor']}, Python {m['python']}.",
        "Models: "
        + ", ".join(f"{t} `{v}` ({results['recipes'].get(t, '?')})" for t, v in results["models"].items())
        + ". Every server below serves the same `model.onnx`.",
        f"Load: `wrk -t1 -cN` (closed loop, keep-alive) on loopback, {results['rounds']} rounds of "
        f"{results['duration_s'] / results['rounds']:g} s per point, the servers taking turns round by round;",
        "each statistic is the median over the rounds. The load generator shares the CPUs with the servers.",
        "",
        "The servers: graft in its default configuration (`GRAFT_WORKERS=auto`) and with the other worker count;",
        "graft's `/bentoml/classify`, the route `bentoml.SyncHTTPClient` calls (service/bento_api.py);",
        "graft with `GRAFT_FASTPATH=0` (/classify through BentoML's whole ASGI stack: what service/fastpath.py saves);",
        "an idiomatic BentoML service (scripts/bench/bentoml_peer.py: `@bentoml.api(batchable=True)` over PIL",
        "images, default ONNX Runtime session, 1 worker); a naive FastAPI + ONNX Runtime server",
        "(scripts/bench/naive_peer.py: a sync route, `UploadFile`, full decode, default session, one image per run).",
        "The ceiling is the same model and the service's own preprocessing in the benchmark's process, no HTTP:",
        "decode, resize, one ONNX Runtime call per batch (the service's session options, all CPUs), one Python thread.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {what} | {got} | {'yes' if met else '**no**'} |" for what, got, met in targets(results)]
    for e in results["cases"].values():
        if e["route"] != "/classify" or NAIVE_PEER not in e["runs"]:
            continue
        order = [x for x in (GRAFT, VIA_CLIENT, FULL_STACK, GRAFT_OTHER, BENTOML_PEER, NAIVE_PEER) if x in e["runs"]]
        lines += [
            "",
            f"## /classify, {e['payload']}: graft against the alternatives",
            "",
            "Requests per second, and p50 / p99 latency in ms. Ceiling: "
            f"**{e['ceiling']['end_to_end_ips']:,.0f} img/s** end to end in-process at batch "
            f"{e['ceiling']['best_batch']}; one image alone {e['ceiling']['single_p50_ms']} ms (p50).",
            "",
            "| concurrency | " + " | ".join(label[x] for x in order) + " |",
            "| --- |" + " --- |" * len(order),
        ]
        for c in sorted({p["concurrency"] for p in e["runs"][GRAFT]}):
            cells = []
            for x in order:
                pt = _at(e["runs"][x], c)
                cells.append(f"{pt['rps']:,.0f} ({pt['p50_ms']:.1f} / {pt['p99_ms']:.1f})" if pt else "-")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    via = {k: e for k, e in results["cases"].items() if VIA_CLIENT in e["runs"]}
    if via:
        lines += [
            "",
            "## What BentoML's client costs",
            "",
            "`bentoml.SyncHTTPClient(url).classify(image=...)` posts to `/bentoml/classify`, a `@bentoml.api` method",
            "that parses the form with graft's parser and hands the image to the same model pool as `/classify`.",
            "",
            "| payload | concurrency | /classify req/s | /bentoml/classify req/s | ratio | p50 ms, each |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for e in via.values():
            for g in e["runs"][GRAFT]:
                b = _at(e["runs"][VIA_CLIENT], g["concurrency"])
                if b:
                    lines.append(
                        f"| {e['payload'].split(',')[0]} | {g['concurrency']} | {g['rps']:,.0f} | {b['rps']:,.0f} | "
                        f"{b['rps'] / g['rps']:.2f}x | {g['p50_ms']:.2f}, {b['p50_ms']:.2f} |"
                    )
    cold = results["cold_start"]
    if cold:
        lines += [
            "",
            "## Cold start",
            "",
            "From launching `bentoml serve` to the first `/readyz` 200 (graft: three models loaded, verified, warmed",
            "up), the servers taking turns. A first start hashes every artifact file; later starts find the",
            "checksums remembered (models/checksums.py), as a restarted server or pod does.",
            "",
            "| server | median | all starts | first start | later starts (median) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for x, c in cold.items():
            lines.append(
                f"| {label[x]} | **{c['median_s']:.2f} s** | {', '.join(f'{s:.2f}' for s in c['samples_s'])} | "
                f"{c['first_s']:.2f} s | {c['restart_median_s']:.2f} s |"
            )
        lines += [
            "",
            "Where a graft worker's start goes (its `graft worker ready` log line; medians over workers):",
            "",
        ]
        lines += ["| server | start | process start to ready | models | verify | sessions | checks, warm-up |"]
        lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
        for x, c in cold.items():
            for when, st in (("first", c.get("steps_first")), ("later", c.get("steps_restart"))):
                if st:
                    lines.append(
                        f"| {label[x]} | {when} | {st.get('ready_after_process_start', 0):.2f} s | "
                        f"{st.get('models', 0):.2f} s | {st.get('verify', 0):.2f} s | {st.get('session', 0):.2f} s | "
                        f"{st.get('checks', 0):.2f} s |"
                    )
    if results["rss_mb"]:
        lines += [
            "",
            "Worker RSS (all models loaded; idle after start -> after the load runs): "
            + ", ".join(f"{label[k]} {results['rss_mb_idle'][k]} -> {v} MB" for k, v in results["rss_mb"].items())
            + ".",
        ]
    r = results.get("reload")
    if r:
        s, d = r["steady"], r["during_reload"]
        lines += [
            "",
            "## p99 during hot reloads",
            "",
            f"/classify (640x480 JPEG) at concurrency 4 on {label[GRAFT]}: {r['rounds']} rounds of "
            f"{r['seconds_per_phase']:g} s steady alternating with {r['seconds_per_phase']:g} s during which a new "
            "version is dropped into the registry and `POST /admin/reload` swaps it in every 2 s (medians over the "
            f"rounds; {r['reloads_ok']}/{r['reloads']} reloads answered 200; the last version served afterwards: "
            f"{r['last_version_served']}).",
            "",
            "| phase | req/s | p50 ms | p99 ms | errors |",
            "| --- | --- | --- | --- | --- |",
            f"| steady | {s['rps']:,.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['errors']} |",
            f"| reloading | {d['rps']:,.1f} | {d['p50_ms']:.1f} | {d['p99_ms']:.1f} | {d['errors']} |",
            "",
            f"p99 during reloads / steady p99: **{d['p99_ms'] / s['p99_ms']:.2f}x**.",
        ]
    lines += ["", "## Every load point"]
    for e in results["cases"].values():
        c = e["ceiling"]
        lines += [
            "",
            f"### {e['route']} ({e['task']}; payload: {e['payload']})",
            "",
            "| ceiling batch | " + " | ".join(str(b) for b in c["model_only_ips"]) + " |",
            "|---" * (len(c["model_only_ips"]) + 1) + "|",
            "| model only, items/s | " + " | ".join(f"{v:,.1f}" for v in c["model_only_ips"].values()) + " |",
            "",
            f"End to end in-process at batch {c['best_batch']}: **{c['end_to_end_ips']:,.1f} items/s** (median of "
            f"{len(c['end_to_end_samples'])} samples taken between the servers' turns, range "
            f"{min(c['end_to_end_samples']):,.0f}-{max(c['end_to_end_samples']):,.0f}). "
            f"One item at batch 1: p50 {c['single_p50_ms']} ms, p99 {c['single_p99_ms']} ms.",
            "",
            "| server | concurrency | req/s | vs ceiling | p50 ms | p95 ms | p99 ms | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for x, points in e["runs"].items():
            for pt in points:
                lines.append(
                    f"| {label[x]} | {pt['concurrency']} | {pt['rps']:,.1f} | {pt['rps'] / c['end_to_end_ips']:.2f}x | "
                    f"{pt['p50_ms']:.2f} | {pt['p95_ms']:.2f} | {pt['p99_ms']:.2f} | {pt['errors']} |"
                )
    lines += ["", "![bench](bench.png)"]
    (out / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "bench.png")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = names(results)
    keys = list(results["cases"])
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 7), squeeze=False)
    for col, key in enumerate(keys):
        e = results["cases"][key]
        top, bottom = axes[0][col], axes[1][col]
        for x, points in e["runs"].items():
            xs = [p["concurrency"] for p in points]
            top.plot(xs, [p["rps"] for p in points], "o-", label=label[x])
            bottom.plot(xs, [p["p99_ms"] for p in points], "o-", label=label[x])
        top.axhline(e["ceiling"]["end_to_end_ips"], color="grey", ls="--", label="ceiling (in-process)")
        what = e["payload"].split(",")[0]
        top.set_title(f"{e['route']} ({what}): req/s", fontsize=9)
        bottom.set_title(f"{e['route']} ({what}): p99 ms", fontsize=9)
        bottom.set_yscale("log")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.grid(alpha=0.3)
        top.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
