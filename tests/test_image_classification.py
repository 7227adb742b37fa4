"""The image-classification slice end to end: the real fine-tune script's quick recipe, its
artifact, and a real `bentoml serve` answering /classify over HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.artifact import load_artifact
from models.errors import ArtifactError
from tests.conftest import encode

pytestmark = pytest.mark.slow


def test_quick_recipe_artifact_is_complete_and_accurate(image_artifact: Path) -> None:
    art = load_artifact(image_artifact)
    m = art.manifest
    assert m.task == "image-classification" and len(m.labels) == 10
    assert m.metrics.samples == 10_000  # the whole official test split
    assert m.metrics.values["accuracy"] >= 0.80
    assert m.export.parity.passed
    assert m.export.parity.label_agreement >= 0.999 and m.export.parity.max_abs_diff <= 1e-3
    assert m.training.dataset.sha256 and m.training.dataset.splits["test"] == 10_000
    assert m.inputs[0].shape[0] == "batch"
    for f in ("model.onnx", "model_card.md", "confusion_matrix.png", "learning_curve.png", "sample.png"):
        assert f in m.files, f
    assert set(m.metrics.per_class) == set(m.labels)


def test_tampered_artifact_is_refused(image_artifact: Path, copy_artifact) -> None:
    copy = copy_artifact(image_artifact)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for model.onnx"):
        load_artifact(copy)


def test_finetune_rejects_options_that_do_not_apply(tmp_path: Path) -> None:
    from scripts.finetune import main

    with pytest.raises(SystemExit):
        main(["image-classification", "--quick", "--registry", str(tmp_path), "--epochs", "0"])


@pytest.mark.integration
def test_classify_accuracy_over_http(server, fashion_test) -> None:
    """Real test images (PNG and JPEG) through real HTTP meet the quick recipe's floor."""
    x, y = fashion_test
    idx = np.random.default_rng(1).choice(len(x), 400, replace=False)
    correct = 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for n, i in enumerate(idx):
            img = Image.fromarray(x[i])
            fmt = "PNG" if n % 2 else "JPEG"
            r = client.post(
                "/classify",
                files={
                    "image": (
                        f"t.{fmt.lower()}",
                        encode(img, fmt, **({"quality": 95} if fmt == "JPEG" else {})),
                    )
                },
                data={"top_k": "3"},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["predictions"]) == 3
            scores = [p["score"] for p in body["predictions"]]
            assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
            labels = load_labels(server)
            correct += body["predictions"][0]["label"] == labels[y[i]]
    accuracy = correct / len(idx)
    assert accuracy >= 0.80, accuracy


_labels_cache: dict[str, list[str]] = {}


def load_labels(server) -> list[str]:
    if "l" not in _labels_cache:
        models = httpx.get(server.url + "/models").json()["models"]
        m = next(m for m in models if m["task"] == "image-classification")
        _labels_cache["l"] = m["manifest"]["labels"]
    return _labels_cache["l"]


@pytest.mark.integration
def test_response_names_the_version_and_request_id(server, image_artifact: Path) -> None:
    img = encode(Image.new("RGB", (50, 80), (128, 128, 128)))
    r = httpx.post(server.url + "/classify", files={"image": ("x.png", img)}, headers={"X-Request-ID": "abc-123"})
    assert r.status_code == 200
    assert r.json()["model"] == {"name": "image-classification", "version": image_artifact.name}
    assert r.headers["x-request-id"] == "abc-123"
    assert len(r.json()["predictions"]) == 5  # default top_k


@pytest.mark.integration
def test_other_clients_multipart_encoders_are_understood(server) -> None:
    """graft parses multipart itself: bodies from urllib3 and aiohttp (not only httpx) must work."""
    import aiohttp
    import urllib3

    img = encode(Image.new("RGB", (40, 30), (20, 120, 210)), "JPEG")
    expected = httpx.post(server.url + "/classify", files={"image": ("x.jpg", img)}, data={"top_k": "2"}).json()
    body, ctype = urllib3.encode_multipart_formdata({"image": ("x.jpg", img, "image/jpeg"), "top_k": "2"})
    r = urllib3.PoolManager().request("POST", server.url + "/classify", body=body, headers={"Content-Type": ctype})
    assert r.status == 200 and json.loads(r.data) == expected

    async def with_aiohttp() -> dict:
        form = aiohttp.FormData()
        form.add_field("image", img, filename="x.jpg", content_type="image/jpeg")
        form.add_field("top_k", "2")
        async with aiohttp.ClientSession() as session, session.post(server.url + "/classify", data=form) as resp:
            assert resp.status == 200
            return await resp.json()

    assert asyncio.run(with_aiohttp()) == expected


@pytest.mark.integration
def test_raw_image_body_answers_like_the_form(server) -> None:
    """`curl --data-binary @x.jpg -H 'Content-Type: image/jpeg' '/classify?top_k=2'` works too."""
    img = encode(Image.new("RGB", (40, 30), (200, 120, 10)), "JPEG")
    form = httpx.post(server.url + "/classify", files={"image": ("x.jpg", img)}, data={"top_k": "2"})
    for ctype in ("image/jpeg", "application/octet-stream"):
        raw = httpx.post(server.url + "/classify", params={"top_k": "2"}, content=img, headers={"Content-Type": ctype})
        assert raw.status_code == 200, raw.text
        assert raw.json() == form.json() and len(raw.json()["predictions"]) == 2
    bad = httpx.post(
        server.url + "/classify", params={"top_k": "0"}, content=img, headers={"Content-Type": "image/jpeg"}
    )
    assert bad.status_code == 400 and "top_k" in bad.json()["error"]


