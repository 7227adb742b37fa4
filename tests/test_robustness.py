"""Hostile input, load, soak and faults against a real server on loopback. Every check is
bounded in requests and time, and stops by itself."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from scripts.server_process import BentoServer
from tests.conftest import encode

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _png_bomb(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def hostile_requests() -> list[tuple[dict, set[int]]]:
    """(httpx kwargs for POST /classify, acceptable statuses)."""
    ok = encode(Image.new("RGB", (64, 48), (10, 200, 30)))
    jpeg = encode(Image.new("RGB", (300, 200), (200, 10, 30)), "JPEG")
    rgba = encode(Image.new("RGBA", (30, 30), (1, 2, 3, 0)))
    grey16 = encode(Image.fromarray(np.full((20, 20), 40000, np.uint16)))
    cmyk = encode(Image.new("CMYK", (20, 20), (0, 50, 100, 0)), "JPEG")
    gif = io.BytesIO()
    Image.new("P", (10, 10)).save(gif, format="GIF")
    return [
        ({"files": {"image": ("a.png", ok)}}, {200}),
        ({"files": {"image": ("a.jpg", jpeg)}}, {200}),
        ({"files": {"image": ("a.png", rgba)}}, {200}),
        ({"files": {"image": ("a.png", grey16)}}, {200}),
        ({"files": {"image": ("a.jpg", cmyk)}}, {200}),
        ({"files": {"image": ("a.gif", gif.getvalue())}}, {200}),
        ({"files": {"image": ("a.webp", encode(Image.new("RGB", (9, 9)), "WEBP"))}}, {200}),
        ({"files": {"image": ("a.bmp", encode(Image.new("RGB", (9, 9)), "BMP"))}}, {200}),
        ({"files": {"image": ("bomb.png", _png_bomb(30_000, 30_000))}}, {413}),
        ({"files": {"image": ("trunc.jpg", jpeg[: len(jpeg) // 2])}}, {400}),
        ({"files": {"image": ("x.bin", os.urandom(2048))}}, {415}),
        ({"files": {"image": ("e.png", b"")}}, {400}),
        ({"files": {"image": ("a.png", ok)}, "data": {"top_k": "-1"}}, {400}),
        ({"files": {"image": ("a.png", ok)}, "data": {"model": "x" * 200}}, {400}),
        ({"files": {"image": ("a.png", ok)}, "data": {"model": "../../etc"}}, {404}),
        ({"content": b"\xff\xfe\x00garbage", "headers": {"content-type": "multipart/form-data; boundary=zz"}}, {400}),
        ({"content": b"not multipart", "headers": {"content-type": "text/plain"}}, {400}),
        ({"json": {"image": [1, 2, 3]}}, {400}),
    ]


def test_hostile_inputs_get_clear_4xx_and_good_ones_work(server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for kwargs, expected in hostile_requests():
            r = client.post("/classify", **kwargs)
            assert r.status_code in expected, (kwargs.get("files") or kwargs.get("headers"), r.status_code, r.text)
            if r.status_code >= 400:
                assert r.json()["error"], r.text
            assert r.headers.get("x-request-id")


def test_schemathesis_finds_no_server_errors(server, tmp_path: Path) -> None:
    """Property-based fuzzing of every operation in /docs.json; fails on any 5xx."""
    exe = Path(sys.executable).parent / "schemathesis"
    cmd = [
        str(exe),
        "run",
        f"{server.url}/docs.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "30",
        "--seed",
        "7",
        "--request-timeout",
        "30",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    counts = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert counts and counts.group(1) == counts.group(2) and int(counts.group(1)) > 50, tail


def test_seeded_fuzz_of_every_endpoint_gets_no_5xx(server) -> None:
    """scripts.fuzz mangles images, JSON, multipart framing, v2 tensors and admin headers; every
    answer must be a 2xx or a 4xx naming the problem, and the server must stay ready. Schemathesis
    above only varies what the OpenAPI schema declares; this reaches request bodies it cannot."""
    from scripts.fuzz import fuzz

    statuses, failures = fuzz(server.url, 600, seed=11, log=lambda _: None)
    assert not failures, "\n".join(f"#{f.index} {f.case}: {f.detail}" for f in failures[:20])
    assert sum(v for k, v in statuses.items() if isinstance(k, int) and 200 <= k < 300) > 30, statuses
    assert sum(v for k, v in statuses.items() if isinstance(k, int) and 400 <= k < 500) > 200, statuses
    with httpx.Client(base_url=server.url, timeout=30) as client:  # and still answers good requests
        r = client.post("/sentiment", json={"texts": ["still fine"]})
        assert r.status_code == 200 and r.json()["results"][0]["label"], r.text


async def _load(url: str, requests: int, concurrency: int) -> dict[int, int]:
    cases = hostile_requests()
    statuses: dict[int, int] = {}
    sem = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(i: int) -> None:
            kwargs, _ = cases[i % len(cases)]
            async with sem:
                r = await client.post("/classify", **kwargs)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        await asyncio.gather(*(one(i) for i in range(requests)))
    return statuses


def test_mixed_load_has_no_5xx(server) -> None:
    statuses = asyncio.run(_load(server.url, requests=540, concurrency=16))
    assert sum(statuses.values()) == 540
    assert not any(s >= 500 for s in statuses), statuses
    assert statuses.get(200, 0) >= 200


def _worker_pids(server: BentoServer) -> list[int]:
    """Worker processes of a server: children of the `bentoml serve` process."""
    assert server.proc is not None
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    parent = server.proc.pid
    return [
        int(line.split()[0])
        for line in out.splitlines()[1:]
        if line.split()[1] == str(parent) and "_bentoml_impl.worker" in line
    ]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_soak_memory_does_not_grow(server) -> None:
    """Warm up, then several rounds of mixed traffic: worker RSS must level off."""
    pids = _worker_pids(server)
    assert pids
    asyncio.run(_load(server.url, requests=300, concurrency=8))
    baseline = sum(_rss_mb(p) for p in pids)
    samples = []
    for _ in range(4):
        asyncio.run(_load(server.url, requests=300, concurrency=8))
        samples.append(sum(_rss_mb(p) for p in pids))
    growth = samples[-1] - baseline
    assert growth < 40, f"worker RSS grew {growth:.1f} MB over 1,200 requests (baseline {baseline:.0f} MB: {samples})"


def test_killed_worker_is_replaced_and_readiness_reflects_it(registry: Path, image_artifact: Path) -> None:
    img = encode(Image.new("RGB", (32, 32), (5, 5, 5)))
    with BentoServer(registry) as srv:
        (victim,) = _worker_pids(srv)
        os.kill(victim, signal.SIGKILL)
        seen_down = False
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                r = httpx.get(srv.url + "/readyz", timeout=1)
                if r.status_code == 200 and seen_down:
                    break
                seen_down = seen_down or r.status_code != 200
            except httpx.HTTPError:
                seen_down = True
            time.sleep(0.1)
        assert seen_down, "readiness never reflected the dead worker"
        new = _worker_pids(srv)
        assert new and victim not in new
        r = httpx.post(srv.url + "/classify", files={"image": ("x.png", img)}, timeout=30)
        assert r.status_code == 200


# ---- bounded work per request on every route (issue 19: faults 4 to 6) ----------------------------
def _v2(client: httpx.Client, model: str, inputs: list[dict], **extra) -> httpx.Response:
    return client.post(f"/v2/models/{model}/infer", json={"inputs": inputs, **extra})


def _tokens(ids: np.ndarray, mask: np.ndarray | None = None) -> list[dict]:
    mask = np.ones_like(ids) if mask is None else mask
    return [
        {"name": "input_ids", "datatype": "INT64", "shape": list(ids.shape), "data": ids.reshape(-1).tolist()},
        {"name": "attention_mask", "datatype": "INT64", "shape": list(mask.shape), "data": mask.reshape(-1).tolist()},
    ]


def test_v2_tensors_go_through_the_same_limits_and_queue_as_the_task_routes(server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        # [256, 512] is allowed by the open dimensions, but 512 tokens exceed max_length (128):
        # refused at once instead of running for a minute and growing the worker by gigabytes.
        started = time.monotonic()
        r = _v2(client, "sentiment", _tokens(np.ones((256, 512), np.int64)))
        assert r.status_code == 400 and "sequence length 512" in r.json()["error"] and "max_length" in r.text
        assert time.monotonic() - started < 10
        vocab = 30522
        for ids, mask, needle in [
            (np.array([[101, vocab, 102]]), None, f"holds {vocab}, outside this model's vocabulary"),
            (np.array([[101, -4, 102]]), None, "holds -4, outside"),
            (np.array([[101, 7, 102]]), np.array([[1, 2, 1]]), "attention_mask must hold only 0 and 1"),
            (np.array([[101, 7, 102], [101, 8, 102]]), np.array([[1, 1, 1], [0, 0, 0]]), "row 1 attends to no token"),
        ]:
            r = _v2(client, "sentiment", _tokens(ids, mask))
            assert r.status_code == 400 and needle in r.json()["error"], r.text
        r = _v2(
            client,
            "sentiment",
            [*_tokens(np.array([[101, 7, 102]])), _tokens(np.array([[0, 2, 0]]))[0] | {"name": "token_type_ids"}],
        )
        assert r.status_code == 400 and "token_type_ids" in r.json()["error"]

        # A valid batch larger than max_batch_size is split by the batcher, not run whole.
        ids = np.random.default_rng(0).integers(1000, 20000, (100, 128))
        mask = np.ones_like(ids)
        mask[::2, 60:] = 0  # every other row padded: rows keep their own answers
        r = _v2(client, "sentiment", _tokens(ids, mask))
        assert r.status_code == 200, r.text
        logits = np.array(r.json()["outputs"][0]["data"]).reshape(100, 3)
        alone = _v2(client, "sentiment", _tokens(ids[:1, :60], mask[:1, :60]))
        np.testing.assert_allclose(logits[0], alone.json()["outputs"][0]["data"], atol=1e-4)
        entry = next(m for m in client.get("/models").json()["models"] if m["name"] == "sentiment")
        batching = entry["manifest"]["batching"]
        assert batching["largest_batch"] <= batching["max_batch_size"], batching

        # Image rows: at most 256 per request; a JSON answer is capped (binary outputs are not).
        png = encode(Image.new("RGB", (32, 32), (9, 9, 9)))
        many = [{"name": "image", "datatype": "BYTES", "shape": [256], "data": [base64.b64encode(png).decode()] * 256}]
        r = _v2(client, "object-detection", many)
        assert r.status_code == 413 and "binary_data_output" in r.json()["error"]
        r = client.post(
            "/v2/models/image-classification/infer",
            json={
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [257, 3, 64, 64], "data": [0.0] * (257 * 12288)}
                ]
            },
        )
        assert r.status_code == 400 and "1 to 256 rows" in r.json()["error"]


def test_depth_bombed_json_is_a_400_everywhere(server) -> None:
    bomb = ("[" * 10_000 + "]" * 10_000).encode()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path in ("/sentiment", "/v2/models/sentiment/infer", "/v2/models/image-classification/infer"):
            r = client.post(path, content=bomb, headers={"content-type": "application/json"})
            assert r.status_code == 400 and "nested too deeply" in r.json()["error"], (path, r.text)
        nested = (
            '{"inputs":[{"name":"input","datatype":"FP32","shape":[1,3,64,64],"data":'
            + "[" * 900
            + "1"
            + "]" * 900
            + "}]}"
        )
        r = client.post("/v2/models/image-classification/infer", content=nested.encode())
        assert r.status_code == 400 and "nested deeper than its 4-dimensional shape" in r.json()["error"]
        r = client.post("/sentiment", content=('{"texts": ' + "[" * 800 + "]" * 800 + "}").encode())
        assert r.status_code == 400 and "texts[0] must be a string" in r.json()["error"]
        assert client.get("/readyz").status_code == 200


@pytest.fixture(scope="module")
def pod_server(registry: Path, image_artifact: Path, sentiment_artifact: Path, detection_artifact: Path):
    """A server shaped like one pod of the base manifests: 2 workers and a 1.5 GiB memory limit."""
    env = {"GRAFT_WORKERS": "2", "GRAFT_MEMORY_MB": "1536", "GRAFT_ACCESS_LOG": "0"}
    with BentoServer(registry, env=env) as srv:
        yield srv


POD_LIMIT_MB = 1536


def test_eight_worst_case_uploads_fit_the_pod_memory(pod_server) -> None:
    """8 concurrent 6,300 x 6,300 RGBA PNGs (39.7 MP each, under the 40 MP limit): every answer
    is a 200 or a 503, and the server's processes together stay under the pod's limit."""
    from scripts.pressure import image_pressure

    result = image_pressure(pod_server, uploads=8)
    print(result)
    assert set(result["statuses"]) <= {"200", "503"} and result["statuses"].get("200", 0) >= 1, result
    assert result["peak_rss_mb"] < POD_LIMIT_MB, result
    assert result["rss_samples"] > 20, "the memory was not sampled often enough to see the peak"
    assert result["worker_budget"]["peak_mb"] <= result["worker_budget"]["limit_mb"]


def test_livez_answers_quickly_while_clients_send_maximum_size_v2_bodies(pod_server) -> None:
    """4 clients send 20 MiB /v2 JSON tensors back to back (each parsed to ~2.2 million Python
    floats); /livez must keep answering. docs/DEPLOY.md has the measured figures; the bound here
    is generous for a shared 2-core machine."""
    from scripts.pressure import livez_pressure

    result = livez_pressure(pod_server, clients=4, seconds=10)
    print(result)
    assert not result["errors"], result
    assert set(result["v2_statuses"]) <= {"200", "503"} and result["v2_statuses"].get("200", 0) >= 4, result
    assert result["livez_p99_ms"] < 2000, result
