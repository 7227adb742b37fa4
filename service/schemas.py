"""Pydantic models of the HTTP API (they also document it in /docs.json)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    name: str = Field(description="model name in the registry")
    version: str = Field(description="the artifact version that produced this answer")


class LabelScore(BaseModel):
    label: str
    score: float = Field(ge=0, le=1)


class ClassifyResponse(BaseModel):
    model: ModelRef
    predictions: list[LabelScore]


class SentimentRequest(BaseModel):
    """Documents the body of POST /sentiment (the route parses it itself, for precise errors)."""

    model_config = {"extra": "forbid"}
    texts: list[str] = Field(min_length=1, description="texts to score; limits: GRAFT_MAX_TEXTS, GRAFT_MAX_TEXT_CHARS")
    model: str | None = Field(default=None, max_length=64, description="model name; default: the task's model")


class SentimentResult(BaseModel):
    label: str = Field(description="the most probable label")
    score: float = Field(ge=0, le=1, description="its probability")
    scores: dict[str, float] = Field(description="probability of every label of the model")


class SentimentResponse(BaseModel):
    model: ModelRef
    results: list[SentimentResult] = Field(description="one result per text, in request order")


class Detection(BaseModel):
    label: str
    score: float = Field(ge=0, le=1)
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in the uploaded image's pixels")


class DetectResponse(BaseModel):
    model: ModelRef
    width: int = Field(description="the uploaded image's width in pixels (after EXIF rotation)")
    height: int = Field(description="the uploaded image's height in pixels (after EXIF rotation)")
    detections: list[Detection]


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong with the request, in words")
    detail: Any | None = None


class ModelsResponse(BaseModel):
    models: list[dict[str, Any]] = Field(
        description="every model name in the registry: status (ready/unavailable), reason, served and pinned "
        "version, refused versions with their errors, manifest summary"
    )
    registry_problem: str | None = Field(default=None, description="set while the registry cannot be read")
    memory: dict[str, Any] = Field(default_factory=dict, description="this worker's request memory budget")


class ReloadOutcome(BaseModel):
    model_config = {"populate_by_name": True}
    from_: str | None = Field(default=None, alias="from", description="version served before the reload")
    to: str | None = Field(default=None, description="version served after it")
    refused: list[str] = Field(default_factory=list, description="versions this reload refused (see models)")


class ReloadResponse(BaseModel):
    generation: int
    changed: dict[str, dict[str, str | None]]
    outcomes: dict[str, ReloadOutcome] = Field(default_factory=dict, description="every model's outcome")
    registry_problem: str | None = None
    models: list[dict[str, Any]]
    workers: dict[str, Any] = Field(
        default_factory=dict, description="how many workers reloaded, and whether they agree"
    )
