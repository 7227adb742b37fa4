"""Serving benchmark: graft over HTTP vs the raw ONNX Runtime ceiling vs a naive peer, in one run.

    python -m scripts.bench                        # writes docs/BENCHMARKS.md and docs/bench.png
    python -m scripts.bench --duration 5 --concurrency 1 16

Load comes from `wrk` (C, one thread, closed loop) so the client costs the 2-core machine as
little as possible; the ceiling is measured in-process with the same session options the
service uses. Everything runs side by side in one invocation so the ratios are comparable.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.artifact import load_artifact
from models.servable import open_version, served_version
from models.versions import default_registry
from scripts.server_process import REPO, BentoServer, free_port

DOCS = REPO / "docs"
COLD_STARTS = 4  # starts per configuration for the cold-start median
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


def photo_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A real photo (scikit-image's astronaut) as a phone-sized JPEG, the typical request."""
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


class Peer:
    """The naive FastAPI + PyTorch server, on its own port."""

    def __init__(self, artifact_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "GRAFT_PEER_ARTIFACT": str(artifact_dir), "GRAFT_PEER_THREADS": "2"}
        uvicorn = str(Path(sys.executable).parent / "uvicorn")
        self.proc = subprocess.Popen(
            [
                uvicorn,
                "scripts.bench.peer:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=env,
        )
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/docs", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("peer did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


ENDPOINTS = {  # route -> task of the model it serves
    "classify": "image-classification",
    "sentiment": "sentiment",
    "detect": "object-detection",
}
TWEET = "the flight was delayed three hours and nobody at the gate could tell us anything, not great"
TOKEN = "bench-admin-token"  # noqa: S105 (a loopback-only benchmark server)


def payloads(jpeg: bytes) -> dict[str, tuple[bytes, str, bytes, str]]:
    """route -> (HTTP body, content type, the raw payload for the ceiling, what it is)."""
    body, ctype = multipart("image", "photo.jpg", jpeg)
    text = json.dumps({"texts": [TWEET]}).encode()
    img = f"640x480 JPEG, {len(jpeg):,} bytes (scikit-image astronaut)"
    return {
        "classify": (body, ctype, jpeg, img),
        "detect": (body, ctype, jpeg, img),
        "sentiment": (text, "application/json", TWEET.encode(), f"one {len(TWEET)}-character text"),
    }


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
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--endpoints", nargs="+", choices=list(ENDPOINTS), default=list(ENDPOINTS))
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-reload", action="store_true", help="skip the p99-during-reload run")
    p.add_argument("--out", default=str(DOCS))
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required: apt-get install -y wrk")
    from service.config import available_cpus

    cpus = available_cpus()
    if cpus != 2:
        print(f"[bench] note: {cpus} CPUs; the 1- and 2-worker runs are still labelled as such", file=sys.stderr)
    scratch = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    try:
        served = copy_served(Path(args.registry), scratch)
        endpoints = [e for e in args.endpoints if ENDPOINTS[e] in served]
        if "classify" not in endpoints:
            raise SystemExit(f"no image-classification model in {args.registry}: run `make models-quick` first")
        results = run_all(args, scratch, served, endpoints, cpus)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_report(results, Path(args.out))
    print(json.dumps(results, indent=2))
    return 0


def run_all(args: argparse.Namespace, registry: Path, served: dict[str, str], endpoints: list[str], cpus: int) -> dict:
    """Every server runs at once (idle ones cost nothing) and each load point alternates between
    them round by round, so a slow spell on the shared machine lands on all of them alike."""
    bodies = payloads(photo_jpeg())
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
        "default_label": default_label(cpus),
        "endpoints": {},
        "cold_start_s": {},
        "rss_mb_idle": {},
        "rss_mb": {},
    }
    ceilings: dict[str, Ceiling] = {}
    for route in endpoints:
        task = ENDPOINTS[route]
        print(f"[bench] ceiling for {route} (in-process ONNX Runtime)...", file=sys.stderr)
        ceilings[route] = Ceiling(task, registry / task / served[task], bodies[route][2], threads=cpus)
        results["endpoints"][route] = {
            "task": task,
            "payload": bodies[route][3],
            "ceiling": ceilings[route].result,
            "runs": {},
        }
    servers: dict[str, Any] = {}
    try:
        configs = (("graft (1 worker)", "1"), ("graft (2 workers)", "2"))
        # Cold start: a few extra starts of each configuration, taking turns, then the one that
        # stays up for the load runs; the median of them all (one start alone is too noisy here).
        starts: dict[str, list[float]] = {label: [] for label, _ in configs}
        for _ in range(COLD_STARTS - 1):
            for label, workers in configs:
                with BentoServer(registry, env={"GRAFT_WORKERS": workers}) as probe:
                    starts[label].append(probe.startup_s)
        for label, workers in configs:
            print(f"[bench] starting {label}...", file=sys.stderr)
            srv = BentoServer(registry, env={"GRAFT_ADMIN_TOKEN": TOKEN, "GRAFT_WORKERS": workers})
            srv.start()
            starts[label].append(srv.startup_s)
            results["cold_start_s"][label] = round(statistics.median(starts[label]), 2)
            results.setdefault("cold_start_samples_s", {})[label] = [round(x, 2) for x in starts[label]]
            results["rss_mb_idle"][label] = worker_rss_mb(srv)
            servers[label] = srv
        if not args.no_peer:
            print("[bench] starting the naive peer (FastAPI + PyTorch eager)...", file=sys.stderr)
            servers["naive peer"] = Peer(registry / "image-classification" / served["image-classification"])
        seconds = args.duration / args.rounds
        for route in endpoints:
            body, ctype = bodies[route][:2]
            targets = [k for k in servers if k.startswith("graft") or route == "classify"]
            for label in targets:
                wrk(servers[label].url + "/" + route, body, ctype, 4, 2)  # warm-up
            for c in args.concurrency:
                print(f"[bench] /{route} at concurrency {c}...", file=sys.stderr)
                rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
                for _ in range(args.rounds):
                    for label in targets:
                        rounds[label].append(wrk(servers[label].url + "/" + route, body, ctype, c, seconds))
                    ceilings[route].samples.append(ceilings[route].sample(seconds))
                for label in targets:
                    results["endpoints"][route]["runs"].setdefault(label, []).append(median_point(rounds[label]))
            ceilings[route].summarise()
        for label, srv in servers.items():
            if label.startswith("graft"):
                results["rss_mb"][label] = worker_rss_mb(srv)
        if not args.no_reload:
            print("[bench] p99 during hot reloads...", file=sys.stderr)
            body, ctype = bodies["classify"][:2]
            target = results["default_label"]
            results["reload"] = reload_run(servers[target], registry, body, ctype, 6.0, args.rounds)
            results["reload"]["server"] = target
    finally:
        for srv in servers.values():
            srv.stop()
        for ceil in ceilings.values():
            ceil.close()
    return results


