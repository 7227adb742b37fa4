"""Fine-tune an ImageNet backbone for image classification, evaluate, export, check parity.

Speed on CPU comes from one observation: frozen layers compute the same thing every epoch.
The frozen prefix of the network runs once over the data (`trunk`), its outputs are cached,
and only the trainable suffix (`top`) trains on them. `feature-extraction` freezes every
feature block, `partial` the first ones (the recipe says how many stay trainable), `full`
none (no cache; slow on CPU). `auto` tries several freeze depths on a small budget and keeps
the best on validation.

Every run also measures a linear probe (the same pretrained features, only a new head) from
the same cache, and says plainly in the manifest when fine-tuning did not beat it (negative
transfer). `--adabn` re-estimates the frozen BatchNorm statistics on the target images first.
"""

from __future__ import annotations

import copy
import math
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from torch import nn

from models.manifest import (
    ClassificationPostprocessing,
    DatasetInfo,
    ExportInfo,
    ImagePreprocessing,
    Manifest,
    Metrics,
    TensorSpec,
    TrainingInfo,
    WarmupSample,
)
from models.preprocess import ImagePreprocessor

from .backbones import Backbone, load_image_backbone
from .common import (
    Staging,
    classification_report,
    configure_threads,
    describe_device,
    export_onnx,
    log,
    module_device,
    ort_session,
    parity_report,
    pick_device,
    plot_confusion,
    plot_history,
    progress,
    require_parity,
    run_batched,
    set_seed,
    small_data_schedule,
    timed,
    write_model_card,
)
from .image_data import ImageDataset, input_size_for, load_fashion_mnist, load_image_folder, to_tensors

STRATEGIES = ("feature-extraction", "partial", "full")


