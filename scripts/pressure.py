"""Measure what the worst legal requests do to a real server (numbers for docs/DEPLOY.md).

    python -m scripts.pressure images --registry models/registry --workers 2 --memory-mb 1536
    python -m scripts.pressure livez --registry models/registry --clients 4 --seconds 20

`images`: concurrent uploads of the largest image the limits allow, in its most expensive mode
(a 6,300 x 6,300 RGBA PNG, 39.7 megapixels, 0.2 MB on the wire); samples the resident memory
of every process of the server (the `bentoml serve` parent and its workers) every 10 ms and
reports the peak, the baseline before the uploads, and every answer's status.

`livez`: clients that each send maximum-size /v2 JSON bodies (a float tensor filling the body
limit, parsed to millions of Python floats) back to back, while another client polls /livez;
reports /livez latency percentiles and the /v2 answers.

Each starts its own `bentoml serve` on loopback with the settings given (like a pod's) and
stops it when done; the tests in tests/test_robustness.py call the same functions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.queues
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from scripts.server_process import BentoServer

WORST_SIDE = 6300  # 6300^2 = 39.69 MP, under the default 40 MP limit


def worst_case_png(side: int = WORST_SIDE) -> bytes:
    """An RGBA PNG of side x side pixels, varied in colour and alpha, that compresses to about
    0.2 MB: bands of identical rows stored with PNG's "Up" filter are runs of zeros."""
    x = np.arange(side, dtype=np.uint32)
    pixels = np.empty((side, side, 4), dtype=np.uint8)
    pixels[..., 0] = (x // 16 % 256)[None, :]
    pixels[..., 1] = (x // 64 * 37 % 256)[:, None]
    pixels[..., 2] = 90
    pixels[..., 3] = np.where((x // 64) % 2 == 0, 255, 128)[None, :]
    flat = pixels.reshape(side, side * 4)
    up = flat.copy()
    up[1:] -= flat[:-1]  # filter type 2: each byte minus the byte above it (mod 256)
    rows = np.concatenate([np.full((side, 1), 2, dtype=np.uint8), up], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 6, 0, 0, 0])  # 8-bit RGBA
    idat = zlib.compress(rows.tobytes(), 6)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 for those that vanished)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class RssSampler:
    """Samples `tree_rss(pid)` on a background thread until stopped; keeps the peak."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.samples += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def _upload_all(url: str, png: bytes, uploads: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(i: int) -> int:
            route = "/classify" if i % 2 == 0 else "/detect"
            r = await client.post(route, files={"image": ("worst.png", png, "image/png")})
            return r.status_code

        return list(await asyncio.gather(*(one(i) for i in range(uploads))))


def image_pressure(server: BentoServer, uploads: int = 8, png: bytes | None = None) -> dict[str, Any]:
    """Send `uploads` worst-case uploads at once (half /classify, half /detect); memory and answers."""
    assert server.proc is not None
    png = png or worst_case_png()
    baseline = tree_rss(server.proc.pid)
    started = time.monotonic()
    with RssSampler(server.proc.pid) as sampler:
        statuses = asyncio.run(_upload_all(server.url, png, uploads))
    memory = httpx.get(server.url + "/models", timeout=30).json().get("memory", {})
    return {
        "uploads": uploads,
        "png_bytes": len(png),
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "seconds": round(time.monotonic() - started, 2),
        "baseline_rss_mb": round(baseline / 2**20),
        "peak_rss_mb": round(sampler.peak / 2**20),
        "rss_samples": sampler.samples,
        "worker_budget": memory,
    }


def max_v2_json_body(limit_bytes: int, row_values: int = 3 * 64 * 64, name: str = "input") -> tuple[bytes, int]:
    """A /v2 infer body for an FP32 [N, 3, 64, 64] input with as many rows as fit under the body
    limit (values written with 6 decimals, as clients do); returns the body and N."""
    rng = np.random.default_rng(0)
    row = ",".join(f"{v:.6f}" for v in rng.standard_normal(row_values))
    head = '{"inputs":[{"name":"%s","datatype":"FP32","shape":[%d,3,64,64],"data":['
    n = (limit_bytes - 200) // (len(row) + 1)
    body = (head % (name, n) + ",".join([row] * n) + "]}]}").encode()
    assert len(body) <= limit_bytes, len(body)
    return body, n


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def _probe_livez(url: str, seconds: float, every_s: float, out: multiprocessing.queues.Queue) -> None:
    """In its own process, like the kubelet: GET /livez every `every_s`; puts (latencies, errors)."""
    latencies, errors = [], []
    stop = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                r = client.get("/livez")
                if r.status_code != 200:
                    errors.append(f"/livez {r.status_code}")
            except httpx.HTTPError as e:
                errors.append(f"/livez {e!r}")
            latencies.append(time.monotonic() - t0)
            time.sleep(every_s)
    out.put((latencies, errors))


async def _send_bodies(url: str, model: str, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    stop = time.monotonic() + seconds
    statuses: dict[str, int] = {}
    times: list[float] = []
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:

        async def sender() -> None:
            while time.monotonic() < stop:
                t0 = time.monotonic()
                try:
                    r = await client.post(
                        f"/v2/models/{model}/infer", content=body, headers={"content-type": "application/json"}
                    )
                    statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
                    times.append(time.monotonic() - t0)
                except httpx.HTTPError as e:
                    errors.append(repr(e))

        await asyncio.gather(*(sender() for _ in range(clients)))
    return {"statuses": statuses, "times": times, "errors": errors}


def livez_pressure(
    server: BentoServer, clients: int = 4, seconds: float = 20.0, limit_bytes: int = 20 * 1024 * 1024
) -> dict[str, Any]:
    """/livez latency (probed from another process every 50 ms) while `clients` send
    maximum-size /v2 JSON bodies to the image classifier back to back."""
    body, rows = max_v2_json_body(limit_bytes)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    prober = ctx.Process(target=_probe_livez, args=(server.url, seconds, 0.05, out), daemon=True)
    prober.start()
    sent = asyncio.run(_send_bodies(server.url, "image-classification", body, clients, seconds))
    livez, errors = out.get(timeout=seconds + 60)
    prober.join(30)
    return {
        "clients": clients,
        "body_mb": round(len(body) / 2**20, 2),
        "rows_per_body": rows,
        "seconds": seconds,
        "livez_n": len(livez),
        "livez_p50_ms": round(_percentile(livez, 50) * 1000, 1),
        "livez_p99_ms": round(_percentile(livez, 99) * 1000, 1),
        "livez_max_ms": round(max(livez, default=float("nan")) * 1000, 1),
        "v2_statuses": sent["statuses"],
        "v2_median_s": round(statistics.median(sent["times"]), 2) if sent["times"] else None,
        "errors": (errors + sent["errors"])[:10],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.pressure", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["images", "livez"])
    p.add_argument("--registry", default="models/registry")
    p.add_argument("--workers", default="2")
    p.add_argument("--memory-mb", type=int, default=1536, help="the pod's memory limit (GRAFT_MEMORY_MB)")
    p.add_argument("--uploads", type=int, default=8)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args(argv)
    env = {"GRAFT_WORKERS": args.workers, "GRAFT_MEMORY_MB": str(args.memory_mb), "GRAFT_ACCESS_LOG": "0"}
    with BentoServer(Path(args.registry), env=env) as server:
        if args.what == "images":
            result = image_pressure(server, args.uploads)
        else:
            result = livez_pressure(server, args.clients, args.seconds)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
