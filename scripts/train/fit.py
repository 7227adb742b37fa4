"""The training loop every task shares: epochs, early stopping on validation, the best weights
kept, and a checkpoint after every epoch that `--resume` continues from.

A task hands `fit` a `Trainer`: the module that trains, its optimizer and learning-rate
schedule, how one epoch's batches are drawn, the loss of one batch, and how to validate. The
loop, the stopping rule and the checkpoint format are the same for every task.

Also here, once: the strategies (which leading blocks stay frozen) and the small-data schedule.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from models.recipes import Recipe

from .console import log, progress
from .device import module_device

B = TypeVar("B")
R = TypeVar("R", bound=Recipe)

STRATEGIES = ("feature-extraction", "partial", "full")


def frozen_prefix(strategy: str, blocks: int, trainable_blocks: int) -> int:
    """How many leading blocks of a `blocks`-deep backbone stay frozen under `strategy`:
    all of them (feature-extraction), none (full), or all but the last `trainable_blocks` (partial)."""
    if strategy == "feature-extraction":
        return blocks
    if strategy == "full":
        return 0
    if strategy == "partial":
        return max(0, blocks - trainable_blocks)
    raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)} or auto")


def param_groups(
    new: list[nn.Parameter], pretrained: list[nn.Parameter], *, head_lr: float, lr: float, **pretrained_extra: Any
) -> list[dict[str, Any]]:
    """Optimizer groups: the new layers at `head_lr`, the pretrained layers that train at `lr`."""
    groups: list[dict[str, Any]] = [{"params": new, "lr": head_lr}]
    if pretrained:
        groups.append({"params": pretrained, "lr": lr, **pretrained_extra})
    return groups


def small_data_schedule(recipe: R, n_train: int, *, epochs_given: bool) -> tuple[R, str | None]:
    """More epochs for a small training set, so that it still gets `min_steps` optimizer steps.

    A recipe's epoch count is tuned on its demo data (tens of thousands of examples); a team's
    80 reviews or 50 photos would get two or three steps from it, and a one-cycle schedule that
    rises and falls within them learns nothing. Capped at `max_epochs`; patience grows with the
    epochs so that early stopping does not end the run after a noisy epoch. An explicit
    --epochs is kept as given.
    """
    steps = max(1, math.ceil(n_train / recipe.batch_size))
    want = min(recipe.max_epochs, math.ceil(recipe.min_steps / steps))
    if epochs_given or want <= recipe.epochs:
        return recipe, None
    patience = max(recipe.patience, want // 4)
    note = (
        f"small training set: {n_train} examples are {steps} step(s) an epoch, so {want} epochs instead of the "
        f"recipe's {recipe.epochs} (at least {recipe.min_steps} steps, at most {recipe.max_epochs} epochs); "
        f"early stopping after {patience} epochs without a validation gain"
    )
    return replace(recipe, epochs=want, patience=patience), note


@dataclass
class Streams:
    """The random streams batches are drawn from. They live on the CPU, so a run draws the same
    shuffles on every device, and they are saved with the checkpoint."""

    torch: torch.Generator
    python: random.Random

    @classmethod
    def seeded(cls, seed: int) -> Streams:
        return cls(torch.Generator().manual_seed(seed), random.Random(seed))


@dataclass
class Trainer(Generic[B]):
    """What a task gives the shared loop."""

    module: nn.Module  # what trains: its state is the best weights and the checkpoint
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler, stepped after every optimizer step
    batches: Callable[[Streams], Sequence[B]]  # one epoch's batches, in order
    loss: Callable[[B], tuple[torch.Tensor, int, dict[str, float]]]  # (loss, examples, other logged terms)
    validate: Callable[[], dict[str, float]]  # the validation row of an epoch ("val_accuracy": ...)
    select: str  # the validation value the best epoch maximises
    clip: float | None = None  # max gradient norm
    train_mode: Callable[[], None] | None = None  # default: module.train()


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best: dict[str, torch.Tensor]  # the module's weights at its best validation epoch
    resumed_after: int | None = None  # the checkpoint's last epoch, when the run resumed


def run_epoch(trainer: Trainer[B], streams: Streams, desc: str) -> dict[str, float]:
    """One pass over the epoch's batches; returns the mean loss (and other terms) per example."""
    (trainer.train_mode or trainer.module.train)()
    batches = trainer.batches(streams)
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    seen = 0
    for batch in progress(batches, desc, total=len(batches), unit="step"):
        loss, n, terms = trainer.loss(batch)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if trainer.clip is not None:
            nn.utils.clip_grad_norm_(params, trainer.clip)
        trainer.optimizer.step()
        trainer.scheduler.step()
        for key, value in {"train_loss": float(loss.detach()), **terms}.items():
            sums[key] = sums.get(key, 0.0) + value * n
        seen += n
    return {k: v / max(1, seen) for k, v in sums.items()}


