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
location answers for which box) are fixed per image, so they are computed once too. The cost is
no data augmentation; the demo data is generated, so more scenes are the augmentation.

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
import math
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.detection import Detections, postprocess
from models.manifest import (
    DetectionPostprocessing,
    ImagePreprocessing,
    ParityReport,
    TensorSpec,
    WarmupSample,
)
from models.preprocess import DecodeLimits, ImagePreprocessor, decode_image
from models.recipes import DetectionRecipe

from ..console import log, progress, timed
from ..data.coco import DetectionDataset, DetectionSplit, load_detection_data
from ..device import describe_device, module_device
from ..fit import FitResult, Trainer, best_row, frozen_prefix
from ..metrics import coco_evaluate, compare_detections, pick_score_threshold
from ..nets.detector import (
    CHECKPOINT_KEY,
    N_BLOCKS,
    Detector,
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


def as_predictions(dets: list[Detections]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(boxes, scores, classes) per image, as coco_evaluate takes them."""
    return [(d.boxes, d.scores, d.classes) for d in dets]


def onnx_predict(
    sess: Any, split: DetectionSplit, pre: ImagePreprocessor, post: dict[str, Any], desc: str
) -> list[Detections]:
    """The serving path over a split: decode, letterbox, ONNX Runtime, models.detection."""
    limits = DecodeLimits()
    out: list[Detections] = []
    batch = 32
    for start in progress(range(0, len(split), batch), desc, total=math.ceil(len(split) / batch), unit="batch"):
        pairs = [pre(decode_image(im.path.read_bytes(), limits)) for im in split.images[start : start + batch]]
        boxes, scores = sess.run(["boxes", "scores"], {"images": np.stack([t for t, _ in pairs])})
        for j, (_, g) in enumerate(pairs):
            out.append(postprocess(boxes[j], scores[j], geometry=g, **post))
    return out


def parity_check(
    model: Detector, sess: Any, split: DetectionSplit, pre: ImagePreprocessor, post: dict[str, Any], tolerance: float
) -> ParityReport:
    """Torch vs ONNX Runtime on held-out images: raw outputs and final detections."""
    limits = DecodeLimits()
    model.eval()
    max_score, max_box_rel, matched, total, worst_px = 0.0, 0.0, 0, 0, 0.0
    for start in range(0, len(split), 16):
        pairs = [pre(decode_image(im.path.read_bytes(), limits)) for im in split.images[start : start + 16]]
        x = np.stack([t for t, _ in pairs])
        with torch.no_grad():
            t_boxes, t_scores = (v.numpy() for v in model(torch.from_numpy(x)))
        o_boxes, o_scores = sess.run(["boxes", "scores"], {"images": x})
        max_score = max(max_score, float(np.abs(t_scores - o_scores).max()))
        # Boxes are in pixels: compare them relative to the input size.
        max_box_rel = max(max_box_rel, float(np.abs(t_boxes - o_boxes).max()) / max(pre.size))
        for j, (_, g) in enumerate(pairs):
            a = postprocess(t_boxes[j], t_scores[j], geometry=g, **post)
            b = postprocess(o_boxes[j], o_scores[j], geometry=g, **post)
            near = np.abs(a.scores - post["score_threshold"]) <= tolerance
            a = Detections(a.boxes[~near], a.scores[~near], a.classes[~near])
            m, t, w = compare_detections(a, b, tolerance)
            matched, total, worst_px = matched + m, total + t, max(worst_px, w)
    agreement = matched / total if total else 1.0
    passed = bool(max_score <= tolerance and agreement >= 0.99 and worst_px <= 1.0)
    return ParityReport(
        samples=len(split),
        max_abs_diff=max_score,
        label_agreement=agreement,
        tolerance=tolerance,
        passed=passed,
        extra={
            "detections_compared": float(total),
            "max_box_diff_px": worst_px,
            "max_raw_box_diff_rel": max_box_rel,
        },
    )


def pick_warmup(dets: list[Detections], threshold: float) -> int:
    """A test image whose detections are far from every decision boundary (a robust load check)."""
    for i, d in enumerate(dets):
        if len(d) and np.all(np.abs(d.scores - threshold) > 0.05):
            return i
    return 0


def above(dets: list[Detections], threshold: float) -> list[Detections]:
    """Detections above the served threshold (what a client sees by default)."""
    out = []
    for d in dets:
        k = d.scores > threshold
        out.append(Detections(d.boxes[k], d.scores[k], d.classes[k]))
    return out


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
        splits = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
        objects = f"objects train {data.train.objects}, val {data.val.objects}, test {data.test.objects}"
        return DataSummary(data.name, data.labels, splits, data.sha256, data.description, f"{data.labels}; {objects}")

    def _demo_data(self) -> DetectionDataset:
        from ..data.detection_demo import DemoSpec, ensure_demo_data

        spec = DemoSpec(**self.recipe.demo_data.as_config())
        try:
            with timed("demo data", self.run.timings):
                folder = ensure_demo_data(demo_data_root(), spec)
        except FileNotFoundError as e:  # Fashion-MNIST, whose items the scenes are made of
            raise SystemExit(f"detection demo data: {e}") from e
        data = load_detection_data(folder, self.options.seed, self.recipe.train_limit)
        data.name = "graft-detection-demo"
        data.description = (
            f"generated by scripts/train/data/detection_demo.py (seed {spec.seed}, key {spec.key()}): Fashion-MNIST "
            f"items ({', '.join(data.labels)}) pasted on real photos; test items and two backgrounds unseen in training"
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
        with timed("preprocess + frozen trunk", run.timings), tempfile.TemporaryDirectory() as tmp:
            trunk = trunk_runner(self.model, self.cut, run.threads, Path(tmp)) if self.cut > 0 else None
            self.train_prep = prepare(
                self.data.train, self.pre, self.model, self.cut, trunk, "trunk train", targets=True
            )
            self.val_prep = prepare(self.data.val, self.pre, self.model, self.cut, trunk, "trunk val", targets=False)
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
        n = len(prep.geometries)
        bs = min(r.batch_size, n)
        steps = max(1, n // bs)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in groups], total_steps=r.epochs * steps, pct_start=0.1, div_factor=20.0
        )
        device = module_device(model)
        assert prep.cls_t is not None and prep.box_t is not None

        def batches(streams) -> list[torch.Tensor]:
            perm = torch.randperm(n, generator=streams.torch)
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
        d = self.data
        dets = onnx_predict(session, d.test, self.pre, self.post(EVAL_SCORE_THRESHOLD), "onnx test")
        report = coco_evaluate(d.test, d.labels, as_predictions(dets))
        plot = draw_predictions(d.test, above(dets, self.threshold), d.labels, self.run.staging.path("predictions.png"))
        return Evaluation(
            values={
                **report.values(),
                "val_map50": round(self.best["val_map50"], 5),
                "val_map": round(self.best["val_map"], 5),
                "val_f1_at_threshold": round(self.val_f1, 5),
            },
            samples=report.images,
            summary=f"test mAP@0.5 {report.map50:.4f}, mAP@[.5:.95] {report.map:.4f} on {report.images} images "
            f"({report.objects} objects)",
            per_class=report.per_class,
            notes=[
                "COCO bbox evaluation (faster-coco-eval) of the exported ONNX model through the serving "
                f"postprocessing, score threshold {EVAL_SCORE_THRESHOLD}, {report.objects} objects",
                f"served default score threshold {self.threshold:.2f}: best F1 on validation",
            ],
            images=[plot.name],
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
