"""One fine-tuning pipeline for every task: train, evaluate, export, prove, publish.

    run_recipe(options, recipe) -> the published artifact's folder

The steps, in order, each once for all tasks (a task supplies its own parts, see task.py):

1. seed, threads and device; `--init-from` resolved and verified before any data is read;
2. a staging folder under the registry's hidden `.staging/` (removed if anything fails);
3. the task loads its data; a small training set gets more epochs (`small_data_schedule`);
4. the task builds its network; `fit` trains it with early stopping, checkpointing every
   epoch when asked (`--checkpoint-dir`, `--resume`);
5. baselines, ONNX export, the parity gate (a failed comparison fails the run), held-out
   metrics, int8 when asked, the warm-up sample;
6. checkpoint.safetensors (for a later `--init-from`), learning curve, manifest, model card;
7. the folder is verified by the artifact loader and renamed into place in one step.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from models import versions
from models.artifact import load_artifact, new_version, write_manifest
from models.errors import ArtifactError, ParityError
from models.manifest import DatasetInfo, ExportInfo, Manifest, Metrics, TrainingInfo
from models.recipes import Recipe

from .console import log, timed
from .device import configure_threads, describe_device, pick_device, set_seed
from .export import export_onnx, ort_session
from .fit import FitResult, fit, small_data_schedule
from .report import plot_history, write_model_card
from .task import DataSummary, InitCheckpoint, Network, Options, Run, Task
from .tasks import task_class

if TYPE_CHECKING:
    import torch

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class Staging:
    """A folder being filled with an artifact's files; published by an atomic rename."""

    registry: Path
    name: str
    version: str = field(default_factory=new_version)

    def __post_init__(self) -> None:
        self.folder = versions.staging_folder(self.registry, self.name, self.version)

    def path(self, filename: str) -> Path:
        return self.folder / filename

    def publish(self, manifest: Manifest) -> Path:
        """Write the manifest (with checksums), verify the folder loads, then rename it into place."""
        write_manifest(self.folder, manifest)
        load_artifact(self.folder)  # the loader's verdict, not ours, before anyone can see it
        return versions.publish_folder(self.folder, self.registry, self.name, self.version)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run_recipe(options: Options, recipe: Recipe) -> Path:
    """Fine-tune `options.task` with `recipe`, publish the artifact, return its folder."""
    started, cpu_started = time.perf_counter(), time.process_time()
    task_type = task_class(options.task)
    threads = configure_threads()
    set_seed(options.seed)  # first: it sets CUBLAS_WORKSPACE_CONFIG before CUDA starts
    device = pick_device(options.device)
    init = load_init(options) if options.init_from else None
    options.registry.mkdir(parents=True, exist_ok=True)
    staging = Staging(options.registry, options.name)
    try:
        task = task_type(Run(options, device, threads, staging, init), recipe)
        return _run(task, started, cpu_started)
    except BaseException:
        staging.discard()
        raise


