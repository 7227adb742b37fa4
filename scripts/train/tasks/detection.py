"""Fine-tune an object detector on ImageNet MobileNetV2 features; evaluate, export, check parity.

    python -m scripts.finetune object-detection --quick
    python -m scripts.finetune object-detection --data my_coco/            # train.json [+ val/test]
    python -m scripts.finetune object-detection --data my_coco/instances.json --init-from object-detection

No pretrained detector ships offline, so the transfer is from the ImageNet MobileNetV2 backbone
(packaged weights) into a small anchor-free detector (`scripts/train/nets/detector.py` explains the
choice: one FCOS-style level at stride 8 behind a lite FPN, cheap enough to train on 2 CPU cores,
where Faster R-CNN + FPN takes ~13 s a step). `--init-from` starts from an earlier detector
artifact instead (its `checkpoint.safetensors`): every weight is reused, and when the classes
differ the class layer is re-initialised, keeping the rows of classes both share.

Speed comes from the frozen-trunk cache, as in image classification: the frozen first blocks
run once over every image, their outputs (and the stride-8 tap) are kept in float16, and
training runs only the trainable blocks, the neck and the head. Training targets (which
location answers for which box) are fixed per image, so they are computed once too.

Augmentation (`--augment none|light|strong`, recipe field `augment`) fits that cache: each
training image is cached as several views (`scripts/train/augment_boxes.py`: view 0 the image
itself, the others flipped, zoomed in or out, colour-jittered, greyed, blurred, JPEG-re-encoded,
their boxes moved with the pixels), and every epoch takes one view of each image at random. An
epoch has as many steps as without augmentation, so the cost is the trunk and the targets over
the extra views, measured and written in the training notes.

Images reach the network through `models.preprocess.ImagePreprocessor` with `letterbox`
resizing (aspect kept, grey padding), the exact path the service runs; ground-truth boxes are
mapped into model-input pixels with the same `Geometry`, and predictions are mapped back with
`Geometry.to_original` before COCO evaluation against the original annotations.

NMS runs in the service (numpy, `models.detection`), not in the graph: the graph stays a
fixed-shape dense network (boxes and per-class scores for every location) that exports with a
dynamic batch axis and compares cleanly against PyTorch, and the score threshold and
`max_detections` are per-request options anyway. Torch and ONNX Runtime are compared twice: on
the raw outputs, and on the final detections (same labels, boxes within 1 pixel).

Test metrics (mAP@[.5:.95], mAP@0.5, per-class AP; faster-coco-eval) are measured on the
exported ONNX model through the serving postprocessing: they are the numbers the service gives.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from models.manifest import (
    DetectionPostprocessing,
    ImagePreprocessing,
    ParityReport,
    TensorSpec,
    WarmupSample,
)
from models.preprocess import ImagePreprocessor
from models.recipes import DetectionRecipe

from ..augment import policy
from ..augment_boxes import views
from ..console import log, timed
from ..data.coco import DetectionDataset, DetectionSplit, load_coco, load_detection_data
from ..detection_eval import (
    above,
    as_predictions,
    at_threshold,
    onnx_predict,
    parity_check,
    pick_warmup,
    shifted_metrics,
    split_report,
)
from ..device import describe_device, module_device
from ..fit import FitResult, Trainer, best_row, frozen_prefix
from ..metrics import coco_evaluate, pick_score_threshold
from ..nets.detector import (
    CHECKPOINT_KEY,
    N_BLOCKS,
    build_detector,
    detection_loss,
    forward_cached,
    predict_cached,
    prepare,
    trunk_runner,
)
from ..report import draw_predictions
from ..task import Contract, DataSummary, Evaluation, ExportSpec, Network, Task

EVAL_SCORE_THRESHOLD = 0.05  # COCO evaluation wants the low-confidence tail too


def demo_data_root() -> Path:
    """Where the generated demo dataset is cached: $GRAFT_DATA_DIR, else data/ in the repository."""
    import os

    return Path(os.environ.get("GRAFT_DATA_DIR") or Path(__file__).resolve().parents[3] / "data")


class ObjectDetection(Task[DetectionRecipe]):
    name = "object-detection"
    select = "val_map"  # mAP@[.5:.95]: mAP@0.5 saturates early on easy data while boxes keep improving

    def load_data(self) -> DataSummary:
        r, o = self.recipe, self.options
        if o.data:
            try:
                data = load_detection_data(o.data, o.seed, r.train_limit)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"--data {o.data}: cannot load a COCO dataset: {e}") from e
        else:
            data = self._demo_data()
        self.data: DetectionDataset = data
        self.shifted: DetectionSplit | None = None
        if not o.data:  # the demo data's shifted split, for evaluation only
            self.shifted = load_coco(self.folder / "shifted.json", "shifted")[1]
        splits = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
        objects = f"objects train {data.train.objects}, val {data.val.objects}, test {data.test.objects}"
        return DataSummary(data.name, data.labels, splits, data.sha256, data.description, f"{data.labels}; {objects}")

    def _demo_data(self) -> DetectionDataset:
        from ..data.detection_demo import DemoSpec, ensure_demo_data

        spec = DemoSpec(**self.recipe.demo_data.as_config())
        try:
            with timed("demo data", self.run.timings):
                self.folder = ensure_demo_data(demo_data_root(), spec)
        except FileNotFoundError as e:  # Fashion-MNIST, whose items the scenes are made of
            raise SystemExit(f"detection demo data: {e}") from e
        data = load_detection_data(self.folder, self.options.seed, self.recipe.train_limit)
        data.name = "graft-detection-demo"
        lo, hi = spec.train_style.item_fraction
        data.description = (
            f"generated by scripts/train/data/detection_demo.py (seed {spec.seed}, key {spec.key()}): Fashion-MNIST "
            f"items ({', '.join(data.labels)}) pasted on real photos, train/val items at {lo:.0%}-{hi:.0%} of the "
            f"shorter side, {spec.train_style.untinted:.0%} of them untinted; test items and two backgrounds unseen in "
            "training; a shifted split (untinted items, wider scales, unseen backgrounds and textures) for evaluation "
            "only"
        )
        return data

    def build(self) -> Network:
        r, run = self.recipe, self.run
        if r.strategy == "auto":
            run.notes.append(f"--strategy auto: partial (the last {r.trainable_blocks} backbone blocks train)")
            self.recipe = r = replace(r, strategy="partial")
        self.model, base_model, notes = build_detector(r, self.data.labels, run.init)
        parent = json.loads(run.init.metadata[CHECKPOINT_KEY])["labels"] if run.init else self.data.labels
        self.classes_changed = parent != self.data.labels
        if run.init is not None:
            run.notes.append(
                f"the carried-over neck and head train at lr {r.lr} (the class layer at "
                f"{r.head_lr if self.classes_changed else r.lr}), not at head_lr {r.head_lr}, the rate for new layers"
            )
        for note in notes:
            log(note)
        run.notes.extend(notes)
        self.spec = ImagePreprocessing(height=self.model.cfg.height, width=self.model.cfg.width, resize="letterbox")
        self.pre = ImagePreprocessor(self.spec)
        self.cut = frozen_prefix(r.strategy, N_BLOCKS, r.trainable_blocks)
        for i, block in enumerate(self.model.blocks):
            for p in block.parameters():
                p.requires_grad_(i >= self.cut)
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        level, n_views = r.augment, views(r.augment)
        with timed("preprocess + frozen trunk", run.timings), tempfile.TemporaryDirectory() as tmp:
            trunk = trunk_runner(self.model, self.cut, run.threads, Path(tmp)) if self.cut > 0 else None
            cpu = time.process_time()
            self.train_prep = prepare(
                self.data.train, self.pre, self.model, self.cut, trunk, "trunk train", targets=True,
                views=n_views, policy=policy(level), seed=self.options.seed,
            )  # fmt: skip
            cpu = time.process_time() - cpu
            self.val_prep = prepare(self.data.val, self.pre, self.model, self.cut, trunk, "trunk val", targets=False)
        run.notes.append(
            f"augmentation {level}: "
            + (
                f"{n_views} cached views of each training image (the image and {n_views - 1} augmented: "
                f"{policy(level).describe()}), one drawn per image each epoch; caching them took {cpu:.1f} "
                f"CPU-s ({cpu / n_views:.1f} CPU-s a view)"
                if n_views > 1
                else f"1 view of each training image (the image itself); caching it took {cpu:.1f} CPU-s"
            )
        )
        log(run.notes[-1])
        c = self.model.cfg
        return Network(
            base_model=base_model,
            strategy=r.strategy,
            frozen_layers=[f"features.{i}" for i in range(self.cut)],
            trainable_params=trainable,
            total_params=total,
            summary=f"detector {c.width}x{c.height} letterbox: strategy {r.strategy}, {self.cut} frozen MobileNetV2 "
            f"block(s), {trainable:,} of {total:,} parameters trainable, training on {describe_device(run.device)} "
            f"(frozen trunk: ONNX Runtime, {run.threads} CPU thread(s))",
        )

    def trainer(self) -> Trainer[torch.Tensor]:
        """AdamW + one-cycle on cached features; backbone BatchNorm statistics stay frozen."""
        r, model, cut, prep = self.recipe, self.model.to(self.run.device), self.cut, self.train_prep
        backbone = [p for b in model.blocks[cut:] for p in b.parameters() if p.requires_grad]
        new = [p for m in (model.neck, model.head) for p in m.parameters()]
        # Backbone group first: gradient clipping then sums the norms in the module's own order.
        groups = ([{"params": backbone, "lr": r.lr}] if backbone else []) + [{"params": new, "lr": r.head_lr}]
        if self.run.init is not None:
            # Continuing from a detector, the neck and head are trained already: at head_lr (the
            # rate for new layers) the first steps undid that (a 3-class fine-tune of the demo
            # detector fell from test mAP@0.5 0.89 to 0.23), so they train at lr, and the class
            # layer at head_lr only when the classes changed.
            cls = {id(p) for p in model.head.cls_out.parameters()}
            groups[-1:] = [
                {"params": [p for p in new if id(p) not in cls], "lr": r.lr},
                {"params": [p for p in new if id(p) in cls], "lr": r.head_lr if self.classes_changed else r.lr},
            ]
        opt = torch.optim.AdamW(groups, weight_decay=r.weight_decay)
        n, n_views = len(prep.geometries) // prep.views, prep.views
        bs = min(r.batch_size, n)
        steps = max(1, n // bs)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in groups], total_steps=r.epochs * steps, pct_start=0.1, div_factor=20.0
        )
        device = module_device(model)
        assert prep.cls_t is not None and prep.box_t is not None

        def batches(streams) -> list[torch.Tensor]:
            perm = torch.randperm(n, generator=streams.torch)
            if n_views > 1:  # one view of each image: item i * views + v
                perm = perm * n_views + torch.randint(n_views, (n,), generator=streams.torch)
            return [perm[s * bs : (s + 1) * bs] for s in range(steps)]

        def loss(idx: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
            cls, box, ctr = forward_cached(model, prep, idx, cut)
            total, parts = detection_loss(model, cls, box, ctr, prep.cls_t[idx].to(device), prep.box_t[idx].to(device))
            return total, len(idx), {f"loss_{k}": v for k, v in parts.items()}

        def train_mode() -> None:
            model.train()
            for block in model.blocks:  # small batches: keep the ImageNet BatchNorm statistics
                block.eval()

        def validate() -> dict[str, float]:
            dets = predict_cached(model, self.val_prep, cut, self.post(EVAL_SCORE_THRESHOLD))
            report = coco_evaluate(self.data.val, self.data.labels, as_predictions(dets))
            return {"val_map50": report.map50, "val_map": report.map}

        return Trainer(model, opt, sched, batches, loss, validate, self.select, clip=10.0, train_mode=train_mode)

    def post(self, threshold: float) -> dict[str, Any]:
        return {"score_threshold": threshold, "nms_iou": self.recipe.nms_iou, "max_detections": 100}

    def finish(self, result: FitResult) -> None:
        # Threshold choice, export, evaluation and parity run on the CPU, like the exported model.
        self.model.cpu().load_state_dict(result.best)
        self.model.eval()
        self.best = best_row(result.history, self.select)
        val_dets = predict_cached(self.model, self.val_prep, self.cut, self.post(EVAL_SCORE_THRESHOLD))
        self.threshold, self.val_f1 = pick_score_threshold(val_dets, self.data.val)
        log(
            f"best epoch {int(self.best['epoch'])}: val mAP {self.best['val_map']:.4f}, mAP@0.5 "
            f"{self.best['val_map50']:.4f}; served score threshold {self.threshold:.2f} (val F1 {self.val_f1:.3f})"
        )
        del self.train_prep, self.val_prep

    def export_spec(self) -> ExportSpec:
        example = torch.zeros(2, 3, self.spec.height, self.spec.width)
        axes = {"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}}
        return ExportSpec(self.model.eval(), (example,), ["images"], ["boxes", "scores"], axes)

    def contract(self) -> Contract:
        gh, gw = self.model.cfg.grid()
        s = self.spec
        return Contract(
            inputs=[TensorSpec(name="images", dtype="float32", shape=["batch", 3, s.height, s.width])],
            outputs=[
                TensorSpec(name="boxes", dtype="float32", shape=["batch", gh * gw, 4]),
                TensorSpec(name="scores", dtype="float32", shape=["batch", gh * gw, len(self.data.labels)]),
            ],
            preprocessing=s,
            postprocessing=DetectionPostprocessing(
                score_threshold=self.threshold, nms_iou=self.recipe.nms_iou, max_detections=100, nms_in_graph=False
            ),
        )

    def parity(self, session: Any) -> tuple[ParityReport, str]:
        split = self.data.test.subset(range(min(len(self.data.test), self.recipe.parity_images)))
        p = parity_check(self.model, session, split, self.pre, self.post(self.threshold), self.options.parity_tolerance)
        return p, (
            f"max |torch - onnx| score {p.max_abs_diff:.3g} (tolerance {p.tolerance:g}); {p.label_agreement:.2%} of "
            f"{int(p.extra['detections_compared'])} detections found again with the same label, boxes within "
            f"{p.extra['max_box_diff_px']:.3g} px"
        )

    def evaluate(self, session: Any) -> Evaluation:
        d, thr = self.data, self.threshold
        dets = onnx_predict(session, d.test, self.pre, self.post(EVAL_SCORE_THRESHOLD), "onnx test")
        report, values = split_report(dets, d.test, d.labels, thr)
        plot = draw_predictions(d.test, above(dets, thr), d.labels, self.run.staging.path("predictions.png"))
        at = f"{at_threshold(values)} at the served threshold {thr:.2f}"
        notes = [
            "COCO bbox evaluation (faster-coco-eval) of the exported ONNX model through the serving "
            f"postprocessing, score threshold {EVAL_SCORE_THRESHOLD}, {report.objects} objects",
            f"served default score threshold {thr:.2f}: best F1 on validation ({self.val_f1:.3f}); test: {at}",
        ]
        summary = f"test mAP@0.5 {report.map50:.4f}, mAP@[.5:.95] {report.map:.4f}, {at} on {report.images} images"
        shifted = None
        if self.shifted is not None:
            shifted = shifted_metrics(
                session, self.shifted, d.labels, self.pre, self.post(EVAL_SCORE_THRESHOLD), thr,
                "generated scenes training never saw: untinted (grey) items at 10-55% of the shorter side, on "
                "backgrounds and synthetic textures no training or validation scene uses",
            )  # fmt: skip
            v = shifted.values
            summary += f"; shifted mAP@0.5 {v['map50']:.4f}, mAP {v['map']:.4f}, {at_threshold(v)}"
            notes.append(
                f"shifted split ({shifted.samples} images, {self.shifted.objects} objects): mAP@0.5 "
                f"{v['map50']:.4f}; {at_threshold(v)} at the served threshold"
            )
        return Evaluation(
            values={
                **values,
                "val_map50": round(self.best["val_map50"], 5),
                "val_map": round(self.best["val_map"], 5),
                "val_f1_at_threshold": round(self.val_f1, 5),
            },
            samples=report.images,
            summary=summary,
            per_class=report.per_class,
            notes=notes,
            images=[plot.name],
            shifted=shifted,
        )

    def warmup(self, session: Any) -> WarmupSample:
        # A real test image; its final detections are recorded and re-checked at every load.
        test = self.data.test
        dets = onnx_predict(session, test.subset(range(min(len(test), 16))), self.pre, self.post(self.threshold), "")
        w = pick_warmup(dets, self.threshold)
        source = test.images[w].path
        name = "sample" + source.suffix.lower()
        self.run.staging.path(name).write_bytes(source.read_bytes())
        return WarmupSample(file=name, expected=dets[w].as_rows().tolist(), atol=1e-2)

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = {
            "labels": self.data.labels,
            "config": asdict(self.model.cfg),
            "backbone": "mobilenet_v2",
            "cut": self.cut,
        }
        return dict(self.model.state_dict()), {CHECKPOINT_KEY: json.dumps(meta)}

    def config(self) -> dict[str, Any]:
        return {
            "backbone": "mobilenet_v2",
            "architecture": "MobileNetV2 taps 6/13/17 + lite FPN + FCOS-style head at stride 8",
            "detector": asdict(self.model.cfg),
        }


TASK = ObjectDetection