def default_label(cpus: int) -> str:
    """Which of the two benchmarked servers runs what `GRAFT_WORKERS=auto` would pick here."""
    from service.config import workers_for

    return "graft (1 worker)" if workers_for(cpus) == 1 else "graft (2 workers)"


def _at(points: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((p for p in points if p["concurrency"] == concurrency), None)


def write_report(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        "# Serving benchmarks",
        "",
        "Generated by `python -m scripts.bench` in one run: every number below was measured side by side",
        f"on the same machine. Machine: {m['cpus']} CPUs, {m['processor']}, Python {m['python']}.",
        "Models: "
        + ", ".join(
            f"{t} `{v}`" + (f" ({results['recipes'][t]})" if results.get("recipes", {}).get(t) else "")
            for t, v in results["models"].items()
        )
        + ". Speed depends on the graph, not the training run: a task's quick and default recipes export the "
        "same network at the same input size.",
        f"Load: `wrk -t1 -cN` (closed loop) on loopback, {results['rounds']} rounds of "
        f"{results['duration_s'] / results['rounds']:g} s per point, the servers taking turns round by round;",
        "each statistic is the median over the rounds. The load generator shares the CPUs with the servers.",
        "",
        "The ceiling is raw ONNX Runtime in the benchmark's own process with the service's session options:",
        "*model only* feeds a ready tensor; *end to end* turns the payload into tensors with the service's",
        "preprocessing (decode, resize, tokenise) and runs one ORT call per batch, no HTTP.",
        "",
        "## Summary",
        "",
        f"The default configuration here (`GRAFT_WORKERS=auto` on {m['cpus']} CPUs) is "
        f"**{results.get('default_label', 'graft (1 worker)')[7:-1]}**; the summary is about it, the other "
        "configuration is in the tables below.",
        "",
        "| endpoint | graft req/s (c=16) | ceiling end to end | ratio | other config (c=16) | p99 c=1 | "
        "raw single p50 | overhead |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    label = results.get("default_label", "graft (1 worker)")
    best_label: dict[str, str] = {}
    for route, e in results["endpoints"].items():
        c = e["ceiling"]
        graft_runs = {k: v for k, v in e["runs"].items() if k.startswith("graft")}
        best_label[route] = label
        other = next((k for k in graft_runs if k != label), None)
        g16, g1 = _at(graft_runs[label], 16), _at(graft_runs[label], 1)
        o16 = _at(graft_runs[other], 16) if other else None
        if g16 and g1:
            lines.append(
                f"| /{route} | {g16['rps']:,.1f} | {c['end_to_end_ips']:,.1f} | "
                f"**{g16['rps'] / c['end_to_end_ips']:.2f}x** | "
                + (f"{o16['rps']:,.1f} ({other[7:-1]}, {o16['rps'] / c['end_to_end_ips']:.2f}x)" if o16 else "-")
                + f" | {g1['p99_ms']:.1f} ms | {c['single_p50_ms']} ms | +{g1['p99_ms'] - c['single_p50_ms']:.1f} ms |"
            )
    cls = results["endpoints"].get("classify", {})
    n16 = _at(cls.get("runs", {}).get("naive peer", []), 16)
    if n16:
        g16 = _at(cls["runs"][best_label["classify"]], 16)
        lines += [
            "",
            f"/classify against the naive peer (FastAPI + PyTorch eager, one image per forward, same weights) "
            f"at concurrency 16: **{g16['rps'] / n16['rps']:.1f}x** ({g16['rps']:,.1f} vs {n16['rps']:,.1f} req/s).",
        ]
    lines += [
        "",
        "Worker RSS (all models loaded; idle after start -> after the load runs): "
        + ", ".join(f"{k} {results['rss_mb_idle'][k]} -> {v} MB" for k, v in results["rss_mb"].items())
        + ". Cold start (`bentoml serve` to `/readyz` 200, all models loaded and warmed up; median of "
        + f"{len(next(iter(results.get('cold_start_samples_s', {'': [0]}).values())))} starts, range): "
        + ", ".join(
            f"{k} {v} s ({min(results.get('cold_start_samples_s', {}).get(k, [v]))}-"
            f"{max(results.get('cold_start_samples_s', {}).get(k, [v]))})"
            for k, v in results["cold_start_s"].items()
        )
        + ".",
    ]
    r = results.get("reload")
    if r:
        s, d = r["steady"], r["during_reload"]
        lines += [
            "",
            "## p99 during hot reloads",
            "",
            f"/classify at concurrency 4 on {r.get('server', 'graft (1 worker)')[7:-1]}: "
            f"{r['rounds']} rounds of {r['seconds_per_phase']:g} s steady "
            f"alternating with {r['seconds_per_phase']:g} s during which a new version is dropped into the registry "
            "and `POST /admin/reload` swaps it in every 2 s (medians over the rounds) "
            f"({r['reloads_ok']}/{r['reloads']} reloads answered 200; the last version served afterwards: "
            f"{r['last_version_served']}).",
            "",
            "| phase | req/s | p50 ms | p99 ms | errors |",
            "| --- | --- | --- | --- | --- |",
            f"| steady | {s['rps']:,.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['errors']} |",
            f"| reloading | {d['rps']:,.1f} | {d['p50_ms']:.1f} | {d['p99_ms']:.1f} | {d['errors']} |",
            "",
            f"p99 during reloads / steady p99: **{d['p99_ms'] / s['p99_ms']:.2f}x**.",
        ]
    for route, e in results["endpoints"].items():
        c = e["ceiling"]
        lines += [
            "",
            f"## /{route} ({e['task']}; payload: {e['payload']})",
            "",
            "| ceiling batch | " + " | ".join(str(b) for b in c["model_only_ips"]) + " |",
            "|---" * (len(c["model_only_ips"]) + 1) + "|",
            "| model only, items/s | " + " | ".join(f"{v:,.1f}" for v in c["model_only_ips"].values()) + " |",
            "",
            f"End to end in-process at batch {c['best_batch']}: **{c['end_to_end_ips']:,.1f} items/s** (median of "
            f"{len(c.get('end_to_end_samples', [1]))} samples taken between the servers' turns, range "
            f"{min(c.get('end_to_end_samples', [c['end_to_end_ips']])):,.0f}-"
            f"{max(c.get('end_to_end_samples', [c['end_to_end_ips']])):,.0f}). "
            f"One item at batch 1: p50 {c['single_p50_ms']} ms, p99 {c['single_p99_ms']} ms.",
            "",
            "| server | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, points in e["runs"].items():
            for pt in points:
                lines.append(
                    f"| {label} | {pt['concurrency']} | {pt['rps']:,.1f} | {pt['p50_ms']:.1f} | "
                    f"{pt['p95_ms']:.1f} | {pt['p99_ms']:.1f} | {pt['errors']} |"
                )
    lines += ["", "![bench](bench.png)"]
    (out / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "bench.png")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routes = list(results["endpoints"])
    fig, axes = plt.subplots(2, len(routes), figsize=(4.2 * len(routes), 7), squeeze=False)
    for col, route in enumerate(routes):
        e = results["endpoints"][route]
        top, bottom = axes[0][col], axes[1][col]
        for label, points in e["runs"].items():
            xs = [p["concurrency"] for p in points]
            top.plot(xs, [p["rps"] for p in points], "o-", label=label)
            bottom.plot(xs, [p["p99_ms"] for p in points], "o-", label=label)
        top.axhline(e["ceiling"]["end_to_end_ips"], color="grey", ls="--", label="ceiling (in-process ORT)")
        top.set_title(f"/{route}: throughput (req/s)")
        bottom.set_title(f"/{route}: p99 latency (ms)")
        bottom.set_yscale("log")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.grid(alpha=0.3)
        top.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