def fit(
    trainer: Trainer[Any],
    *,
    epochs: int,
    patience: int,
    seed: int,
    checkpoint: Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    label: str = "",
) -> FitResult:
    """Train for up to `epochs`, stop after `patience` epochs without a validation gain, and
    return the history and the best epoch's weights.

    An epoch without a gain counts towards `patience` only once the learning rate has come down to
    half its peak or less (or the schedule holds it constant): around the peak of a warm-up and
    one-cycle schedule the validation score dips while the model is far from settled, and a small
    training set, whose schedule is many short epochs (`small_data_schedule`), used to stop right
    there, in the dip, keeping a barely trained early epoch (seen in scripts/study_augment.py's runs
    on 100 images).

    With `checkpoint` (a folder), the full training state is saved after every epoch; with
    `resume` too, a run continues after the saved epoch and ends exactly where an uninterrupted
    run would have. `fingerprint` names the run (task, recipe, data, seed): a checkpoint from
    another run is refused rather than continued. `label` names a side run (a baseline, a sweep
    candidate) in the log lines.
    """
    prefix = f"{label} " if label else ""
    streams = Streams.seeded(seed)
    state = Checkpoint(checkpoint) if checkpoint is not None else None
    history: list[dict[str, float]] = []
    best_score, best, stale, first, resumed_after = -math.inf, _snapshot(trainer.module), 0, 1, None
    lr_peak = learning_rate(trainer)
    if state is not None and resume:
        if state.exists():
            saved = state.load(trainer, streams, fingerprint)
            history, best_score, stale, best = saved["history"], saved["best_score"], saved["stale"], saved["best"]
            lr_peak = saved.get("lr_peak", learning_rate(trainer))
            first = resumed_after = saved["epoch"]
            first += 1
            log(f"resumed from {state.path} after epoch {resumed_after} of {epochs}")
        else:
            log(f"--resume: no checkpoint in {checkpoint} yet, starting at epoch 1")
    for epoch in range(first, epochs + 1):
        if stale >= patience:
            break
        lr_before = learning_rate(trainer)
        row: dict[str, float] = {"epoch": epoch, **run_epoch(trainer, streams, f"{prefix}epoch {epoch}/{epochs}")}
        lr_after = learning_rate(trainer)
        lr_peak = max(lr_peak, lr_before, lr_after)
        row.update(trainer.validate())
        history.append(row)
        log(
            f"{prefix}epoch {epoch}: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in row.items() if k != "epoch")
        )
        if row[trainer.select] > best_score:
            best_score, best, stale = row[trainer.select], _snapshot(trainer.module), 0
        elif lr_after <= lr_peak / 2 or lr_after == lr_before:  # annealed, or a constant rate
            stale += 1
            if stale >= patience:
                log(f"{prefix}early stop: no validation gain for {stale} epoch(s)")
        if state is not None:
            state.save(
                trainer,
                streams,
                epoch=epoch,
                history=history,
                best=best,
                best_score=best_score,
                stale=stale,
                lr_peak=lr_peak,
                fingerprint=fingerprint,
            )
    return FitResult(history, best, resumed_after)


def learning_rate(trainer: Trainer[Any]) -> float:
    """The rate of the optimizer's first group (the schedules scale every group alike)."""
    return float(trainer.optimizer.param_groups[0]["lr"])


def best_row(history: list[dict[str, float]], select: str) -> dict[str, float]:
    """The history row of the best epoch (the first of equals, as `fit` keeps it)."""
    return max(history, key=lambda row: row[select]) if history else {}


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(module.state_dict())


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """The entries of a state dict that JSON can carry (schedulers hold a few functions)."""
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


class Checkpoint:
    """The full training state in one safetensors file (no pickle): the module's weights, the
    best weights so far, the optimizer's state, the schedule's position, the random streams
    (batch order, dropout) and the history, with the run's fingerprint."""

    FILE = "last.safetensors"

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / self.FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def save(
        self,
        trainer: Trainer[Any],
        streams: Streams,
        *,
        epoch: int,
        history: list[dict[str, float]],
        best: dict[str, torch.Tensor],
        best_score: float,
        stale: int,
        fingerprint: str,
        lr_peak: float = 0.0,
    ) -> None:
        """Write the state after `epoch` (atomically: a run killed mid-write keeps the previous one)."""
        from safetensors.torch import save_file

        def cpu(t: torch.Tensor) -> torch.Tensor:
            return t.detach().cpu().clone().contiguous()  # a copy: safetensors refuses shared storage

        tensors = {f"model.{k}": cpu(v) for k, v in trainer.module.state_dict().items()}
        tensors |= {f"best.{k}": cpu(v) for k, v in best.items()}
        opt = trainer.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, entries in opt["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{pid}.{key}"] = cpu(value)
                else:
                    scalars.setdefault(str(pid), {})[key] = value
        tensors["rng.batches"] = streams.torch.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        device = module_device(trainer.module)
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        meta = {
            "fingerprint": fingerprint,
            "epoch": epoch,
            "history": history,
            "best_score": best_score,
            "stale": stale,
            "lr_peak": lr_peak,
            "python_rng": streams.python.getstate(),
            "param_groups": opt["param_groups"],
            "optimizer_scalars": scalars,
            "scheduler": _jsonable(trainer.scheduler.state_dict()),
        }
        tmp = self.path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        tmp.replace(self.path)

    def load(self, trainer: Trainer[Any], streams: Streams, fingerprint: str) -> dict[str, Any]:
        """Restore the state into `trainer` and `streams`; returns epoch, history, best, best_score, stale."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(self.path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["state"])
        if meta["fingerprint"] != fingerprint:
            raise SystemExit(
                f"--resume: {self.path} was written by another run (different task, recipe, data, seed or "
                "starting weights); drop --resume to start over, or use another --checkpoint-dir"
            )
        tensors = load_file(str(self.path))
        trainer.module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for pid, entries in meta["optimizer_scalars"].items():
            state.setdefault(int(pid), {}).update(entries)
        trainer.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        sched = trainer.scheduler.state_dict()
        sched.update(meta["scheduler"])
        trainer.scheduler.load_state_dict(sched)
        streams.torch.set_state(tensors["rng.batches"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"], module_device(trainer.module))
        version, internal, gauss = meta["python_rng"]
        streams.python.setstate((version, tuple(internal), gauss))
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        return {**meta, "best": best}
