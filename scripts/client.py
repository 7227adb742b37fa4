"""A thin Python client for graft's HTTP API (needs only httpx, which BentoML already brings).

from scripts.client import GraftClient
with GraftClient("http://127.0.0.1:3000") as g:
    g.classify("shoe.jpg", top_k=3)
    g.detect("shelf.jpg", score_threshold=0.4)
    g.sentiment(["the flight was great", "lost my bag again"])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx


class GraftError(RuntimeError):
    """The server answered with an error; `status` and the server's message are kept."""

    def __init__(self, status: int, message: str, request_id: str | None) -> None:
        super().__init__(f"HTTP {status}: {message}" + (f" (request id {request_id})" if request_id else ""))
        self.status = status
        self.message = message
        self.request_id = request_id


def _image_bytes(image: str | Path | bytes) -> tuple[str, bytes]:
    if isinstance(image, bytes):
        return "image", image
    p = Path(image)
    return p.name, p.read_bytes()


class GraftClient:
    def __init__(self, url: str = "http://127.0.0.1:3000", *, timeout: float = 30.0, token: str | None = None):
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("GRAFT_ADMIN_TOKEN")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text
            raise GraftError(r.status_code, message, r.headers.get("x-request-id"))
        return r.json()

    def classify(self, image: str | Path | bytes, *, top_k: int = 5, model: str | None = None) -> dict[str, Any]:
        name, data = _image_bytes(image)
        form: dict[str, str] = {"top_k": str(top_k)}
        if model:
            form["model"] = model
        return self._check(self._http.post("/classify", files={"image": (name, data)}, data=form))

    def detect(
        self,
        image: str | Path | bytes,
        *,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        name, data = _image_bytes(image)
        form = {
            k: str(v)
            for k, v in (("score_threshold", score_threshold), ("max_detections", max_detections), ("model", model))
            if v is not None
        }
        return self._check(self._http.post("/detect", files={"image": (name, data)}, data=form))

    def sentiment(self, texts: list[str] | str, *, model: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"texts": [texts] if isinstance(texts, str) else list(texts)}
        if model:
            body["model"] = model
        return self._check(self._http.post("/sentiment", json=body))

    def models(self) -> list[dict[str, Any]]:
        return self._check(self._http.get("/models"))["models"]

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def reload(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return self._check(self._http.post("/admin/reload", headers=headers, timeout=120))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GraftClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
