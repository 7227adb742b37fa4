"""Compare detection artifacts trained on differently drawn demo scenes, on validation data only.

The demo generator's TRAIN_STYLE (item sizes, untinted share of train/val scenes) is a choice;
this measures candidates for it without looking at the test or shifted split. It evaluates
exported artifacts (ONNX Runtime through the serving preprocessing and postprocessing, at each
artifact's own served threshold) on the two selection splits (`DemoSpec.selection`):

- val_tinted: drawn like the test split (every item tinted, 14-42%), from validation items and
  training photos: the in-distribution reading;
- val_shifted: drawn like the shifted split (untinted, 10-55%, 40% synthetic textures), from
  validation items and training photos only: the off-distribution reading;

and a rescale check on val_tinted: each scene uploaded 3x larger (bicubic, PNG, as
tests/test_detection.py does); for every detection scoring 0.5 or more on the original, how far
(in original pixels) the nearest same-label box on the 3x upload is from it.

    python -m scripts.study_detection_style NAME=ARTIFACT_DIR ...  [--final]

--final adds the test and shifted splits (for the one setting chosen; read them once).
Prints one JSON object per artifact.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from models.detection import Detections, postprocess
from models.manifest import ImagePreprocessing
from models.preprocess import ImagePreprocessor, decode_image
from scripts.train.data.coco import DetectionSplit, load_coco
from scripts.train.data.detection_demo import DemoSpec, ensure_demo_data
from scripts.train.detection_eval import onnx_predict, split_report
from scripts.train.tasks.detection import EVAL_SCORE_THRESHOLD, demo_data_root

SELECTION_SCENES = 300
RESCALE_IMAGES = 100
RESCALE_SCORE = 0.5


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _detect(sess: Any, pre: ImagePreprocessor, data: bytes, post: dict[str, Any]) -> Detections:
    x, g = pre.from_bytes(data, draft=False)
    boxes, scores = sess.run(["boxes", "scores"], {"images": x[None]})
    return postprocess(boxes[0], scores[0], geometry=g, **post)


def rescale_shift(sess: Any, pre: ImagePreprocessor, split: DetectionSplit, post: dict[str, Any]) -> dict[str, float]:
    """How far boxes move (original pixels) when the same scene is uploaded 3x larger."""
    moves: list[float] = []
    for im in split.images[:RESCALE_IMAGES]:
        small = decode_image(im.path.read_bytes())
        big = small.resize((small.width * 3, small.height * 3), Image.Resampling.BICUBIC)
        a, b = _detect(sess, pre, _png(small), post), _detect(sess, pre, _png(big), post)
        for box, score, cls in zip(a.boxes, a.scores, a.classes, strict=True):
            if score < RESCALE_SCORE:
                continue
            same = b.boxes[b.classes == cls] / 3.0
            moves.append(float(np.abs(same - box).max(1).min()) if len(same) else float("inf"))
    m = np.asarray(moves)
    return {
        "rescale_boxes": len(m),
        "rescale_max_px": round(float(m.max()), 2) if len(m) else 0.0,
        "rescale_over_3px": round(float((m > 3).mean()), 4) if len(m) else 0.0,
    }


def evaluate(art: Path, splits: dict[str, DetectionSplit]) -> dict[str, Any]:
    m = json.loads((art / "manifest.json").read_text())
    pre = ImagePreprocessor(ImagePreprocessing(**m["preprocessing"]))
    served = {k: m["postprocessing"][k] for k in ("score_threshold", "nms_iou", "max_detections")}
    low = {**served, "score_threshold": EVAL_SCORE_THRESHOLD}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(art / m["model_file"]), opts, providers=["CPUExecutionProvider"])
    out: dict[str, Any] = {"artifact": str(art), "threshold": served["score_threshold"]}
    out["cpu_total"] = m["training"].get("config", {}).get("timings_s", {}).get("cpu_total")
    for name, split in splits.items():
        dets = onnx_predict(sess, split, pre, low, f"onnx {name}")
        _, values = split_report(dets, split, m["labels"], served["score_threshold"])
        out[name] = {k: values[k] for k in ("map50", "map", "precision_at_threshold", "recall_at_threshold")}
    out.update(rescale_shift(sess, pre, splits["val_tinted"], served))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scripts.study_detection_style", description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+", help="NAME=ARTIFACT_DIR")
    p.add_argument("--final", action="store_true", help="also the test and shifted splits")
    args = p.parse_args(argv)
    # The selection splits do not depend on the training style: one copy serves every candidate.
    sel = ensure_demo_data(demo_data_root(), DemoSpec(train=0, val=0, test=0, shifted=0, selection=SELECTION_SCENES))
    names = ["val_tinted", "val_shifted"]
    folder = {n: sel for n in names}
    if args.final:
        final = ensure_demo_data(demo_data_root(), DemoSpec(train=0, val=0, test=300))
        names += ["test", "shifted"]
        folder |= {"test": final, "shifted": final}
    splits = {n: load_coco(folder[n] / f"{n}.json", n)[1] for n in names}
    for item in args.artifacts:
        name, _, path = item.partition("=")
        t0 = time.perf_counter()
        row = evaluate(Path(path), splits)
        row["setting"] = name
        row["eval_wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
