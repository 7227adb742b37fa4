"""BentoML's own API over graft's three tasks, for `bentoml.SyncHTTPClient` and `AsyncHTTPClient`.

graft's HTTP routes (service/app.py) are a FastAPI app mounted into the BentoML service, so
BentoML does not know them: its client builds its methods from `/schema.json`, which lists only
`@bentoml.api` methods. The Graft service therefore also declares `classify`, `detect` and
`sentiment` as BentoML APIs, on routes of their own (`/bentoml/...`: BentoML matches its API
routes before the mounted app, so `/classify` would hide graft's route).

The input specs below describe what BentoML's client sends: a multipart form with the image as a
file and every other field JSON-encoded, or a JSON body for texts. They parse it with graft's
own parsers instead of BentoML's (which spool the upload to a temporary file and let pydantic
build the whole JSON body before any limit is checked): the same limits, messages and memory
budget as the HTTP routes. The API methods then hand the parsed input to the code behind those
routes, on the same model pool, so both ways give the same answers.

Errors follow BentoML's conventions on these routes: the status graft would answer, and a body
BentoML writes (`[{"error": "..."}]` for a 4xx; a generic message for a 5xx such as 503
overloaded), which the client raises as a `BentoMLException` subclass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from bentoml import IODescriptor
from bentoml.exceptions import BentoMLException
from bentoml.validators import ContentType
from pydantic import Field
from starlette.exceptions import HTTPException

from models.errors import InvalidInput

from .batching import QueueFull
from .state import current_pool
from .uploads import CLASSIFY_OPTIONS, DETECT_OPTIONS, read_image_upload

if TYPE_CHECKING:
    from starlette.requests import Request

ROUTE_PREFIX = "/bentoml"
ImageFile = Annotated[Path, ContentType("image/*")]
MODEL_DESCRIPTION = "model name; default: the task's model"


@contextlib.contextmanager
def bentoml_errors() -> Iterator[None]:
    """graft's request errors as the BentoMLException BentoML turns into the same HTTP status."""
    try:
        yield
    except InvalidInput as e:
        raise BentoMLException(str(e), error_code=HTTPStatus(e.status_code)) from e
    except QueueFull as e:
        raise BentoMLException(f"overloaded, retry shortly: {e}", error_code=HTTPStatus.SERVICE_UNAVAILABLE) from e
    except HTTPException as e:  # the body size limit, hit while the body streams in
        raise BentoMLException(str(e.detail), error_code=HTTPStatus(e.status_code)) from e


async def _image_form(cls: type[IODescriptor], request: Request, options: dict[str, Any]) -> IODescriptor:
    with bentoml_errors():
        data, opts = read_image_upload(
            await request.body(), request.headers.get("content-type"), {}, options, json_fields=True
        )
    # Built without validation: `image` holds the upload's bytes (the API method's parameter),
    # not the Path the schema shows to clients, and graft's parser has checked every field.
    return cls.model_construct(image=data, **opts)


class ClassifyInput(IODescriptor):
    """What `client.classify(image=Path(...), top_k=..., model=...)` sends."""

    image: ImageFile = Field(description="the image: JPEG, PNG, WebP, BMP or GIF (first frame)")
    top_k: int = Field(5, ge=1, le=1000, description="how many labels to return")
    model: str | None = Field(None, max_length=64, description=MODEL_DESCRIPTION)

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> IODescriptor:
        return await _image_form(cls, request, CLASSIFY_OPTIONS)


class DetectInput(IODescriptor):
    """What `client.detect(image=Path(...), score_threshold=..., max_detections=..., model=...)` sends."""

    image: ImageFile = Field(description="the image: JPEG, PNG, WebP, BMP or GIF (first frame)")
    score_threshold: float | None = Field(None, ge=0, le=1, description="minimum score; default: the model's")
    max_detections: int | None = Field(None, ge=1, le=1000, description="most boxes to return")
    model: str | None = Field(None, max_length=64, description=MODEL_DESCRIPTION)

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> IODescriptor:
        return await _image_form(cls, request, DETECT_OPTIONS)


class SentimentInput(IODescriptor):
    """What `client.sentiment(texts=[...], model=...)` sends (the same JSON body as POST /sentiment)."""

    texts: list[str] = Field(min_length=1, description="texts to score; limits: GRAFT_MAX_TEXTS, GRAFT_MAX_TEXT_CHARS")
    model: str | None = Field(None, max_length=64, description=MODEL_DESCRIPTION)

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> IODescriptor:
        from .app import read_texts  # the tokenizer's code: imported by workers only, not for the declaration

        with bentoml_errors():
            texts, model = await read_texts(request, current_pool())
        return cls.model_construct(texts=texts, model=model)
