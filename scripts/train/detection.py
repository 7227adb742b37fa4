"""Fine-tune an object detector on ImageNet MobileNetV2 features; evaluate, export, check parity.

    python -m scripts.finetune object-detection --quick
    python -m scripts.finetune object-detection --data my_coco/            # train.json [+ val/test]
    python -m scripts.finetune object-detection --data my_coco/instances.json --init-from object-detection

No pretrained detector ships offline, so the transfer is from the ImageNet MobileNetV2 backbone
(packaged weights) into a small anchor-free detector (`scripts/train/detector.py` explains the
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

import copy
import json
import math
import os
import tempfile
import time
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from torch import nn

from models.artifact import load_artifact
from models.detection import Detections, box_iou, postprocess
from models.errors import ArtifactError, ParityError
from models.manifest import (
    DatasetInfo,
    DetectionPostprocessing,
    ExportInfo,
    ImagePreprocessing,
    Manifest,
    Metrics,
    ParityReport,
    TensorSpec,
    TrainingInfo,
    WarmupSample,
)
from models.preprocess import DecodeLimits, Geometry, ImagePreprocessor, decode_image

from .backbones import load_image_backbone
from .common import (
    Staging,
    configure_threads,
    describe_device,
    export_onnx,
    log,
    module_device,
    ort_session,
    pick_device,
    plot_history,
    progress,
    set_seed,
    small_data_schedule,
    timed,
    write_model_card,
)
from .detection_data import CocoReport, DetectionDataset, DetectionSplit, coco_evaluate, load_detection_data
from .detector import N_BLOCKS, TAPS, Detector, DetectorConfig, assign_targets, detection_loss

CHECKPOINT = "checkpoint.safetensors"
EVAL_SCORE_THRESHOLD = 0.05  # COCO evaluation wants the low-confidence tail too
STRATEGIES = ("feature-extraction", "partial", "full")


def input_size(image_size: int) -> tuple[int, int]:
    """(height, width) of the model input: `image_size` wide, 4:5 as tall, both multiples of 32."""
    if image_size < 64 or image_size % 32:
        raise SystemExit(f"--image-size {image_size}: object-detection needs a multiple of 32, at least 64")
    return max(32, (image_size * 4 // 5) // 32 * 32), image_size


# ---- data ------------------------------------------------------------------------------------
def demo_data_root() -> Path:
    """Where the generated demo dataset is cached: $GRAFT_DATA_DIR, else data/ in the repository."""
    return Path(os.environ.get("GRAFT_DATA_DIR") or Path(__file__).resolve().parents[2] / "data")


def load_data(args: Namespace, cfg: dict[str, Any]) -> DetectionDataset:
    """`--data` (COCO, see detection_data), or the generated demo dataset of the recipe."""
    if args.data:
        try:
            return load_detection_data(Path(args.data), cfg["seed"], cfg["train_limit"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--data {args.data}: cannot load a COCO dataset: {e}") from e
    from scripts.make_detection_data import DemoSpec, ensure_demo_data

    spec = DemoSpec(**cfg["demo_data"])
    with timed("demo data"):
        folder = ensure_demo_data(demo_data_root(), spec)
    data = load_detection_data(folder, cfg["seed"], cfg["train_limit"])
    data.name = "graft-detection-demo"
    data.description = (
        f"generated by scripts/make_detection_data.py (seed {spec.seed}, key {spec.key()}): Fashion-MNIST "
        f"items ({', '.join(data.labels)}) pasted on real photos; test items and two backgrounds unseen in training"
    )
    return data


@dataclass
class Prepared:
    """One split run through the serving preprocessing and the frozen trunk."""

    cache: dict[int, torch.Tensor]  # block index -> float16 activations (cut-1: trunk output)
    geometries: list[Geometry]
    cls_t: torch.Tensor | None = None  # (N, L) int64 class per location or -1
    box_t: torch.Tensor | None = None  # (N, L, 4) float32 target boxes, model-input pixels


def read_image(path: Path, limits: DecodeLimits):
    """Decode a dataset image exactly as the service decodes an upload (no JPEG draft)."""
    return decode_image(path.read_bytes(), limits)


def to_input_boxes(boxes: np.ndarray, g: Geometry) -> np.ndarray:
    """Original-pixel xyxy boxes into model-input pixels (the inverse of Geometry.to_original)."""
    out = boxes.astype(np.float32).copy()
    out[:, [0, 2]] = out[:, [0, 2]] * g.scale_x + g.pad_x
    out[:, [1, 3]] = out[:, [1, 3]] * g.scale_y + g.pad_y
    return out


class Trunk(nn.Module):
    """The frozen blocks 0..cut-1, returning the activations the trainable part needs."""

    def __init__(self, model: Detector, cut: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(model.blocks[:cut])
        self.keep = sorted({i for i in TAPS if i < cut} | {cut - 1})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.keep:
                out.append(x)
        return tuple(out)


def trunk_runner(model: Detector, cut: int, threads: int, workdir: Path):
    """The frozen trunk as an ONNX Runtime session: about 4x faster than PyTorch eager on CPU
    (measured here: 0.84 vs 3.6 CPU-seconds for 32 images at 320x256). The cache only feeds
    training, so the tiny float differences from PyTorch do not matter."""
    trunk = Trunk(model, cut).eval()
    path = workdir / "trunk.onnx"
    names = [f"block{i}" for i in trunk.keep]
    with torch.no_grad():
        torch.onnx.export(
            trunk,
            (torch.zeros(1, 3, model.cfg.height, model.cfg.width),),
            str(path),
            input_names=["images"],
            output_names=names,
            dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            opset_version=17,
            dynamo=False,
        )
    sess = ort_session(path, threads)

    def run(x: np.ndarray) -> dict[int, np.ndarray]:
        return dict(zip(trunk.keep, sess.run(names, {"images": x}), strict=True))

    return run


def prepare(
    split: DetectionSplit,
    pre: ImagePreprocessor,
    model: Detector,
    cut: int,
    trunk: Any,
    desc: str,
    *,
    targets: bool,
) -> Prepared:
    """Preprocess every image, run the frozen blocks once, keep what the trainable part needs."""
    limits = DecodeLimits()
    chunks: dict[int, list[torch.Tensor]] = {}
    geometries: list[Geometry] = []
    cls_ts, box_ts = [], []
    centres = model.centres.numpy()
    batch = 32
    for start in progress(range(0, len(split), batch), desc, total=math.ceil(len(split) / batch), unit="batch"):
        tensors = []
        for im in split.images[start : start + batch]:
            t, g = pre(read_image(im.path, limits))
            tensors.append(t)
            geometries.append(g)
            if targets:
                c, b = assign_targets(to_input_boxes(im.boxes, g), im.labels, centres)
                cls_ts.append(c)
                box_ts.append(b)
        x = np.stack(tensors)
        # cut == 0 (full fine-tuning): the cache is the input itself.
        acts = trunk(x) if cut > 0 else {-1: x}
        for i, a in acts.items():
            chunks.setdefault(i, []).append(torch.from_numpy(a).to(torch.float16))
    out = Prepared(cache={i: torch.cat(v) for i, v in chunks.items()}, geometries=geometries)
    if targets:
        out.cls_t = torch.from_numpy(np.stack(cls_ts))
        out.box_t = torch.from_numpy(np.stack(box_ts))
    return out


def forward_cached(model: Detector, prep: Prepared, idx: torch.Tensor | slice, cut: int):
    """Dense outputs for cached items: the trainable blocks, neck and head (where the model lives;
    the cache stays in host memory)."""
    device = module_device(model)
    taps = {i: prep.cache[i][idx].to(device).float() for i in TAPS if i < cut}
    x = prep.cache[cut - 1 if cut > 0 else -1][idx].to(device).float()
    return model.dense(model.run_blocks(x, cut, taps))


@torch.no_grad()
def predict_cached(model: Detector, prep: Prepared, cut: int, post: dict[str, Any]) -> list[Detections]:
    """Final detections (original pixels) for every cached item, through models.detection."""
    model.eval()
    out: list[Detections] = []
    n = len(prep.geometries)
    for start in range(0, n, 64):
        idx = slice(start, min(n, start + 64))
        cls, box, ctr = forward_cached(model, prep, idx, cut)
        scores = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(ctr)[..., None]).cpu().numpy()
        boxes = model.decode_boxes(box).cpu().numpy()
        for j in range(len(scores)):
            out.append(postprocess(boxes[j], scores[j], geometry=prep.geometries[start + j], **post))
    return out


def as_predictions(dets: list[Detections]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(d.boxes, d.scores, d.classes) for d in dets]


# ---- training --------------------------------------------------------------------------------
def set_train_mode(model: Detector, cut: int) -> None:
    """Neck and head train; backbone BatchNorm statistics stay frozen (small batches)."""
    model.train()
    for block in model.blocks:
        block.eval()


def train(
    model: Detector,
    train_prep: Prepared,
    val_prep: Prepared,
    val_split: DetectionSplit,
    labels: list[str],
    cut: int,
    cfg: dict[str, Any],
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor], dict[str, float]]:
    """AdamW + one-cycle on cached features; keeps the weights of the best validation epoch.

    "Best" is COCO mAP@[.5:.95]: mAP@0.5 saturates early on easy data while boxes keep improving.
    Returns (history, best weights, best epoch's history row).
    """
    backbone = [p for b in model.blocks[cut:] for p in b.parameters() if p.requires_grad]
    new = [p for m in (model.neck, model.head) for p in m.parameters()]
    groups = [{"params": new, "lr": cfg["head_lr"]}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg["lr"]})
    opt = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
    n = len(train_prep.geometries)
    bs = min(cfg["batch_size"], n)
    steps_per_epoch = max(1, n // bs)
    total_steps = cfg["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=total_steps, pct_start=0.1, div_factor=20.0
    )
    post = {"score_threshold": EVAL_SCORE_THRESHOLD, "nms_iou": cfg["nms_iou"], "max_detections": 100}
    gen = torch.Generator().manual_seed(cfg["seed"])  # on the CPU: the same shuffles on every device
    device = module_device(model)
    history: list[dict[str, float]] = []
    best_row: dict[str, float] = {"val_map": -1.0, "val_map50": 0.0}
    best_state, stale = copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, cfg["epochs"] + 1):
        set_train_mode(model, cut)
        perm = torch.randperm(n, generator=gen)
        sums = {"loss": 0.0, "cls": 0.0, "box": 0.0, "ctr": 0.0}
        bar = progress(range(steps_per_epoch), f"epoch {epoch}/{cfg['epochs']}", total=steps_per_epoch, unit="step")
        for step in bar:
            idx = perm[step * bs : (step + 1) * bs]
            cls, box, ctr = forward_cached(model, train_prep, idx, cut)
            assert train_prep.cls_t is not None and train_prep.box_t is not None
            cls_t, box_t = train_prep.cls_t[idx].to(device), train_prep.box_t[idx].to(device)
            loss, parts = detection_loss(model, cls, box, ctr, cls_t, box_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            sums["loss"] += float(loss.detach())
            for k, v in parts.items():
                sums[k] += v
        report = coco_evaluate(val_split, labels, as_predictions(predict_cached(model, val_prep, cut, post)))
        row = {
            "epoch": epoch,
            "train_loss": sums["loss"] / steps_per_epoch,
            "loss_cls": sums["cls"] / steps_per_epoch,
            "loss_box": sums["box"] / steps_per_epoch,
            "loss_ctr": sums["ctr"] / steps_per_epoch,
            "val_map50": report.map50,
            "val_map": report.map,
        }
        history.append(row)
        log(
            f"epoch {epoch}: loss {row['train_loss']:.4f} (cls {row['loss_cls']:.3f} box {row['loss_box']:.3f} "
            f"ctr {row['loss_ctr']:.3f}), val mAP@0.5 {report.map50:.4f}, mAP {report.map:.4f}"
        )
        if report.map > best_row["val_map"]:
            best_row, best_state, stale = row, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg["patience"]:
                log(f"early stop: no validation gain for {stale} epoch(s)")
                break
    return history, best_state, best_row


def pick_score_threshold(dets: list[Detections], split: DetectionSplit) -> tuple[float, float]:
    """The served default threshold: the one with the best F1 (IoU 0.5, same class) on validation."""
    best = (0.3, -1.0)
    for thr in np.round(np.arange(0.1, 0.81, 0.05), 2):
        tp = fp = 0
        for d, im in zip(dets, split.images, strict=True):
            matched = np.zeros(len(im.labels), dtype=bool)
            for b, s, c in zip(d.boxes, d.scores, d.classes, strict=True):
                if s < thr:
                    continue
                cand = np.flatnonzero((im.labels == c) & ~matched)
                if len(cand):
                    ious = box_iou(b, im.boxes[cand])
                    j = int(ious.argmax())
                    if ious[j] >= 0.5:
                        matched[cand[j]] = True
                        tp += 1
                        continue
                fp += 1
        fn = split.objects - tp
        f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        if f1 > best[1]:
            best = (float(thr), f1)
    return best


# ---- --init-from -----------------------------------------------------------------------------
def resolve_artifact(ref: str, registry: Path) -> Path:
    """`ref` as a folder, or NAME[/VERSION] in the registry (NAME alone: the version served)."""
    from models.servable import resolve_ref

    try:
        return resolve_ref(registry, ref)
    except ArtifactError as e:
        raise SystemExit(f"--init-from {ref}: {e}") from e


@dataclass
class InitCheckpoint:
    folder: Path
    ref: str
    labels: list[str]
    config: DetectorConfig
    state: dict[str, torch.Tensor]


def load_init(ref: str, registry: Path) -> InitCheckpoint:
    """A detector artifact's weights and architecture, verified against its manifest checksums."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = resolve_artifact(ref, registry)
    try:
        art = load_artifact(folder)
    except ArtifactError as e:
        raise SystemExit(f"--init-from {ref}: {e}") from e
    if art.manifest.task != "object-detection":
        raise SystemExit(f"--init-from {ref}: is a {art.manifest.task} artifact, not object-detection")
    if CHECKPOINT not in art.manifest.files:
        raise SystemExit(f"--init-from {ref}: the artifact has no {CHECKPOINT} (exported without weights)")
    path = art.file(CHECKPOINT)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["detector"])
    return InitCheckpoint(
        folder=folder,
        ref=f"{art.name}/{art.version}",
        labels=meta["labels"],
        config=DetectorConfig(**meta["config"]),
        state=load_file(str(path)),
    )


