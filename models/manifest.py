"""The artifact manifest: everything the service needs to turn a request into a prediction.

`manifest.json` is written at export time and validated by pydantic on every load. A field
added later gets a default so that older artifacts still load; a breaking change bumps
SCHEMA_VERSION and the loader refuses versions it does not know.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

Task = Literal["image-classification", "object-detection", "sentiment"]
TASKS: tuple[str, ...] = ("image-classification", "object-detection", "sentiment")


class _Strict(BaseModel):
    """Unknown keys are errors, so a typo in a hand-edited manifest is caught."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TensorSpec(_Strict):
    name: str
    dtype: Literal["float32", "float16", "int64", "int32", "uint8", "bool"]
    # Symbolic dimensions are strings ("batch", "sequence"); fixed ones are ints.
    shape: list[int | str]


class ImagePreprocessing(_Strict):
    """How an image becomes the model's input tensor (see models.preprocess)."""

    kind: Literal["image"] = "image"
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    # stretch: resize to (width, height) ignoring aspect; letterbox: keep aspect, pad.
    resize: Literal["stretch", "letterbox"] = "stretch"
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    color: Literal["RGB"] = "RGB"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    pad_value: int = Field(default=114, ge=0, le=255)
    layout: Literal["NCHW"] = "NCHW"

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError("std values must be positive")
        return v


class TextPreprocessing(_Strict):
    """How text becomes token ids: a `tokenizers` JSON file inside the artifact."""

    kind: Literal["text"] = "text"
    tokenizer_file: str = "tokenizer.json"
    max_length: int = Field(gt=1, le=8192)
    lowercase: bool = False


Preprocessing = Annotated[ImagePreprocessing | TextPreprocessing, Field(discriminator="kind")]


class ClassificationPostprocessing(_Strict):
    kind: Literal["classification"] = "classification"
    # The graph outputs raw logits; the service applies softmax.
    output: Literal["logits"] = "logits"


class DetectionPostprocessing(_Strict):
    kind: Literal["detection"] = "detection"
    score_threshold: float = Field(default=0.3, ge=0, le=1)
    nms_iou: float = Field(default=0.5, gt=0, le=1)
    max_detections: int = Field(default=100, gt=0, le=1000)
    # Boxes leave the graph in the model input's pixel coordinates, x1,y1,x2,y2.
    box_format: Literal["xyxy"] = "xyxy"
    nms_in_graph: bool = False


Postprocessing = Annotated[ClassificationPostprocessing | DetectionPostprocessing, Field(discriminator="kind")]


class BaseModelInfo(_Strict):
    id: str
    source: str
    license: str = "unknown"
    architecture: str = ""


class DatasetInfo(_Strict):
    name: str
    sha256: str
    splits: dict[str, int] = Field(default_factory=dict)
    description: str = ""


class TrainingInfo(_Strict):
    strategy: str
    frozen_layers: list[str] = Field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    epochs: int = 0
    seed: int = 0
    recipe: str = "default"
    dataset: DatasetInfo
    wall_time_s: float = 0.0
    device: str = "cpu"
    init_from: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    history: list[dict[str, float]] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class ParityReport(_Strict):
    samples: int
    max_abs_diff: float
    label_agreement: float
    tolerance: float
    passed: bool
    extra: dict[str, float] = Field(default_factory=dict)


class QuantizationReport(_Strict):
    mode: Literal["int8-dynamic", "int8-static"]
    fp32_file: str | None = None
    accuracy_fp32: float | None = None
    accuracy_int8: float | None = None
    accuracy_delta: float | None = None
    speedup: float | None = None
    notes: str = ""


class ExportInfo(_Strict):
    format: Literal["onnx"] = "onnx"
    opset: int
    exporter: str
    onnxruntime_version: str
    torch_version: str = ""
    parity: ParityReport
    quantization: QuantizationReport | None = None


class SplitMetrics(_Strict):
    """The headline metrics on one more held-out split, for example a shifted one: data drawn from
    a different distribution than training (new backgrounds, untinted objects, other text), never
    used for any choice during training. `values` uses the same keys as `Metrics.values`."""

    split: str
    samples: int = 0
    description: str = ""
    values: dict[str, float] = Field(default_factory=dict)


class Metrics(_Strict):
    """Held-out metrics. `values` holds headline numbers (accuracy, macro_f1, map50...) on the
    in-distribution test split; `shifted` the same numbers on a shifted split, when there is one."""

    split: str = "test"
    samples: int = 0
    values: dict[str, float] = Field(default_factory=dict)
    per_class: dict[str, dict[str, float]] = Field(default_factory=dict)
    baselines: dict[str, dict[str, float]] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    shifted: SplitMetrics | None = None


class WarmupSample(_Strict):
    """A stored input and the output the exported model gave for it, checked on every load."""

    file: str
    expected: list[list[float]]
    atol: float = 1e-3


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str = Field(pattern=r"^[0-9]{8}T[0-9]{6}([0-9]{3})?Z-[0-9a-f]{6,12}$")
    task: Task
    created_at: str
    labels: list[str] = Field(min_length=1)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    model_file: str = "model.onnx"
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    base_model: BaseModelInfo
    training: TrainingInfo
    metrics: Metrics = Field(default_factory=Metrics)
    export: ExportInfo
    warmup: WarmupSample | None = None
    files: dict[str, str] = Field(default_factory=dict)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(
                f"schema_version {v} is not supported by this graft "
                f"(supported: {sorted(SUPPORTED_SCHEMA_VERSIONS)}); upgrade graft or re-export"
            )
        return v

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        expects_text = self.task == "sentiment"
        if expects_text != isinstance(self.preprocessing, TextPreprocessing):
            raise ValueError(f"task {self.task!r} does not match preprocessing kind {self.preprocessing.kind!r}")
        expects_det = self.task == "object-detection"
        if expects_det != isinstance(self.postprocessing, DetectionPostprocessing):
            raise ValueError(f"task {self.task!r} does not match postprocessing kind {self.postprocessing.kind!r}")
        return self

    def summary(self) -> dict[str, Any]:
        """The few fields a human or /models wants at a glance."""
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "created_at": self.created_at,
            "labels": self.labels,
            "base_model": self.base_model.id,
            "strategy": self.training.strategy,
            "metrics": self.metrics.values,
            "shifted_metrics": (
                {"split": self.metrics.shifted.split, **self.metrics.shifted.values} if self.metrics.shifted else None
            ),
            "parity": {
                "max_abs_diff": self.export.parity.max_abs_diff,
                "label_agreement": self.export.parity.label_agreement,
            },
            "quantization": self.export.quantization.mode if self.export.quantization else None,
        }
