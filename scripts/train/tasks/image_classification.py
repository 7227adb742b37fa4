"""Image classification: an ImageNet backbone with a new head, fine-tuned on your classes.

Speed on CPU comes from one observation: frozen layers compute the same thing every epoch.
The frozen prefix of the network runs once over the data (`trunk`), its outputs are cached,
and only the trainable suffix (`top`) trains on them. `feature-extraction` freezes every
feature block, `partial` the first ones (the recipe says how many stay trainable), `full`
none (no cache; slow on CPU). `auto` tries several freeze depths on a small budget and keeps
the best on validation.

Every run also measures a linear probe (the same pretrained features, only a new head) from
the same cache, and says plainly in the manifest when fine-tuning did not beat it (negative
transfer). `--adabn` re-estimates the frozen BatchNorm statistics on the target images first.
`--augment` caches the trunk's features of augmented views too (scripts/train/views.py). A
shifted test split (data/shifted_images.py) is evaluated beside the test split.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from models.manifest import ClassificationPostprocessing, ImagePreprocessing, TensorSpec, WarmupSample
from models.preprocess import ImagePreprocessor
from models.recipes import ImageClassificationRecipe

from ..console import log, timed
from ..data.images import ImageDataset, input_size_for, load_fashion_mnist, load_image_folder, stratified_split
from ..data.images import to_tensors as preprocess_split
from ..data.shifted_images import shifted_metrics
from ..device import describe_device, module_device
from ..export import parity_message, parity_report, run_batched
from ..fit import FitResult, Trainer, fit, frozen_prefix, param_groups
from ..metrics import classification_report
from ..nets.backbones import Backbone, adapt_batchnorm, apply_in_batches, load_image_backbone, run_trunk
from ..report import plot_confusion
from ..task import Contract, DataSummary, Evaluation, ExportSpec, InitCheckpoint, Network, Task
from ..views import augmented_features

# Freeze depths `--strategy auto` tries. `full` is left out: on CPU it trains at about a third of
# the speed of `partial` and never won on the small budgets the sweep can afford.
AUTO_CANDIDATES = (("feature-extraction", 0), ("partial", 4), ("partial", 8), ("partial", 12))


def make_backbone(name: str, labels: list[str], init: InitCheckpoint | None) -> tuple[Backbone, str | None]:
    """A pretrained backbone with a new head for `labels`, or the --init-from artifact's weights
    (its head too when the classes are the same)."""
    try:
        backbone = load_image_backbone(name, len(labels))
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"--backbone {name}: {e}") from e
    if init is None:
        return backbone, None
    parent = init_backbone(init)
    if parent != name:
        raise SystemExit(f"--init-from {init.ref} is a {parent} model, not {name}; drop --backbone")
    same_classes = init.manifest.labels == labels
    reset = backbone.load_checkpoint(init.state, keep_head=same_classes)
    note = f"initialised from {init.ref}" + (
        "" if same_classes else f"; classes changed, head re-initialised ({', '.join(reset)})"
    )
    return backbone, note


def init_backbone(init: InitCheckpoint) -> str:
    """The torchvision architecture an image-classification checkpoint was saved from."""
    return init.metadata.get("backbone") or init.manifest.base_model.architecture


def image_trainer(
    top: nn.Module,
    head: nn.Module,
    feats: torch.Tensor,
    labels: np.ndarray,
    val_feats: torch.Tensor,
    val_labels: np.ndarray,
    recipe: ImageClassificationRecipe,
    epochs: int,
    *,
    views: bool = False,
) -> Trainer[torch.Tensor]:
    """SGD (Nesterov) with a one-cycle schedule on cached trunk outputs (N x ..., or with `views`
    V x N x ...: V views of each image, one drawn per image and epoch), picked by validation accuracy."""
    head_ids = {id(p) for p in head.parameters()}
    body = [p for p in top.parameters() if id(p) not in head_ids and p.requires_grad]
    groups = param_groups(list(head.parameters()), body, head_lr=recipe.head_lr, lr=recipe.lr)
    opt = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay)
    bs = recipe.batch_size
    n = len(labels)
    steps = -(-n // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=epochs * steps, pct_start=0.15
    )
    y = torch.from_numpy(labels.astype(np.int64))
    device = module_device(top)

    def batches(streams) -> list[torch.Tensor]:
        perm = torch.randperm(n, generator=streams.torch)
        chunks = [perm[i * bs : (i + 1) * bs] for i in range(steps)]
        if not views:
            return chunks
        pick = torch.randint(len(feats), (n,), generator=streams.torch)  # which view of each image
        return [torch.stack((pick[c], c)) for c in chunks]

    def loss(batch: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
        idx = batch[1] if views else batch
        x = feats[batch[0], idx] if views else feats[idx]
        logits = top(x.to(device, non_blocking=True))
        ce = nn.functional.cross_entropy(logits, y[idx].to(device), label_smoothing=recipe.label_smoothing)
        return ce, len(idx), {}

    def validate() -> dict[str, float]:
        return {"val_accuracy": accuracy(apply_in_batches(top, val_feats), val_labels)}

    return Trainer(top, opt, sched, batches, loss, validate, select="val_accuracy")


def accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.numpy().argmax(1) == labels).mean())


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


class ImageClassification(Task[ImageClassificationRecipe]):
    name = "image-classification"
    select = "val_accuracy"

    def load_data(self) -> DataSummary:
        r, o = self.recipe, self.options
        try:
            if o.data:
                data = load_image_folder(o.data, r.val_size, o.seed, r.train_limit)
            else:
                data = load_fashion_mnist(r.val_size, o.seed, r.train_limit)
        except (OSError, ValueError) as e:
            raise SystemExit(f"image data: {e}") from e
        self.data: ImageDataset = data
        if o.data and "image_size" not in o.given and data.train.paths:
            size, median = input_size_for(data.train.paths)
            if size != r.image_size:
                note = (
                    f"input size {size} px from the training images (median short side {median} px) instead of the "
                    f"recipe's {r.image_size} (tuned for Fashion-MNIST); --image-size sets it"
                )
                log(note)
                self.run.notes.append(note)
                self.recipe = replace(r, image_size=size)
        splits = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
        return DataSummary(data.name, data.labels, splits, data.sha256, data.description)

    def build(self) -> Network:
        data, init, timings = self.data, self.run.init, self.run.timings
        self.spec = ImagePreprocessing(height=self.recipe.image_size, width=self.recipe.image_size)
        self.pre = ImagePreprocessor(self.spec)
        self.backbone_name = self.options.backbone or (init_backbone(init) if init else "mobilenet_v2")
        self.backbone, note = make_backbone(self.backbone_name, data.labels, init)
        if note:
            log(note)
            self.run.notes.append(note)
        with timed("preprocess", timings):
            self.x = {
                s: preprocess_split(getattr(data, s), self.pre, f"preprocess {s}") for s in ("train", "val", "test")
            }
        self.sweep: list[dict[str, Any]] = []
        if self.recipe.strategy == "auto":
            with timed("strategy sweep", timings):
                choice, self.sweep = self.auto_sweep()
            note = (
                f"--strategy auto chose {choice['strategy']} (last {choice['trainable_blocks']} blocks) on validation"
            )
            log(note)
            self.run.notes.append(note)
            self.recipe = replace(self.recipe, **choice)
        self.cut = frozen_prefix(self.recipe.strategy, self.backbone.feature_blocks, self.recipe.trainable_blocks)
        device = self.run.device
        self.trunk = nn.Sequential(*self.backbone.stages[: self.cut]).to(device, memory_format=torch.channels_last)
        self.top = nn.Sequential(*self.backbone.stages[self.cut :]).to(device, memory_format=torch.channels_last)
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        if self.recipe.adabn and self.cut > 0:
            n = adapt_batchnorm(self.trunk, self.x["train"])
            self.run.notes.append(
                f"AdaBN: {n} BatchNorm layers of the frozen trunk re-estimated on the training images"
            )
            log(self.run.notes[-1])
        with timed("frozen trunk", timings):
            self.feats = {s: run_trunk(self.trunk, x, f"trunk {s}") for s, x in self.x.items()}
        self.train_feats, self.views = self.feats["train"], 0  # with --augment: V x N x ...
        if self.recipe.augment != "none":
            with timed("augmented views", timings):
                self.train_feats, self.views, note = augmented_features(self.trunk, self.feats["train"], self)
            log(note)
            self.run.notes.append(note)
        trainable = sum(p.numel() for p in self.top.parameters())
        total = trainable + sum(p.numel() for p in self.trunk.parameters())
        cpu = f", {self.run.threads} thread(s)" if device.type == "cpu" else ""
        return Network(
            base_model=self.backbone.info,
            strategy=self.recipe.strategy,
            frozen_layers=[f"stage{i}" for i in range(self.cut)],
            trainable_params=trainable,
            total_params=total,
            summary=f"{self.backbone.name}: strategy {self.recipe.strategy}, {self.cut} frozen stage(s), "
            f"{trainable:,} of {total:,} parameters trainable, training on {describe_device(device)}{cpu}",
        )

    def trainer(self) -> Trainer[torch.Tensor]:
        d = self.data
        return image_trainer(
            self.top,
            self.backbone.stages[-1],
            self.train_feats,
            d.train.labels,
            self.feats["val"],
            d.val.labels,
            self.recipe,
            self.recipe.epochs,
            views=self.views > 0,
        )

    def finish(self, result: FitResult) -> None:
        self.top.load_state_dict(result.best)
        self.best_val = max(h["val_accuracy"] for h in result.history)
        self.trunk, self.top = self.trunk.cpu(), self.top.cpu()
        if self.run.device.type != "cpu":
            # Evaluation and the parity reference come from the CPU, like the exported model's run.
            self.feats["test"] = run_trunk(self.trunk, self.x["test"], "trunk test (cpu)")
        del self.x["train"], self.x["val"]  # the largest arrays; export and parity need the test split only

    def baselines(self, result: FitResult) -> tuple[dict[str, dict[str, float]], list[str]]:
        if not self.recipe.baselines or self.cut >= self.backbone.feature_blocks:
            return {}, []  # --no-baselines, or the model already is a linear probe
        with timed("linear-probe baseline", self.run.timings):
            probe = self.linear_probe()
        baselines = {"linear-probe": probe}
        return baselines, negative_transfer_notes(self.best_val, baselines)

    def export_spec(self) -> ExportSpec:
        full = nn.Sequential(self.trunk, self.top).to(memory_format=torch.contiguous_format).eval()
        return ExportSpec(
            full,
            (torch.from_numpy(self.x["test"][:2]),),
            ["input"],
            ["logits"],
            {"input": {0: "batch"}, "logits": {0: "batch"}},
        )

    def contract(self) -> Contract:
        inputs = [TensorSpec(name="input", dtype="float32", shape=["batch", 3, self.spec.height, self.spec.width])]
        outputs = [TensorSpec(name="logits", dtype="float32", shape=["batch", len(self.data.labels)])]
        return Contract(inputs, outputs, self.spec, ClassificationPostprocessing())

    def parity(self, session: Any):
        self.test_logits = apply_in_batches(self.top, self.feats["test"]).numpy()
        onnx_logits = run_batched(lambda b: session.run(["logits"], {"input": b})[0], self.x["test"], 256, "onnx test")
        report = parity_report(self.test_logits, onnx_logits, tolerance=self.options.parity_tolerance)
        return report, parity_message(report)

    def evaluate(self, session: Any) -> Evaluation:
        d = self.data
        report = classification_report(d.test.labels, self.test_logits.argmax(1), d.labels)
        plot = plot_confusion(
            report.confusion,
            d.labels,
            self.run.staging.path("confusion_matrix.png"),
            f"{d.name} test: accuracy {report.accuracy:.4f}",
        )
        return Evaluation(
            values={**report.values(), "val_accuracy": round(self.best_val, 5)},
            samples=report.samples,
            summary=f"test accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f} on {report.samples} images",
            per_class=report.per_class,
            images=[plot.name],
            shifted=shifted_metrics(session, d.test, self.pre, d.labels),
        )

    def warmup(self, session: Any) -> WarmupSample:
        # A real test image in its own format (arrays as PNG); its served output is checked at every load.
        test = self.data.test
        name = "sample.png" if test.paths is None else "sample" + test.paths[0].suffix.lower()
        sample = test.encoded(0)
        self.run.staging.path(name).write_bytes(sample)
        tensor, _ = self.pre.from_bytes(sample)
        expected = session.run(["logits"], {"input": tensor[None]})[0]
        return WarmupSample(file=name, expected=expected.tolist(), atol=1e-3)

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return dict(self.backbone.model.state_dict()), {"backbone": self.backbone.name}

    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone.name, "auto_sweep": self.sweep, "augment_views": self.views}

    # ---- measured choices and baselines ---------------------------------------------------------
    def auto_sweep(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Try each freeze depth on a small budget; pick the best validation accuracy.

        The frozen prefix is shared: its output is computed once at the shallowest cut, and each
        deeper candidate runs only its extra frozen blocks over that cache. Ties go to the cheaper
        candidate (fewer trainable layers), which comes first in the list.
        """
        r, seed, device, d = self.recipe, self.options.seed, self.run.device, self.data
        xt, yt = _sample(self.x["train"], d.train.labels, r.auto_train_size, seed + 7)
        xv, yv = _sample(self.x["val"], d.val.labels, r.auto_val_size, seed + 8)
        probe, _ = make_backbone(self.backbone_name, d.labels, self.run.init)
        cuts = {(s, b): frozen_prefix(s, probe.feature_blocks, b) for s, b in AUTO_CANDIDATES}
        c0 = min(cuts.values())
        base = nn.Sequential(*probe.stages[:c0]).to(device, memory_format=torch.channels_last)
        base_train, base_val = run_trunk(base, xt, "auto trunk train"), run_trunk(base, xv, "auto trunk val")
        results = []
        for (strategy, blocks), cut in cuts.items():
            torch.manual_seed(seed)
            backbone, _ = make_backbone(self.backbone_name, d.labels, self.run.init)
            start = time.perf_counter()
            extra = nn.Sequential(*backbone.stages[c0:cut]).to(device, memory_format=torch.channels_last)
            ft, fv = (apply_in_batches(extra, f) if cut > c0 else f for f in (base_train, base_val))
            top = nn.Sequential(*backbone.stages[cut:]).to(device, memory_format=torch.channels_last)
            trainer = image_trainer(top, backbone.stages[-1], ft, yt, fv, yv, r, r.auto_epochs)
            history = fit(
                trainer, epochs=r.auto_epochs, patience=99, seed=seed, label=f"auto {strategy}/{blocks}"
            ).history
            row = {
                "strategy": strategy,
                "trainable_blocks": blocks,
                "frozen_stages": cut,
                "val_accuracy": round(max(h["val_accuracy"] for h in history), 5),
                "seconds": round(time.perf_counter() - start, 1),
            }
            log(
                f"auto: {strategy} (last {blocks} blocks) -> val accuracy {row['val_accuracy']:.4f} "
                f"in {row['seconds']} s"
            )
            results.append(row)
        best = max(results, key=lambda row: row["val_accuracy"])  # first max wins: cheaper on ties
        return {"strategy": best["strategy"], "trainable_blocks": best["trainable_blocks"]}, results

    def linear_probe(self) -> dict[str, float]:
        """The linear-probe baseline (frozen pretrained features + a new head), from the fitted cache.

        The fitted trunk is still the untouched pretrained prefix, so only the remaining pretrained
        feature blocks run over the cache before a head is trained with the same budget.
        """
        d, device = self.data, self.run.device
        torch.manual_seed(self.options.seed)
        fresh, _ = make_backbone(self.backbone_name, d.labels, self.run.init)
        rest = nn.Sequential(*fresh.stages[self.cut : fresh.feature_blocks]).to(
            device, memory_format=torch.channels_last
        )
        head = nn.Sequential(*fresh.stages[fresh.feature_blocks :]).to(device)
        train = self.train_feats.flatten(0, 1) if self.views else self.train_feats  # the same views as the model
        p_train = apply_in_batches(rest, train)
        p_train = p_train.unflatten(0, self.train_feats.shape[:2]) if self.views else p_train
        p_val = apply_in_batches(rest, self.feats["val"])
        r = self.recipe
        trainer = image_trainer(
            head, fresh.stages[-1], p_train, d.train.labels, p_val, d.val.labels, r, r.epochs, views=self.views > 0
        )
        result = fit(
            trainer,
            epochs=self.recipe.epochs,
            patience=self.recipe.patience,
            seed=self.options.seed,
            label="linear probe",
        )
        head.load_state_dict(result.best)
        out = {"val_accuracy": round(max(h["val_accuracy"] for h in result.history), 5)}
        test_logits = apply_in_batches(head, apply_in_batches(rest, self.feats["test"]))
        out["accuracy"] = round(accuracy(test_logits, d.test.labels), 5)
        return out


def _sample(x: np.ndarray, y: np.ndarray, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified sample of at most `budget` items."""
    if budget >= len(y):
        return x, y
    keep = stratified_split(y, len(y) - budget, seed)[0]
    return x[keep], y[keep]


TASK = ImageClassification
