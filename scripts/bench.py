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
from models.preprocess import ImagePreprocessor
from scripts.registry import served_version
from scripts.server_process import REPO, BentoServer, free_port

DOCS = REPO / "docs"
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


def ceiling(artifact_dir: Path, jpeg: bytes, threads: int, seconds: float = 3.0) -> dict[str, Any]:
    """Raw in-process ONNX Runtime: model-only at each batch size, and decode+preprocess+model."""
    from service.runtime import create_session

    art = load_artifact(artifact_dir)
    pre = ImagePreprocessor(art.manifest.preprocessing)
    sess = create_session(art.model_path, threads=threads)
    name = sess.get_inputs()[0].name
    x1, _ = pre.from_bytes(jpeg)
    model_only = {}
    for bs in (1, 4, 16, 32, 64):
        batch = np.repeat(x1[None], bs, axis=0)
        sess.run(None, {name: batch})
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            sess.run(None, {name: batch})
            runs += 1
        model_only[bs] = round(runs * bs / (time.perf_counter() - start), 1)
    best_bs = max(model_only, key=model_only.get)
    # End to end in one process: decode + preprocess every image, one ORT run per best batch.
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = np.stack([pre.from_bytes(jpeg)[0] for _ in range(best_bs)])
        sess.run(None, {name: batch})
        n += best_bs
    e2e = n / (time.perf_counter() - start)
    lat = []
    for _ in range(200):
        t0 = time.perf_counter()
        sess.run(None, {name: pre.from_bytes(jpeg)[0][None]})
        lat.append((time.perf_counter() - t0) * 1000)
    return {
        "model_only_ips": model_only,
        "best_batch": best_bs,
        "model_only_best_ips": model_only[best_bs],
        "end_to_end_ips": round(e2e, 1),
        "single_image_p50_ms": round(statistics.median(lat), 2),
        "single_image_p99_ms": round(float(np.percentile(lat, 99)), 2),
    }


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
                "scripts.bench_peer:app",
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.splitlines()[0])
    p.add_argument("--registry", default=os.environ.get("MODEL_REGISTRY") or str(REPO / "models" / "registry"))
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--out", default=str(DOCS))
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required: apt-get install -y wrk")
    registry = Path(args.registry)
    version = served_version(registry, "image-classification")
    if version is None:
        raise SystemExit(f"no image-classification model in {registry}: run `make models-quick` first")
    art_dir = registry / "image-classification" / version
    jpeg = photo_jpeg()
    body, ctype = multipart("image", "photo.jpg", jpeg)
    from service.config import available_cpus

    cpus = available_cpus()
    results: dict[str, Any] = {
        "machine": {
            "cpus": cpus,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "payload": f"640x480 JPEG, {len(jpeg)} bytes (scikit-image astronaut)",
        "model": f"image-classification {version}",
        "duration_s": args.duration,
    }
    print("[bench] ceiling (in-process ONNX Runtime)...", file=sys.stderr)
    results["ceiling"] = ceiling(art_dir, jpeg, threads=cpus)

    runs: dict[str, list[dict[str, Any]]] = {}
    for label, env in (("graft (1 worker)", {"GRAFT_WORKERS": "1"}), ("graft (2 workers)", {"GRAFT_WORKERS": "2"})):
        print(f"[bench] {label}...", file=sys.stderr)
        srv = BentoServer(registry, env=env)
        t0 = time.perf_counter()
        srv.start()
        cold = time.perf_counter() - t0
        try:
            wrk(srv.url + "/classify", body, ctype, 4, 2)  # warm-up
            points = [wrk(srv.url + "/classify", body, ctype, c, args.duration) for c in args.concurrency]
            results.setdefault("cold_start_s", {})[label] = round(cold, 2)
            results.setdefault("rss_mb", {})[label] = worker_rss_mb(srv)
        finally:
            srv.stop()
        runs[label] = points
    if not args.no_peer:
        print("[bench] naive peer (FastAPI + PyTorch eager)...", file=sys.stderr)
        peer = Peer(art_dir)
        try:
            wrk(peer.url + "/classify", body, ctype, 4, 2)
            runs["naive peer"] = [wrk(peer.url + "/classify", body, ctype, c, args.duration) for c in args.concurrency]
        finally:
            peer.stop()
    results["runs"] = runs
    write_report(results, Path(args.out))
    print(json.dumps(results, indent=2))
    return 0


def write_report(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    c = results["ceiling"]
    runs = results["runs"]
    graft_key = max((k for k in runs if k.startswith("graft")), key=lambda k: max(p["rps"] for p in runs[k]))
    lines = [
        "# Serving benchmarks",
        "",
        "Generated by `python -m scripts.bench` in one run (all numbers side by side on the same machine).",
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['processor']}, "
        f"Python {results['machine']['python']}. Model: {results['model']}. Payload: {results['payload']}.",
        f"Load: `wrk -t1 -cN -d{results['duration_s']:g}s` (closed loop) on loopback; the client shares the CPUs.",
        "",
        "## Ceiling: raw ONNX Runtime in-process",
        "",
        "| batch | " + " | ".join(str(b) for b in c["model_only_ips"]) + " |",
        "|---" * (len(c["model_only_ips"]) + 1) + "|",
        "| model only, img/s | " + " | ".join(f"{v:,.0f}" for v in c["model_only_ips"].values()) + " |",
        "",
        f"Decode + preprocess + model at batch {c['best_batch']}: **{c['end_to_end_ips']:,.0f} img/s** "
        f"(the end-to-end ceiling). One image, batch 1: p50 {c['single_image_p50_ms']} ms, "
        f"p99 {c['single_image_p99_ms']} ms.",
        "",
        "## /classify over HTTP",
        "",
        "| server | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, points in runs.items():
        for pt in points:
            lines.append(
                f"| {label} | {pt['concurrency']} | {pt['rps']:,.1f} | {pt['p50_ms']:.1f} | "
                f"{pt['p95_ms']:.1f} | {pt['p99_ms']:.1f} | {pt['errors']} |"
            )
    g16 = next((p for p in runs[graft_key] if p["concurrency"] == 16), None)
    n16 = next((p for p in runs.get("naive peer", []) if p["concurrency"] == 16), None)
    g1 = next((p for p in runs[graft_key] if p["concurrency"] == 1), None)
    lines += ["", "## Ratios", ""]
    if g16:
        lines.append(
            f"- {graft_key} at concurrency 16 / end-to-end ceiling: "
            f"**{g16['rps'] / c['end_to_end_ips']:.2f}x**; / model-only ceiling: "
            f"{g16['rps'] / c['model_only_best_ips']:.2f}x"
        )
    if g16 and n16:
        lines.append(f"- {graft_key} / naive peer at concurrency 16: **{g16['rps'] / n16['rps']:.1f}x**")
    if g1:
        lines.append(
            f"- p99 at concurrency 1: {g1['p99_ms']:.1f} ms vs raw single-image p50 "
            f"{c['single_image_p50_ms']} ms (+{g1['p99_ms'] - c['single_image_p50_ms']:.1f} ms)"
        )
    lines += [
        "",
        "Worker RSS after the run: " + ", ".join(f"{k} {v} MB" for k, v in results["rss_mb"].items()),
        "Cold start (`bentoml serve` to /readyz 200): "
        + ", ".join(f"{k} {v} s" for k, v in results["cold_start_s"].items()),
        "",
        "![bench](bench.png)",
    ]
    (out / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, points in runs.items():
        xs = [p["concurrency"] for p in points]
        ax1.plot(xs, [p["rps"] for p in points], "o-", label=label)
        ax2.plot(xs, [p["p99_ms"] for p in points], "o-", label=label)
    ax1.axhline(c["end_to_end_ips"], color="grey", ls="--", label="ceiling: in-process decode+ORT")
    for ax, title in ((ax1, "throughput (req/s)"), (ax2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