def build_model(
    args: Namespace, cfg: dict[str, Any], labels: list[str], init: InitCheckpoint | None
) -> tuple[Detector, Any, list[str]]:
    """The detector: ImageNet MobileNetV2 + fresh neck/head, or the --init-from detector's weights."""
    height, width = input_size(cfg["image_size"])
    neck_width, depth = cfg["neck_width"], cfg["tower_depth"]
    if init is not None:
        neck_width, depth = init.config.neck_width, init.config.tower_depth
    dcfg = DetectorConfig(num_classes=len(labels), height=height, width=width, neck_width=neck_width, tower_depth=depth)
    name = args.backbone or "mobilenet_v2"
    if name != "mobilenet_v2":
        raise SystemExit("object-detection supports --backbone mobilenet_v2 only (its taps are wired in)")
    notes: list[str] = []
    if init is None:
        # cfg["pretrained"] = False gives the no-transfer baseline (random-init backbone).
        backbone = load_image_backbone(name, 1000, pretrained=cfg.get("pretrained", True))
        model = Detector(backbone.stages[:N_BLOCKS], dcfg)
        return model, backbone.info, notes
    backbone = load_image_backbone(name, 1000, pretrained=False)
    model = Detector(backbone.stages[:N_BLOCKS], replace(init.config, num_classes=len(init.labels)))
    model.load_state_dict(init.state, strict=True)
    if init.labels != labels:
        keep = {i: init.labels.index(lab) for i, lab in enumerate(labels) if lab in init.labels}
        model.head.reset_classes(len(labels), keep)
        notes.append(
            f"init-from {init.ref}: classes changed ({init.labels} -> {labels}); class layer re-initialised, "
            f"{len(keep)} shared class row(s) carried over"
        )
    else:
        notes.append(f"init-from {init.ref}: same classes, every weight reused")
    model.cfg = dcfg
    from models.manifest import BaseModelInfo

    info = BaseModelInfo(
        id=f"graft/{init.ref}",
        source=f"--init-from {init.folder}",
        license="same as the parent artifact",
        architecture="mobilenet_v2 + lite FPN + FCOS-style head (stride 8)",
    )
    return model, info, notes


