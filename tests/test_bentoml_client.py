"""BentoML's own client (`bentoml.SyncHTTPClient`, `AsyncHTTPClient`) against a real `bentoml serve`:
the three tasks answer as graft's HTTP routes do, and bad input is a 4xx that names the problem."""

from __future__ import annotations

import asyncio
from pathlib import Path

import bentoml
import httpx
import pytest
from bentoml.exceptions import BentoMLException
from PIL import Image

from tests.conftest import encode

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TWEETS = ["the crew was lovely and we landed early", "lost my bag again, two hours on hold"]


def same_scores(a: list[dict], b: list[dict], key: str = "score") -> bool:
    return [x["label"] for x in a] == [x["label"] for x in b] and all(
        abs(x[key] - y[key]) <= 1e-5 for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, fashion_test, detection_artifact: Path) -> dict[str, Path]:
    x, _ = fashion_test
    folder = tmp_path_factory.mktemp("client")
    item = folder / "item.png"
    item.write_bytes(encode(Image.fromarray(x[7]).resize((56, 56))))
    scene = folder / "scene.jpg"
    scene.write_bytes((detection_artifact / "sample.jpg").read_bytes())
    return {"item": item, "scene": scene}


def test_the_schema_lists_the_three_tasks(server) -> None:
    routes = {r["name"]: r for r in httpx.get(server.url + "/schema.json").json()["routes"]}
    assert {name: r["route"] for name, r in routes.items()} == {
        "classify": "/bentoml/classify",
        "detect": "/bentoml/detect",
        "sentiment": "/bentoml/sentiment",
    }
    assert routes["classify"]["input"]["properties"]["image"]["type"] == "file"
    assert set(routes["classify"]["output"]["properties"]) == {"model", "predictions"}


def test_sync_client_answers_as_the_http_routes_do(server, images: dict[str, Path]) -> None:
    item, scene = images["item"], images["scene"]
    with bentoml.SyncHTTPClient(server.url) as client:
        got = client.classify(image=item, top_k=3)
        want = httpx.post(server.url + "/classify", files={"image": item.read_bytes()}, data={"top_k": "3"}).json()
        assert got["model"] == want["model"] and len(got["predictions"]) == 3
        assert same_scores(got["predictions"], want["predictions"])

        got = client.detect(image=scene, score_threshold=0.3, max_detections=5)
        want = httpx.post(
            server.url + "/detect",
            files={"image": scene.read_bytes()},
            data={"score_threshold": "0.3", "max_detections": "5"},
        ).json()
        assert (got["width"], got["height"]) == (want["width"], want["height"])
        assert got["detections"], "the warm-up scene has objects the detector finds"
        assert same_scores(got["detections"], want["detections"])
        assert all(
            abs(p - q) <= 0.01
            for a, b in zip(got["detections"], want["detections"], strict=True)
            for p, q in zip(a["box"], b["box"], strict=True)
        )

        got = client.sentiment(texts=TWEETS)
        want = httpx.post(server.url + "/sentiment", json={"texts": TWEETS}).json()
        assert got["model"] == want["model"]
        assert same_scores(got["results"], want["results"])
        assert [r["label"] for r in got["results"]] == ["positive", "negative"]


def test_async_client_too(server, images: dict[str, Path]) -> None:
    async def main() -> list[dict]:
        async with bentoml.AsyncHTTPClient(server.url) as client:
            return await asyncio.gather(
                client.classify(image=images["item"]), client.sentiment(texts=TWEETS[:1], model="sentiment")
            )

    classified, scored = asyncio.run(main())
    assert len(classified["predictions"]) == 5
    assert scored["results"][0]["label"] == "positive"


@pytest.mark.parametrize(
    ("call", "status", "needle"),
    [
        (lambda c, img: c.classify(image=img["text"]), 415, "not a supported format"),
        (lambda c, img: c.classify(image=img["item"], top_k=0), 400, "top_k: must be between 1 and 1000"),
        (lambda c, img: c.classify(image=img["item"], model="nope"), 404, "unknown model 'nope'"),
        (lambda c, img: c.detect(image=img["item"], model="image-classification"), 400, "not object-detection"),
        (lambda c, img: c.sentiment(texts=["ok"] * 65), 413, "the limit is 64"),
        (lambda c, img: c.sentiment(texts=[]), 400, "'texts' is empty"),
    ],
)
def test_bad_input_is_a_4xx_that_names_the_problem(server, images, tmp_path: Path, call, status, needle) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with bentoml.SyncHTTPClient(server.url) as client, pytest.raises(BentoMLException) as e:
        call(client, {**images, "text": text})
    assert e.value.error_code == status
    assert needle in str(e.value)
    assert httpx.get(server.url + "/readyz").status_code == 200
