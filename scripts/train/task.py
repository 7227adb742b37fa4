"""What a task supplies to the fine-tuning pipeline, and what the pipeline hands it.

The pipeline (`scripts/train/pipeline.py`) owns every step the tasks share: seed, device and
threads, `--init-from`, the staging folder and the atomic publish, the training loop with
early stopping and `--resume`, ONNX export, the parity gate, the warm-up sample's place in the
manifest, the checkpoint, the manifest, the model card and the timings. A task owns what is
its own, as the methods of `Task` below: its data, its network and strategy, the loss of a
batch, validation, the export's inputs, the parity comparison, held-out metrics and plots, and
the warm-up sample.

Adding a task: subclass `Task` in `scripts/train/tasks/<name>.py` (ending with `TASK = YourTask`),
add the module to `scripts/train/tasks/__init__.py`, its recipes to `models/recipes.py` and its
column to `scripts/train/capabilities.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from models.manifest import (
    BaseModelInfo,
    Manifest,
    ParityReport,
    QuantizationReport,
    SplitMetrics,
    TensorSpec,
    WarmupSample,
)
from models.recipes import Recipe

if TYPE_CHECKING:
    import torch

    from .fit import FitResult, Trainer
    from .pipeline import Staging

R = TypeVar("R", bound=Recipe)


@dataclass(frozen=True)
class Options:
    """What the user asked for besides the recipe (scripts/finetune.py builds it from the command line)."""

    task: str
    registry: Path
    name: str  # the artifact's name in the registry
    recipe_name: str = "default"
    seed: int = 0
    data: Path | None = None
    backbone: str | None = None
    init_from: str | None = None  # NAME, NAME/VERSION or a folder
    quantize: str | None = None
    adapt_on: Path | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    device: str = "auto"
    parity_tolerance: float = 1e-3
    given: frozenset[str] = frozenset()  # recipe fields set on the command line: tasks keep them as given


@dataclass
class InitCheckpoint:
    """The artifact `--init-from` names: its verified manifest and the weights it saved."""

    ref: str  # NAME/VERSION
    folder: Path
    manifest: Manifest
    state: dict[str, torch.Tensor]
    metadata: dict[str, str]  # the checkpoint's own description of the weights, written by its task


@dataclass
class Run:
    """One fine-tune in progress, as a task sees it."""

    options: Options
    device: torch.device  # where the trained layers and their batches go
    threads: int
    staging: Staging  # the artifact's files are written here: staging.path("tokenizer.json")
    init: InitCheckpoint | None
    notes: list[str] = field(default_factory=list)  # training notes for the manifest and the model card
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


@dataclass
class DataSummary:
    name: str
    labels: list[str]
    splits: dict[str, int]  # examples per split: train, val, test
    sha256: str
    description: str = ""
    detail: str = ""  # more for the log line (objects per split, ...)


@dataclass
class Network:
    base_model: BaseModelInfo
    strategy: str
    frozen_layers: list[str]
    trainable_params: int
    total_params: int
    summary: str  # one log line: what trains, where


@dataclass
class ExportSpec:
    """What torch.onnx.export needs: the module in eval mode on the CPU, and an example input."""

    module: Any
    example: tuple[Any, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


@dataclass
class Contract:
    """The exported graph's tensors and the serving pre- and postprocessing, for the manifest."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: Any
    postprocessing: Any


@dataclass
class Evaluation:
    """Held-out metrics of the exported model, as the manifest and model card carry them."""

    values: dict[str, float]
    samples: int
    summary: str  # one log line
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # plots written into the staging folder
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    parity_extra: dict[str, float] = field(default_factory=dict)  # added to the parity report
    # The same metrics on the task's shifted split (a distribution training never saw), when it has one.
    shifted: SplitMetrics | None = None


@dataclass
class Quantized:
    """An int8 model written as model.onnx next to the fp32 one, measured against it."""

    report: QuantizationReport
    session: Any  # the int8 model's ONNX Runtime session: the served model
    values: dict[str, float]  # int8 metrics added to the manifest's values
    notes: list[str]


class Task(ABC, Generic[R]):
    """One task's own parts. The pipeline calls the methods in the order they are written here."""

    name: ClassVar[str]
    select: ClassVar[str]  # the validation value that picks the best epoch ("val_accuracy")

    def __init__(self, run: Run, recipe: R) -> None:
        self.run = run
        self.recipe = recipe  # a task may settle it further (auto strategy, input size); the manifest records it

    @property
    def options(self) -> Options:
        return self.run.options

    @abstractmethod
    def load_data(self) -> DataSummary:
        """Read the dataset (--data, or the demo data) and split it."""

    @abstractmethod
    def build(self) -> Network:
        """The network from pretrained weights or `run.init`, the strategy applied, caches computed."""

    @abstractmethod
    def trainer(self) -> Trainer[Any]:
        """Optimizer, schedule, batches, loss and validation for `fit`."""

    @abstractmethod
    def finish(self, result: FitResult) -> None:
        """Load the best weights; move what export and evaluation use to the CPU."""

    def baselines(self, result: FitResult) -> tuple[dict[str, dict[str, float]], list[str]]:
        """Baselines measured next to the model, and notes about them (none by default)."""
        return {}, []

    @abstractmethod
    def export_spec(self) -> ExportSpec:
        """The module to export and an example input."""

    @abstractmethod
    def parity(self, session: Any) -> tuple[ParityReport, str]:
        """Compare PyTorch with the exported model on held-out inputs; (report, one-line summary)."""

    @abstractmethod
    def evaluate(self, session: Any) -> Evaluation:
        """Held-out metrics and plots."""

    def quantize(self, fp32: Path, int8: Path, session: Any, evaluation: Evaluation) -> Quantized:
        """Write an int8 model to `int8` and measure it (the capability table refuses tasks without one)."""
        raise NotImplementedError(f"{self.name} has no int8 quantization")

    @abstractmethod
    def warmup(self, session: Any) -> WarmupSample:
        """Store a held-out input in the staging folder and the served model's output for it."""

    @abstractmethod
    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The weights `--init-from` continues from, and their description (safetensors metadata)."""

    @abstractmethod
    def contract(self) -> Contract:
        """Tensors and pre/postprocessing for the manifest."""

    def config(self) -> dict[str, Any]:
        """Task-specific entries for the manifest's training.config."""
        return {}