def load_init(options: Options) -> InitCheckpoint:
    """The artifact --init-from names (NAME, NAME/VERSION or a folder), verified, with its weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from models.servable import resolve_ref

    ref = options.init_from or ""
    try:
        art = load_artifact(resolve_ref(options.registry, ref))
    except ArtifactError as e:
        raise SystemExit(f"--init-from {ref}: {e}") from e
    if art.manifest.task != options.task:
        raise SystemExit(
            f"--init-from {ref}: {art.name}/{art.version} is a {art.manifest.task} model; "
            f"{options.task} continues from a {options.task} artifact"
        )
    if CHECKPOINT not in art.manifest.files:
        raise SystemExit(
            f"--init-from {ref}: {art.name}/{art.version} has no {CHECKPOINT} (it was built before graft "
            "saved this task's weights); fine-tune from the pretrained backbone instead (drop --init-from)"
        )
    path = art.file(CHECKPOINT)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    return InitCheckpoint(
        ref=f"{art.name}/{art.version}",
        folder=art.path,
        manifest=art.manifest,
        state=load_file(str(path)),
        metadata=metadata,
    )


def fingerprint(task: Task, data: DataSummary) -> str:
    """What makes two runs the same training run: a checkpoint from another one must not be resumed.
    (Whether baselines are measured does not change training, so it is left out.)"""
    o = task.options
    recipe = {k: v for k, v in task.recipe.as_config().items() if k != "baselines"}
    raw = {
        "task": o.task,
        "recipe": recipe,
        "seed": o.seed,
        "data": data.sha256,
        "backbone": o.backbone,
        "init": task.run.init.ref if task.run.init else None,
        "adapt_on": str(o.adapt_on) if o.adapt_on else None,
    }
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The trained weights as safetensors (no pickle), readable by everyone who reads the registry."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    path.chmod(0o644)  # safetensors writes 0600; the registry is shared


def _run(task: Task, started: float, cpu_started: float) -> Path:
    run, options = task.run, task.options
    staging = run.staging
    with timed("load data", run.timings):
        data = task.load_data()
    splits = ", ".join(f"{k} {v}" for k, v in data.splits.items())
    log(f"dataset {data.name}: {len(data.labels)} classes, {splits}" + (f"; {data.detail}" if data.detail else ""))
    task.recipe, note = small_data_schedule(task.recipe, data.splits["train"], epochs_given="epochs" in options.given)
    if note:
        log(note)
        run.notes.append(note)

    with timed("build", run.timings):
        network = task.build()
    log(network.summary)
    with timed("train", run.timings):
        result = fit(
            task.trainer(),
            epochs=task.recipe.epochs,
            patience=task.recipe.patience,
            seed=options.seed,
            checkpoint=options.checkpoint_dir,
            resume=options.resume,
            fingerprint=fingerprint(task, data),
        )
    if result.resumed_after is not None:
        run.notes.append(f"resumed from {options.checkpoint_dir} after epoch {result.resumed_after}")
    task.finish(result)
    baselines, baseline_notes = task.baselines(result)
    for n in baseline_notes:
        log(n)

    # Export, parity and evaluation run on the CPU, where ONNX Runtime runs the exported model.
    model_path = staging.path("model.onnx")
    fp32_path = staging.path("model_fp32.onnx") if options.quantize else model_path
    spec = task.export_spec()
    export = export_onnx(
        spec.module,
        spec.example,
        fp32_path,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_axes=spec.dynamic_axes,
    )
    session = ort_session(fp32_path)
    with timed("parity check", run.timings):
        parity, message = task.parity(session)
    if not parity.passed:
        raise ParityError("parity check FAILED: " + message)
    log("parity ok: " + message)
    with timed("evaluate", run.timings):
        evaluation = task.evaluate(session)
    log(evaluation.summary)
    parity.extra.update(evaluation.parity_extra)
    values, metric_notes, quantization, served = dict(evaluation.values), list(evaluation.notes), None, session
    if options.quantize:
        with timed("int8 quantization", run.timings):
            q = task.quantize(fp32_path, model_path, session, evaluation)
        values |= q.values
        metric_notes += q.notes
        quantization, served = q.report, q.session
    warmup = task.warmup(served)

    images = [plot_history(result.history, staging.path("learning_curve.png"), task.select).name, *evaluation.images]
    write_checkpoint(staging.path(CHECKPOINT), *task.checkpoint())
    metrics = Metrics(
        split="test",
        samples=evaluation.samples,
        values=values,
        per_class=evaluation.per_class,
        baselines={**evaluation.baselines, **baselines},
        notes=metric_notes + baseline_notes,
        shifted=evaluation.shifted,
    )
    export_info = ExportInfo(
        opset=export["opset"],
        exporter=export["exporter"],
        onnxruntime_version=_onnxruntime_version(),
        torch_version=_torch_version(),
        parity=parity,
        quantization=quantization,
    )
    manifest = Manifest(
        name=staging.name,
        version=staging.version,
        task=task.name,  # type: ignore[arg-type]
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        labels=data.labels,
        **_contract(task),
        base_model=network.base_model,
        training=_training(task, data, network, result, started, cpu_started),
        metrics=metrics,
        export=export_info,
        warmup=warmup,
    )
    write_model_card(staging.folder, manifest, images)
    return staging.publish(manifest)


def _contract(task: Task) -> dict[str, object]:
    c = task.contract()
    return {
        "inputs": c.inputs,
        "outputs": c.outputs,
        "preprocessing": c.preprocessing,
        "postprocessing": c.postprocessing,
    }


def _training(
    task: Task, data: DataSummary, network: Network, result: FitResult, started: float, cpu_started: float
) -> TrainingInfo:
    """How the model was made: strategy, data, seed, device, the resolved recipe, history, notes."""
    run, options = task.run, task.options
    config = {
        **task.recipe.as_config(),
        "recipe": options.recipe_name,
        "seed": options.seed,
        "data": str(options.data) if options.data else None,
        "threads": run.threads,
        "quantize": options.quantize,
        "checkpoint_dir": str(options.checkpoint_dir) if options.checkpoint_dir else None,
        "resume": options.resume,
        **task.config(),
        # CPU seconds (cpu_total) compare across runs on a shared machine; wall seconds do not.
        "timings_s": {**run.timings, "cpu_total": round(time.process_time() - cpu_started, 1)},
    }
    return TrainingInfo(
        strategy=network.strategy,
        frozen_layers=network.frozen_layers,
        trainable_params=network.trainable_params,
        total_params=network.total_params,
        epochs=len(result.history),
        seed=options.seed,
        recipe=options.recipe_name,
        dataset=DatasetInfo(name=data.name, sha256=data.sha256, splits=data.splits, description=data.description),
        wall_time_s=round(time.perf_counter() - started, 1),
        device=describe_device(run.device),
        init_from=run.init.ref if run.init else None,
        config=config,
        history=result.history,
        notes=run.notes,
    )


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _torch_version() -> str:
    import torch

    return torch.__version__
