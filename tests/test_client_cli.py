"""The Python client and the `scripts.predict` CLI against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from scripts.client import GraftClient, GraftError
from scripts.predict import main as predict
from tests.conftest import encode

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_client_classify_and_errors(server, fashion_test, tmp_path: Path) -> None:
    x, _ = fashion_test
    path = tmp_path / "item.png"
    path.write_bytes(encode(Image.fromarray(x[1])))
    with GraftClient(server.url) as g:
        assert g.ready()
        body = g.classify(path, top_k=2)
        assert len(body["predictions"]) == 2 and body["model"]["name"] == "image-classification"
        assert g.classify(path.read_bytes())["predictions"][0] == g.classify(path)["predictions"][0]
        with pytest.raises(GraftError) as e:
            g.classify(b"nonsense")
        assert e.value.status == 415 and e.value.request_id
        assert any(m["name"] == "image-classification" for m in g.models())


def test_predict_cli_prints_a_readable_answer(server, fashion_test, tmp_path: Path, capsys) -> None:
    x, _ = fashion_test
    path = tmp_path / "item.png"
    path.write_bytes(encode(Image.fromarray(x[1])))
    assert predict([str(path), "--url", server.url, "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}  [image-classification ")
    assert len(out) == 3 and "%" in out[1] and "#" in out[1]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert predict([str(bad), "--url", server.url]) == 1
    assert "HTTP 415" in capsys.readouterr().err


def test_client_and_cli_sentiment(server, capsys) -> None:
    with GraftClient(server.url) as g:
        body = g.sentiment(["what a lovely flight", "worst airline ever"])
        assert body["model"]["name"] == "sentiment" and len(body["results"]) == 2
        with pytest.raises(GraftError) as e:
            g.sentiment([])
        assert e.value.status == 400
    assert predict(["what a lovely flight", "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert "[sentiment " in out and "what a lovely flight" in out