def replace(c: DetectorConfig, **kw: Any) -> DetectorConfig:
    return DetectorConfig(**{**asdict(c), **kw})


def trainable_cut(strategy: str, trainable_blocks: int) -> int:
    """Index of the first trainable MobileNetV2 block."""
    if strategy in ("partial", "auto"):
        return max(0, N_BLOCKS - trainable_blocks)
    if strategy == "feature-extraction":
        return N_BLOCKS
    if strategy == "full":
        return 0
    raise SystemExit(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


# ---- export, parity, plots -------------------------------------------------------------------
def compare_detections(ref: Detections, cand: Detections, score_tol: float) -> tuple[int, int, float]:
    """(matched, total, max box diff in pixels) of torch detections found again by ONNX Runtime.

    A torch detection whose score is within `score_tol` of the threshold may legitimately be
    missing on the other side, so it does not count.
    """
    matched, total, worst = 0, 0, 0.0
    used = np.zeros(len(cand), dtype=bool)
    for b, c in zip(ref.boxes, ref.classes, strict=True):
        total += 1
        same = np.flatnonzero((cand.classes == c) & ~used)
        if len(same):
            diff = np.abs(cand.boxes[same] - b).max(1)
            j = int(diff.argmin())
            if diff[j] <= 1.0:
                used[same[j]] = True
                matched += 1
                worst = max(worst, float(diff[j]))
    return matched, total, worst


def draw_predictions(
    split: DetectionSplit, dets: list[Detections], labels: list[str], path: Path, count: int = 6
) -> Path:
    """A grid of test images: ground truth in white, predictions in colour with label and score."""
    from PIL import Image, ImageDraw

    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
    tiles = []
    for im, d in list(zip(split.images, dets, strict=True))[:count]:
        img = read_image(im.path, DecodeLimits())
        draw = ImageDraw.Draw(img)
        for b in im.boxes:
            draw.rectangle([float(v) for v in b], outline=(255, 255, 255), width=1)
        for b, s, c in zip(d.boxes, d.scores, d.classes, strict=True):
            colour = palette[int(c) % len(palette)]
            draw.rectangle([float(v) for v in b], outline=colour, width=2)
            text = f"{labels[int(c)]} {s:.2f}"
            x, y = float(b[0]), max(0.0, float(b[1]) - 11)
            draw.rectangle(draw.textbbox((x, y), text), fill=(0, 0, 0))
            draw.text((x, y), text, fill=colour)
        tiles.append(img)
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    cols = 3
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (40, 40, 40))
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * cell_w, (k // cols) * cell_h))
    sheet.save(path)
    return path


def onnx_predict(
    sess: Any, split: DetectionSplit, pre: ImagePreprocessor, post: dict[str, Any], desc: str
) -> list[Detections]:
    """The serving path over a split: decode, letterbox, ONNX Runtime, models.detection."""
    limits = DecodeLimits()
    out: list[Detections] = []
    batch = 32
    for start in progress(range(0, len(split), batch), desc, total=math.ceil(len(split) / batch), unit="batch"):
        pairs = [pre(read_image(im.path, limits)) for im in split.images[start : start + batch]]
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
        pairs = [pre(read_image(im.path, limits)) for im in split.images[start : start + 16]]
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


def pick_warmup(dets: list[Detections], threshold: float, nms_iou: float) -> int:
    """A test image whose detections are far from every decision boundary (a robust load check)."""
    for i, d in enumerate(dets):
        if len(d) and np.all(np.abs(d.scores - threshold) > 0.05):
            return i
    return 0


# ---- the job ---------------------------------------------------------------------------------
def run(args: Namespace, cfg: dict[str, Any]) -> Path:
    """Train, evaluate, export and publish; returns the artifact folder."""
    started, cpu_started = time.perf_counter(), time.process_time()
    if args.quantize:
        raise SystemExit(
            "object-detection does not support --quantize yet: dynamic int8 makes MobileNetV2 5-13x slower "
            "on CPU (ASSETS.md) and static quantization is not calibrated for detection here"
        )
    threads = configure_threads()
    set_seed(cfg["seed"])  # first: it sets CUBLAS_WORKSPACE_CONFIG before CUDA starts
    device = pick_device(getattr(args, "device", "auto"))
    registry = Path(args.registry)
    init = load_init(args.init_from, registry) if args.init_from else None
    with timed("load data"):
        data = load_data(args, cfg)
    log(
        f"dataset {data.name}: {len(data.labels)} classes {data.labels}; images (objects) train "
        f"{len(data.train)} ({data.train.objects}), val {len(data.val)} ({data.val.objects}), "
        f"test {len(data.test)} ({data.test.objects})"
    )
    cfg, schedule_note = small_data_schedule(cfg, len(data.train), epochs_given=args.epochs is not None)
    if schedule_note:
        log(schedule_note)
    model, base_info, notes = build_model(args, cfg, data.labels, init)
    if schedule_note:
        notes.append(schedule_note)
    spec = ImagePreprocessing(height=model.cfg.height, width=model.cfg.width, resize="letterbox")
    pre = ImagePreprocessor(spec)
    cut = trainable_cut(cfg["strategy"], cfg["trainable_blocks"])
    for i, block in enumerate(model.blocks):
        for p in block.parameters():
            p.requires_grad_(i >= cut)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"detector {model.cfg.width}x{model.cfg.height} letterbox: strategy {cfg['strategy']}, {cut} frozen "
        f"MobileNetV2 block(s), {n_train:,} of {n_total:,} parameters trainable, training on "
        f"{describe_device(device)} (frozen trunk: ONNX Runtime, {threads} CPU thread(s))"
    )

    with timed("preprocess + frozen trunk") as t_prep, tempfile.TemporaryDirectory() as tmp:
        trunk = trunk_runner(model, cut, threads, Path(tmp)) if cut > 0 else None
        train_prep = prepare(data.train, pre, model, cut, trunk, "trunk train", targets=True)
        val_prep = prepare(data.val, pre, model, cut, trunk, "trunk val", targets=False)
        del trunk
    with timed("train") as t_train:
        history, best, best_val = train(model.to(device), train_prep, val_prep, data.val, data.labels, cut, cfg)
    # Threshold choice, export, evaluation and parity run on the CPU, like the exported model.
    model.cpu().load_state_dict(best)
    model.eval()
    del best
    post_eval = {"score_threshold": EVAL_SCORE_THRESHOLD, "nms_iou": cfg["nms_iou"], "max_detections": 100}
    threshold, val_f1 = pick_score_threshold(predict_cached(model, val_prep, cut, post_eval), data.val)
    log(
        f"best epoch {int(best_val['epoch'])}: val mAP {best_val['val_map']:.4f}, mAP@0.5 {best_val['val_map50']:.4f}; "
        f"served score threshold {threshold:.2f} (val F1 {val_f1:.3f})"
    )
    del train_prep, val_prep

    staging = Staging(registry, args.name or "object-detection")
    try:
        model.eval()
        model_path = staging.path("model.onnx")
        example = torch.zeros(2, 3, spec.height, spec.width)
        export = export_onnx(
            model,
            (example,),
            model_path,
            input_names=["images"],
            output_names=["boxes", "scores"],
            dynamic_axes={"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
        )
        sess = ort_session(model_path)
        with timed("evaluate (onnx, serving path)") as t_eval:
            test_dets = onnx_predict(sess, data.test, pre, post_eval, "onnx test")
            report: CocoReport = coco_evaluate(data.test, data.labels, as_predictions(test_dets))
        log(
            f"test mAP@0.5 {report.map50:.4f}, mAP@[.5:.95] {report.map:.4f} on {report.images} images "
            f"({report.objects} objects)"
        )
        with timed("parity check"):
            served_post = {"score_threshold": threshold, "nms_iou": cfg["nms_iou"], "max_detections": 100}
            parity_split = data.test.subset(range(min(len(data.test), cfg["parity_images"])))
            parity = parity_check(model, sess, parity_split, pre, served_post, args.parity_tolerance)
        msg = (
            f"max |torch - onnx| score {parity.max_abs_diff:.3g} (tolerance {parity.tolerance:g}); "
            f"{parity.label_agreement:.2%} of {int(parity.extra['detections_compared'])} detections found again "
            f"with the same label, boxes within {parity.extra['max_box_diff_px']:.3g} px"
        )
        if not parity.passed:
            raise ParityError("parity check FAILED: " + msg)
        log("parity ok: " + msg)

        # Warm-up sample: a real test image, its final detections recorded and re-checked at every load.
        served_dets = onnx_predict(sess, data.test.subset(range(min(len(data.test), 16))), pre, served_post, "")
        w = pick_warmup(served_dets, threshold, cfg["nms_iou"])
        sample_path = data.test.images[w].path
        sample_name = "sample" + sample_path.suffix.lower()
        staging.path(sample_name).write_bytes(sample_path.read_bytes())
        expected = served_dets[w].as_rows()

        images = [
            plot_history(history, staging.path("learning_curve.png"), "training (val mAP@0.5)").name,
            draw_predictions(data.test, above(test_dets, threshold), data.labels, staging.path("predictions.png")).name,
        ]
        from safetensors.torch import save_file

        meta = {"labels": data.labels, "config": asdict(model.cfg), "backbone": "mobilenet_v2", "cut": cut}
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(staging.path(CHECKPOINT)),
            metadata={"detector": json.dumps(meta)},
        )
        staging.path(CHECKPOINT).chmod(0o644)  # safetensors writes 0600; the registry is shared
        gh, gw = model.cfg.grid()
        locations = gh * gw
        frozen = [f"features.{i}" for i in range(cut)]
        manifest = Manifest(
            name=staging.name,
            version=staging.version,
            task="object-detection",
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            labels=data.labels,
            inputs=[TensorSpec(name="images", dtype="float32", shape=["batch", 3, spec.height, spec.width])],
            outputs=[
                TensorSpec(name="boxes", dtype="float32", shape=["batch", locations, 4]),
                TensorSpec(name="scores", dtype="float32", shape=["batch", locations, len(data.labels)]),
            ],
            preprocessing=spec,
            postprocessing=DetectionPostprocessing(
                score_threshold=threshold, nms_iou=cfg["nms_iou"], max_detections=100, nms_in_graph=False
            ),
            base_model=base_info,
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
                init_from=init.ref if init else None,
                config={
                    **cfg,
                    "backbone": "mobilenet_v2",
                    "architecture": "MobileNetV2 taps 6/13/17 + lite FPN + FCOS-style head at stride 8",
                    "detector": asdict(model.cfg),
                    "threads": threads,
                    "timings_s": {
                        "preprocess_and_trunk": round(t_prep["seconds"], 1),
                        "train": round(t_train["seconds"], 1),
                        "evaluate": round(t_eval["seconds"], 1),
                        # CPU seconds of this process: comparable across runs on a shared machine.
                        "cpu_total": round(time.process_time() - cpu_started, 1),
                    },
                },
                history=history,
                notes=notes,
            ),
            metrics=Metrics(
                split="test",
                samples=report.images,
                values={
                    **report.values(),
                    "val_map50": round(best_val["val_map50"], 5),
                    "val_map": round(best_val["val_map"], 5),
                    "val_f1_at_threshold": round(val_f1, 5),
                },
                per_class=report.per_class,
                notes=[
                    f"COCO bbox evaluation (faster-coco-eval) of the exported ONNX model through the serving "
                    f"postprocessing, score threshold {EVAL_SCORE_THRESHOLD}, {report.objects} objects",
                    f"served default score threshold {threshold:.2f}: best F1 on validation",
                ],
            ),
            export=ExportInfo(
                opset=export["opset"],
                exporter=export["exporter"],
                onnxruntime_version=onnxruntime.__version__,
                torch_version=torch.__version__,
                parity=parity,
            ),
            warmup=WarmupSample(file=sample_name, expected=expected.tolist(), atol=1e-2),
        )
        write_model_card(staging.folder, manifest, images)
        return staging.publish(manifest)
    except BaseException:
        staging.discard()
        raise


def above(dets: list[Detections], threshold: float) -> list[Detections]:
    """Detections above the served threshold (what a client sees by default)."""
    out = []
    for d in dets:
        k = d.scores > threshold
        out.append(Detections(d.boxes[k], d.scores[k], d.classes[k]))
    return out