def trainable_from(strategy: str, backbone: Backbone, trainable_blocks: int) -> int:
    """Index of the first trainable stage for a strategy."""
    if strategy == "feature-extraction":
        return backbone.feature_blocks
    if strategy == "full":
        return 0
    if strategy == "partial":
        return max(0, backbone.feature_blocks - trainable_blocks)
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def run_trunk(trunk: nn.Module, x: np.ndarray, desc: str, batch: int = 256) -> torch.Tensor:
    """Frozen prefix over a whole split, once (channels_last: ~2x faster depthwise convs on CPU).

    Runs where the trunk lives; the cache is kept in host memory (a GPU holds one batch at a time).
    """
    trunk.eval()
    device = module_device(trunk)
    outs = []
    for i in progress(range(0, len(x), batch), desc, total=math.ceil(len(x) / batch), unit="batch"):
        outs.append(trunk(_channels_last(torch.from_numpy(x[i : i + batch]).to(device))).cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


@torch.no_grad()
def predict_logits(top: nn.Module, feats: torch.Tensor, batch: int = 512) -> np.ndarray:
    top.eval()
    device = module_device(top)
    return torch.cat([top(feats[i : i + batch].to(device)).cpu() for i in range(0, len(feats), batch)]).numpy()


class TrainCheckpoint:
    """Resumable training state in one safetensors file (no pickle): weights, optimizer
    momentum, the best weights so far, the RNG, and the schedule position as JSON metadata."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "last.safetensors"

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, top, opt, sched, gen, *, epoch, history, best_acc, stale, best) -> None:
        import json

        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in top.state_dict().items()}
        tensors |= {f"best.{k}": v.detach().cpu().contiguous() for k, v in best.items()}
        for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{i}"] = buf.cpu().contiguous()
        tensors["rng"] = gen.get_state()
        meta = {
            "epoch": epoch,
            "history": history,
            "best_acc": best_acc,
            "stale": stale,
            "sched": {k: v for k, v in sched.state_dict().items() if isinstance(v, int | float | list)},
        }
        tmp = self.path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        tmp.replace(self.path)

    def load(self, top, opt, sched, gen) -> dict[str, Any]:
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        tensors = load_file(str(self.path))
        with safe_open(str(self.path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["state"])
        top.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
            if f"momentum.{i}" in tensors:
                opt.state[p]["momentum_buffer"] = tensors[f"momentum.{i}"].to(p.device, copy=True)
        sched_state = sched.state_dict()
        sched_state.update(meta["sched"])
        sched.load_state_dict(sched_state)
        for group, lr in zip(opt.param_groups, sched.get_last_lr(), strict=True):
            group["lr"] = lr  # the next step must use the schedule's lr, not the initial one
        gen.set_state(tensors["rng"])
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        return {**meta, "best": best}


def train_top(
    top: nn.Module,
    head: nn.Module,
    feats: torch.Tensor,
    labels: np.ndarray,
    val_feats: torch.Tensor,
    val_labels: np.ndarray,
    cfg: dict[str, Any],
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """SGD + one-cycle schedule on cached features; keeps the weights of the best validation epoch."""
    head_params = {id(p) for p in head.parameters()}
    body = [p for p in top.parameters() if id(p) not in head_params and p.requires_grad]
    groups = [{"params": list(head.parameters()), "lr": cfg["head_lr"]}]
    if body:
        groups.append({"params": body, "lr": cfg["lr"]})
    opt = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=cfg["weight_decay"])
    bs = cfg["batch_size"]
    steps_per_epoch = math.ceil(len(feats) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=cfg["epochs"] * steps_per_epoch, pct_start=0.15
    )
    y = torch.from_numpy(labels.astype(np.int64))
    gen = torch.Generator().manual_seed(cfg["seed"])  # on the CPU: the same shuffles on every device
    device = module_device(top)
    history: list[dict[str, float]] = []
    best_acc, best_state, stale = -1.0, copy.deepcopy(top.state_dict()), 0
    ckpt = TrainCheckpoint(Path(cfg["checkpoint_dir"])) if cfg.get("checkpoint_dir") else None
    first_epoch = 1
    if ckpt is not None and cfg.get("resume") and ckpt.exists():
        state = ckpt.load(top, opt, sched, gen)
        history, best_acc, stale, best_state = state["history"], state["best_acc"], state["stale"], state["best"]
        first_epoch = state["epoch"] + 1
        log(f"resumed from {ckpt.path} after epoch {state['epoch']}")
    for epoch in range(first_epoch, cfg["epochs"] + 1):
        if stale >= cfg["patience"]:
            break
        top.train()
        perm = torch.randperm(len(feats), generator=gen)
        total, count = 0.0, 0
        bar = progress(range(steps_per_epoch), f"epoch {epoch}/{cfg['epochs']}", total=steps_per_epoch, unit="step")
        for step in bar:
            idx = perm[step * bs : (step + 1) * bs]
            logits = top(feats[idx].to(device, non_blocking=True))
            loss = nn.functional.cross_entropy(logits, y[idx].to(device), label_smoothing=cfg["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        val_acc = float((predict_logits(top, val_feats).argmax(1) == val_labels).mean())
        history.append({"epoch": epoch, "train_loss": total / max(1, count), "val_accuracy": val_acc})
        log(f"epoch {epoch}: train loss {total / max(1, count):.4f}, val accuracy {val_acc:.4f}")
        if val_acc > best_acc:
            best_acc, best_state, stale = val_acc, copy.deepcopy(top.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg["patience"]:
                log(f"early stop: no validation gain for {stale} epoch(s)")
        if ckpt is not None:
            ckpt.save(
                top, opt, sched, gen, epoch=epoch, history=history, best_acc=best_acc, stale=stale, best=best_state
            )
    return history, best_state


@dataclass
class Fitted:
    """A trained model split at `cut`, with the cached trunk outputs it was trained on."""

    trunk: nn.Module
    top: nn.Module
    cut: int
    history: list[dict[str, float]]
    f_train: torch.Tensor
    f_val: torch.Tensor
    f_test: torch.Tensor | None
    trunk_seconds: float

    @property
    def best_val(self) -> float:
        return max(h["val_accuracy"] for h in self.history)


def make_backbone(name: str, labels: list[str], init: dict[str, Any] | None, pretrained: bool = True):
    """A backbone with a new head for `labels`, optionally starting from an earlier artifact."""
    backbone = load_image_backbone(name, len(labels), pretrained=pretrained)
    if init is None:
        return backbone, None
    if init["backbone"] != name:
        raise SystemExit(f"--init-from {init['ref']} is a {init['backbone']} model, not {name}")
    same_classes = init["labels"] == labels
    reset = backbone.load_checkpoint(init["state"], keep_head=same_classes)
    note = f"initialised from {init['ref']}" + (
        "" if same_classes else f"; classes changed, head re-initialised ({', '.join(reset)})"
    )
    return backbone, note


@torch.no_grad()
def adapt_batchnorm(module: nn.Module, x: np.ndarray, batch: int = 256, max_gain: float = 10.0) -> int:
    """AdaBN: replace BatchNorm running statistics with ones measured on target-domain images.

    Weights are untouched; only the normalisation moves to the new data. A channel that is
    nearly constant on the target data (black Fashion-MNIST backgrounds do this) would get a
    near-zero variance and be amplified by up to 1/sqrt(eps); its standard deviation is kept
    within `max_gain` of the source one, which bounds that amplification (and the float error
    it brings into the exported graph). Returns how many BatchNorm layers were re-estimated.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(bn.momentum, bn.running_var.clone()) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    module.train()
    device = module_device(module)
    for i in progress(range(0, len(x), batch), "AdaBN", total=math.ceil(len(x) / batch), unit="batch"):
        module(_channels_last(torch.from_numpy(x[i : i + batch]).to(device)))
    module.eval()
    for bn, (momentum, source_var) in zip(bns, saved, strict=True):
        bn.momentum = momentum
        bn.running_var.clamp_(min=source_var / max_gain**2)
    return len(bns)


def fit(
    backbone: Backbone,
    cut: int,
    xs: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    y_train: np.ndarray,
    y_val: np.ndarray,
    cfg: dict[str, Any],
    device: torch.device | None = None,
) -> Fitted:
    """Freeze stages[:cut], cache their outputs once, train stages[cut:] on the cache (on `device`)."""
    device = device or torch.device("cpu")
    trunk = nn.Sequential(*backbone.stages[:cut]).to(device, memory_format=torch.channels_last)
    top = nn.Sequential(*backbone.stages[cut:]).to(device, memory_format=torch.channels_last)
    for p in trunk.parameters():
        p.requires_grad_(False)
    if cfg.get("adabn") and cut > 0:
        n = adapt_batchnorm(trunk, xs[0])
        log(f"AdaBN: re-estimated {n} BatchNorm layers of the frozen trunk on {len(xs[0])} target images")
    start = time.perf_counter()
    f_train = run_trunk(trunk, xs[0], "trunk train")
    f_val = run_trunk(trunk, xs[1], "trunk val")
    f_test = run_trunk(trunk, xs[2], "trunk test") if xs[2] is not None else None
    trunk_seconds = time.perf_counter() - start
    history, best = train_top(top, backbone.stages[-1], f_train, y_train, f_val, y_val, cfg)
    top.load_state_dict(best)
    return Fitted(trunk, top, cut, history, f_train, f_val, f_test, trunk_seconds)


# Freeze depths `--strategy auto` tries. `full` is left out: on CPU it trains at about a third of
# the speed of `partial` and never won on the small budgets the sweep can afford.
AUTO_CANDIDATES = (("feature-extraction", 0), ("partial", 4), ("partial", 8), ("partial", 12))


@torch.no_grad()
def _extend(stages: list[nn.Module], feats: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Run frozen stages over cached features (deeper cut from a shallower cache)."""
    if not stages:
        return feats
    module = nn.Sequential(*stages).eval()
    device = module_device(module)
    module.to(device, memory_format=torch.channels_last)
    return torch.cat([module(feats[i : i + batch].to(device)).cpu() for i in range(0, len(feats), batch)])


def auto_sweep(
    backbone_name: str,
    labels: list[str],
    init: dict[str, Any] | None,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    cfg: dict[str, Any],
    device: torch.device | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Try each freeze depth on a small budget; pick the best validation accuracy.

    The frozen prefix is shared: its output is computed once at the shallowest cut, and each
    deeper candidate runs only its extra frozen blocks over that cache. Ties go to the cheaper
    candidate (fewer trainable layers), which comes first in the list.
    """
    from .image_data import stratified_split

    budget = min(len(y_train), cfg.get("auto_train_size", 2000))
    idx = stratified_split(y_train, len(y_train) - budget, cfg["seed"] + 7)[0] if budget < len(y_train) else None
    xt, yt = (x_train[idx], y_train[idx]) if idx is not None else (x_train, y_train)
    vbudget = min(len(y_val), cfg.get("auto_val_size", 1000))
    vidx = stratified_split(y_val, len(y_val) - vbudget, cfg["seed"] + 8)[0] if vbudget < len(y_val) else None
    xv, yv = (x_val[vidx], y_val[vidx]) if vidx is not None else (x_val, y_val)
    sweep_cfg = {**cfg, "epochs": cfg.get("auto_epochs", 2), "patience": 99, "checkpoint_dir": None}

    device = device or torch.device("cpu")
    probe, _ = make_backbone(backbone_name, labels, init)
    cuts = {(s, b): trainable_from(s, probe, b) for s, b in AUTO_CANDIDATES}
    c0 = min(cuts.values())
    base = nn.Sequential(*probe.stages[:c0]).to(device, memory_format=torch.channels_last)
    base_train, base_val = run_trunk(base, xt, "auto trunk train"), run_trunk(base, xv, "auto trunk val")
    results = []
    for (strategy, blocks), cut in cuts.items():
        torch.manual_seed(cfg["seed"])
        backbone, _ = make_backbone(backbone_name, labels, init)
        start = time.perf_counter()
        extra = [stage.to(device) for stage in backbone.stages[c0:cut]]
        ft, fv = _extend(extra, base_train), _extend(extra, base_val)
        top = nn.Sequential(*backbone.stages[cut:]).to(device, memory_format=torch.channels_last)
        history, _ = train_top(top, backbone.stages[-1], ft, yt, fv, yv, sweep_cfg)
        row = {
            "strategy": strategy,
            "trainable_blocks": blocks,
            "frozen_stages": cut,
            "val_accuracy": round(max(h["val_accuracy"] for h in history), 5),
            "seconds": round(time.perf_counter() - start, 1),
        }
        log(f"auto: {strategy} (last {blocks} blocks) -> val accuracy {row['val_accuracy']:.4f} in {row['seconds']} s")
        results.append(row)
    best = max(results, key=lambda r: r["val_accuracy"])  # first max wins: cheaper on ties
    return {"strategy": best["strategy"], "trainable_blocks": best["trainable_blocks"]}, results


def linear_probe_from_cache(
    backbone_name: str,
    labels: list[str],
    init: dict[str, Any] | None,
    fitted: Fitted,
    data: ImageDataset,
    cfg: dict[str, Any],
    device: torch.device | None = None,
) -> dict[str, float]:
    """The linear-probe baseline (frozen pretrained features + a new head), from the fitted cache.

    The fitted trunk is still the untouched pretrained prefix, so only the remaining pretrained
    feature blocks run over the cache before a head is trained with the same budget.
    """
    torch.manual_seed(cfg["seed"])
    device = device or torch.device("cpu")
    fresh, _ = make_backbone(backbone_name, labels, init)
    rest = nn.Sequential(*fresh.stages[fitted.cut : fresh.feature_blocks]).to(device, memory_format=torch.channels_last)
    head = nn.Sequential(*fresh.stages[fresh.feature_blocks :]).to(device)

    @torch.no_grad()
    def through(feats: torch.Tensor) -> torch.Tensor:
        rest.eval()
        return torch.cat([rest(feats[i : i + 512].to(device)).cpu() for i in range(0, len(feats), 512)])

    p_train, p_val = through(fitted.f_train), through(fitted.f_val)
    history, best = train_top(
        head, fresh.stages[-1], p_train, data.train.labels, p_val, data.val.labels, {**cfg, "checkpoint_dir": None}
    )
    head.load_state_dict(best)
    out = {"val_accuracy": round(max(h["val_accuracy"] for h in history), 5)}
    if fitted.f_test is not None:
        test_pred = predict_logits(head, through(fitted.f_test)).argmax(1)
        out["accuracy"] = round(float((test_pred == data.test.labels).mean()), 5)
    return out


def negative_transfer_notes(fine_tuned_val: float, baselines: dict[str, dict[str, float]]) -> list[str]:
    """Plain words when fine-tuning did not beat a baseline on validation (negative transfer)."""
    notes = []
    for name, vals in baselines.items():
        base = vals.get("val_accuracy")
        if base is None:
            continue
        if fine_tuned_val <= base:
            notes.append(
                f"NEGATIVE TRANSFER WARNING: the fine-tuned model ({fine_tuned_val:.4f} validation accuracy) "
                f"does not beat the {name} baseline ({base:.4f}); prefer the baseline or revisit the strategy"
            )
        else:
            notes.append(f"fine-tuning beats the {name} baseline on validation: {fine_tuned_val:.4f} vs {base:.4f}")
    return notes


def load_init(args: Namespace) -> dict[str, Any]:
    """Weights, labels and backbone of the artifact named by --init-from."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from models.artifact import load_artifact
    from models.servable import resolve_ref

    art = load_artifact(resolve_ref(Path(args.registry), args.init_from))
    if art.manifest.task != "image-classification":
        raise SystemExit(f"--init-from {args.init_from}: a {art.manifest.task} artifact, not image-classification")
    ckpt = art.file("checkpoint.safetensors")
    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata() or {}
    return {
        "ref": f"{art.name}/{art.version}",
        "labels": art.manifest.labels,
        "backbone": meta.get("backbone", art.manifest.base_model.architecture),
        "state": load_file(str(ckpt)),
    }


def load_data(args: Namespace, cfg: dict[str, Any]) -> ImageDataset:
    if args.data:
        try:
            return load_image_folder(Path(args.data), cfg["val_size"], cfg["seed"], cfg["train_limit"])
        except (OSError, ValueError) as e:
            raise SystemExit(f"image data: {e}") from e
    return load_fashion_mnist(cfg["val_size"], cfg["seed"], cfg["train_limit"])


def run(args: Namespace, cfg: dict[str, Any]) -> Path:
    """Train, evaluate, export and publish; returns the artifact folder."""
    started = time.perf_counter()
    threads = configure_threads()
    set_seed(cfg["seed"])  # first: it sets CUBLAS_WORKSPACE_CONFIG before CUDA starts
    device = pick_device(getattr(args, "device", "auto"))
    with timed("load data"):
        data = load_data(args, cfg)
    log(
        f"dataset {data.name}: {len(data.labels)} classes, train {len(data.train)}, val {len(data.val)}, "
        f"test {len(data.test)}"
    )
    cfg, schedule_note = small_data_schedule(cfg, len(data.train), epochs_given=args.epochs is not None)
    if schedule_note:
        log(schedule_note)
    size_note = None
    if args.data and args.image_size is None and data.train.paths:
        size, median = input_size_for(data.train.paths)
        if size != cfg["image_size"]:
            size_note = (
                f"input size {size} px from the training images (median short side {median} px) instead of the "
                f"recipe's {cfg['image_size']} (tuned for Fashion-MNIST); --image-size sets it"
            )
            log(size_note)
            cfg = {**cfg, "image_size": size}
    spec = ImagePreprocessing(height=cfg["image_size"], width=cfg["image_size"])
    pre = ImagePreprocessor(spec)
    init = load_init(args) if args.init_from else None
    backbone_name = args.backbone or (init["backbone"] if init else "mobilenet_v2")
    backbone, init_note = make_backbone(backbone_name, data.labels, init)
    if init_note:
        log(init_note)
    with timed("preprocess") as t_pre:
        x_train = to_tensors(data.train, pre, "preprocess train")
        x_val = to_tensors(data.val, pre, "preprocess val")
        x_test = to_tensors(data.test, pre, "preprocess test")

    sweep: list[dict[str, Any]] = []
    if cfg["strategy"] == "auto":
        with timed("strategy sweep"):
            choice, sweep = auto_sweep(
                backbone_name, data.labels, init, x_train, data.train.labels, x_val, data.val.labels, cfg, device
            )
        cfg = {**cfg, **choice, "strategy_requested": "auto"}
        log(f"auto chose {choice} (val accuracy {max(r['val_accuracy'] for r in sweep):.4f})")
    cut = trainable_from(cfg["strategy"], backbone, cfg["trainable_blocks"])
    log(
        f"{backbone.name}: strategy {cfg['strategy']}, {cut} frozen stage(s), training on {describe_device(device)}"
        + (f", {threads} thread(s)" if device.type == "cpu" else "")
    )
    with timed("fit") as t_fit:
        fitted = fit(backbone, cut, (x_train, x_val, x_test), data.train.labels, data.val.labels, cfg, device)
    trunk, top, history = fitted.trunk.cpu(), fitted.top.cpu(), fitted.history
    if device.type != "cpu" and fitted.f_test is not None:
        # Evaluation and the parity reference come from the CPU, like the exported model's run.
        fitted.f_test = run_trunk(trunk, x_test, "trunk test (cpu)")
    frozen = [f"stage{i}" for i in range(cut)]
    n_total = sum(p.numel() for p in trunk.parameters()) + sum(p.numel() for p in top.parameters())
    n_train = sum(p.numel() for p in top.parameters())
    del x_train, x_val

    with timed("evaluate"):
        test_logits = predict_logits(top, fitted.f_test)
        report = classification_report(data.test.labels, test_logits.argmax(1), data.labels)
    log(f"test accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f} on {report.samples} images")

    baselines: dict[str, dict[str, float]] = {}
    guard_notes: list[str] = []
    if "linear-probe" in cfg.get("baselines", []) and cut < backbone.feature_blocks:
        with timed("linear-probe baseline"):
            probe = linear_probe_from_cache(backbone_name, data.labels, init, fitted, data, cfg, device)
        baselines["linear-probe"] = probe
        guard_notes = negative_transfer_notes(fitted.best_val, baselines)
        for n in guard_notes:
            log(n)
    staging = Staging(Path(args.registry), args.name or "image-classification")
    try:
        full = nn.Sequential(trunk, top).to(memory_format=torch.contiguous_format).eval()
        model_path = staging.path("model.onnx")
        export = export_onnx(
            full,
            (torch.from_numpy(x_test[:2]),),
            model_path,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
        with timed("parity check"):
            sess = ort_session(model_path)
            onnx_logits = run_batched(lambda b: sess.run(["logits"], {"input": b})[0], x_test, 256, "onnx test")
            parity = parity_report(test_logits, onnx_logits, tolerance=args.parity_tolerance)
        require_parity(parity)

        # Warm-up sample: a real test image as PNG; its serving-path output is checked at every load.
        sample = data.test.encoded(0)
        sample_name = "sample.png" if data.test.paths is None else "sample" + data.test.paths[0].suffix.lower()
        staging.path(sample_name).write_bytes(sample)
        sample_tensor, _ = pre.from_bytes(sample)
        expected = sess.run(["logits"], {"input": sample_tensor[None]})[0]

        images = [
            plot_confusion(
                report.confusion,
                data.labels,
                staging.path("confusion_matrix.png"),
                f"{data.name} test: accuracy {report.accuracy:.4f}",
            ).name,
            plot_history(history, staging.path("learning_curve.png"), "training").name,
        ]
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in backbone.model.state_dict().items()},
            str(staging.path("checkpoint.safetensors")),
            metadata={"backbone": backbone.name},
        )

        manifest = Manifest(
            name=staging.name,
            version=staging.version,
            task="image-classification",
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            labels=data.labels,
            inputs=[TensorSpec(name="input", dtype="float32", shape=["batch", 3, spec.height, spec.width])],
            outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", len(data.labels)])],
            preprocessing=spec,
            postprocessing=ClassificationPostprocessing(),
            base_model=backbone.info,
            training=TrainingInfo(
                strategy=cfg["strategy"],
                frozen_layers=frozen,
                trainable_params=n_train,
                total_params=n_total,
                epochs=len(history),
                seed=cfg["seed"],
                recipe=cfg["recipe"],
                dataset=DatasetInfo(
                    name=data.name,
                    sha256=data.sha256,
                    splits={"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                    description=data.description,
                ),
                wall_time_s=round(time.perf_counter() - started, 1),
                device=describe_device(device),
                config={
                    **cfg,
                    "backbone": backbone.name,
                    "threads": threads,
                    "timings_s": {
                        "preprocess": round(t_pre["seconds"], 1),
                        "frozen_trunk": round(fitted.trunk_seconds, 1),
                        "train": round(t_fit["seconds"] - fitted.trunk_seconds, 1),
                    },
                    "auto_sweep": sweep,
                },
                history=history,
                init_from=init["ref"] if init else None,
                notes=[n for n in (init_note, schedule_note, size_note) if n],
            ),
            metrics=Metrics(
                split="test",
                samples=report.samples,
                values={**report.values(), "val_accuracy": round(fitted.best_val, 5)},
                per_class=report.per_class,
                baselines=baselines,
                notes=guard_notes,
            ),
            export=ExportInfo(
                opset=export["opset"],
                exporter=export["exporter"],
                onnxruntime_version=onnxruntime.__version__,
                torch_version=torch.__version__,
                parity=parity,
            ),
            warmup=WarmupSample(file=sample_name, expected=expected.tolist(), atol=1e-3),
        )
        write_model_card(staging.folder, manifest, images)
        return staging.publish(manifest)
    except BaseException:
        staging.discard()
        raise
