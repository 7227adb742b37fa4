"""The official Triton HTTP client talks to graft's KServe v2 endpoints."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from models.artifact import load_artifact
from models.preprocess import ImagePreprocessor
from tests.conftest import encode

pytestmark = [pytest.mark.slow, pytest.mark.integration]
NAME = "image-classification"


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


def test_health_and_metadata(client, image_artifact) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "graft" and "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready(NAME)
    assert client.is_model_ready(NAME, model_version=image_artifact.name)
    assert not client.is_model_ready("no-such-model")
    m = client.get_model_metadata(NAME)
    assert m["versions"] == [image_artifact.name]
    assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
    assert m["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]


def _classify(server, png: bytes) -> dict:
    return httpx.post(server.url + "/classify", files={"image": ("x.png", png)}, data={"top_k": "10"}).json()


def test_infer_fp32_tensors_matches_classify(client, server, image_artifact, fashion_test) -> None:
    x, _ = fashion_test
    pre = ImagePreprocessor(load_artifact(image_artifact).manifest.preprocessing)
    images = [Image.fromarray(x[i]) for i in range(4)]
    batch = np.stack([pre(img)[0] for img in images])
    inp = triton.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=True)
    result = client.infer(NAME, [inp])
    logits = result.as_numpy("logits")
    assert logits.shape == (4, 10)
    labels = load_artifact(image_artifact).manifest.labels
    for img, row in zip(images, logits, strict=True):
        top = _classify(server, encode(img))["predictions"][0]
        assert labels[int(row.argmax())] == top["label"]
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert abs(float(probs.max()) - top["score"]) < 1e-4


def test_infer_bytes_images_binary_and_json(client, server, fashion_test) -> None:
    x, _ = fashion_test
    pngs = [encode(Image.fromarray(x[i])) for i in (10, 11)]
    arr = np.array(pngs, dtype=np.object_)
    binary = triton.InferInput("image", [2], "BYTES")
    binary.set_data_from_numpy(arr, binary_data=True)
    out_binary = client.infer(NAME, [binary]).as_numpy("logits")
    as_json = triton.InferInput("image", [2], "BYTES")
    as_json.set_data_from_numpy(np.array([base64.b64encode(p) for p in pngs], dtype=np.object_), binary_data=False)
    requested = triton.InferRequestedOutput("logits", binary_data=False)
    out_json = client.infer(NAME, [as_json], outputs=[requested]).as_numpy("logits")
    np.testing.assert_allclose(out_binary, out_json, atol=1e-5)
    assert out_binary.shape == (2, 10)


def test_classification_extension(client, server, fashion_test) -> None:
    x, _ = fashion_test
    png = encode(Image.fromarray(x[3]))
    inp = triton.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([png], dtype=np.object_))
    out = client.infer(NAME, [inp], outputs=[triton.InferRequestedOutput("logits", class_count=3)])
    top3 = [s.decode() for s in out.as_numpy("logits").reshape(-1)]
    assert len(top3) == 3
    prob, _, label = top3[0].split(":", 2)
    expected = _classify(server, png)["predictions"][0]
    assert label == expected["label"] and abs(float(prob) - expected["score"]) < 1e-4


def test_errors_are_clear(client, server) -> None:
    bad = triton.InferInput("input", [1, 3, 32, 32], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer(NAME, [bad])
    with pytest.raises(InferenceServerException, match="not served"):
        client.infer("no-such-model", [bad])
    r = httpx.post(server.url + f"/v2/models/{NAME}/infer", content=b"{nope")
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = httpx.post(
        server.url + f"/v2/models/{NAME}/infer",
        json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not an image"]}]},
    )
    assert r.status_code == 415 and "error" in r.json()


def test_sentiment_bytes_texts_match_the_rest_endpoint(client, server) -> None:
    texts = ["The crew was lovely and we landed early", "Lost my bag again, thanks for nothing"]
    meta = client.get_model_metadata("sentiment")
    assert meta["parameters"]["bytes_input"] == "text"
    assert {i["name"] for i in meta["inputs"]} >= {"input_ids", "attention_mask"}
    inp = triton.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    logits = client.infer("sentiment", [inp]).as_numpy("logits")
    rest = httpx.post(server.url + "/sentiment", json={"texts": texts}).json()
    labels = meta["parameters"]["labels"]
    for row, r in zip(logits, rest["results"], strict=True):
        assert labels[int(row.argmax())] == r["label"]
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert abs(float(probs.max()) - r["score"]) < 1e-4