def _exchange(url: str, head: bytes, body_parts: list[bytes], *, wait_for_continue: bool) -> tuple[bytes, bytes]:
    """One HTTP/1.1 request on a raw socket, as curl sends it: the head, then (after `100 Continue`
    when asked for) the body parts. Returns (the interim line, or b"", the final answer)."""
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head)
        interim = b""
        if wait_for_continue:
            interim = sock.recv(65536)
            if not interim.startswith(b"HTTP/1.1 100"):  # answered at once (a refusal): read it all
                while chunk := sock.recv(65536):
                    interim += chunk
                return b"", interim
        for part in body_parts:
            sock.sendall(part)
        answer = b""
        while chunk := sock.recv(65536):  # `Connection: close`: the answer ends when the server closes
            answer += chunk
    return interim, answer


def test_what_curl_sends_for_large_and_streamed_uploads(server) -> None:
    """`Expect: 100-continue` (curl sends it for large bodies): the server asks for the body, then
    answers; over the size limit it refuses at once, before any body is sent. A body sent in
    chunks (`Transfer-Encoding: chunked`, no Content-Length) answers like the same bytes in one."""
    img = encode(Image.new("RGB", (40, 30), (30, 120, 200)), "PNG")
    expected = httpx.post(server.url + "/classify", content=img, headers={"Content-Type": "image/png"}).json()
    head = (
        f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(img)}\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    interim, answer = _exchange(server.url, head, [img], wait_for_continue=True)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == expected

    too_big = head.replace(f"Content-Length: {len(img)}".encode(), b"Content-Length: 999999999")
    interim, answer = _exchange(server.url, too_big, [], wait_for_continue=True)
    assert interim == b"" and answer.startswith(b"HTTP/1.1 413"), answer[:200]

    chunked = (
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
    )
    pieces = [img[i : i + 100] for i in range(0, len(img), 100)]
    body = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
    _, answer = _exchange(server.url, chunked, body, wait_for_continue=False)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    payload = answer.split(b"\r\n\r\n", 1)[1]
    if b"transfer-encoding: chunked" in answer.split(b"\r\n\r\n", 1)[0].lower():
        payload = payload.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    assert json.loads(payload) == expected


@pytest.mark.integration
def test_concurrent_requests_are_batched(registry: Path, image_artifact: Path, fashion_test) -> None:
    """Requests arriving while a run is in progress share the next one. Every batch runs on the
    inference thread here (GRAFT_LOOP_RUN_MS=0): with the default, a short run happens on the
    event loop and an idle machine may answer requests one by one as they arrive, by design."""
    from scripts.server_process import BentoServer

    x, _ = fashion_test
    payloads = [encode(Image.fromarray(x[i])) for i in range(64)]

    with BentoServer(registry, env={"GRAFT_LOOP_RUN_MS": "0"}) as server:

        async def fire():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

                async def one(p: bytes):
                    return await client.post("/classify", files={"image": ("x.png", p)})

                return await asyncio.gather(*(one(p) for p in payloads))

        before = _batching(server)
        responses = asyncio.run(fire())
        assert all(r.status_code == 200 for r in responses)
        after = _batching(server)
    runs = after["batches"] - before["batches"]
    assert after["items"] - before["items"] == 64
    assert runs < 64, f"64 concurrent requests took {runs} ONNX runs: no batching happened"
    assert after["largest_batch"] > 1


def _batching(server) -> dict:
    models = httpx.get(server.url + "/models").json()["models"]
    return next(m for m in models if m["name"] == "image-classification")["manifest"]["batching"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"files": {"image": ("x.txt", b"plain text")}}, 415, "not a supported format"),
        ({"data": {"top_k": "3"}}, 400, "image"),
        ({"files": {"image": ("x.png", b"")}}, 400, "empty"),
        (
            {"files": {"image": ("x.png", encode(Image.new("RGB", (8, 8))))}, "data": {"top_k": "0"}},
            400,
            "top_k",
        ),
        (
            {"files": {"image": ("x.png", encode(Image.new("RGB", (8, 8))))}, "data": {"top_k": "many"}},
            400,
            "top_k",
        ),
        (
            {"files": {"image": ("x.png", encode(Image.new("RGB", (8, 8))))}, "data": {"model": "nope"}},
            404,
            "unknown model",
        ),
        (
            {
                "content": b'{"image": "http://169.254.169.254/"}',
                "headers": {"content-type": "application/json"},
            },
            400,
            "image",
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx(server, kwargs, status, needle) -> None:
    r = httpx.post(server.url + "/classify", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert needle in body["error"], body


@pytest.mark.integration
def test_oversized_body_is_413_and_service_stays_up(server) -> None:
    big = b"\x00" * (21 * 1024 * 1024)
    r = httpx.post(server.url + "/classify", files={"image": ("big.png", big)}, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    ok = httpx.post(server.url + "/classify", files={"image": ("x.png", encode(Image.new("RGB", (8, 8))))})
    assert ok.status_code == 200


@pytest.mark.integration
def test_models_lists_the_served_version(server, image_artifact: Path) -> None:
    body = httpx.get(server.url + "/models").json()
    entry = next(m for m in body["models"] if m["name"] == "image-classification")
    assert entry["status"] == "ready" and entry["served_version"] == image_artifact.name
    manifest = json.loads((image_artifact / "manifest.json").read_text())
    assert entry["manifest"]["labels"] == manifest["labels"]
    assert httpx.get(server.url + "/readyz").status_code == 200
