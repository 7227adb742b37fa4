"""Write the object-detection demo dataset (Fashion-MNIST items on real photos, COCO json) to a folder.

The shifted split (shifted.json) is for evaluation only: untinted items, wider scales, backgrounds
no other split uses. `--selection N` adds val_tinted.json and val_shifted.json, validation
counterparts of test and shifted (validation items, training photos) for comparing data settings;
`--items` and `--untinted` change how train/val scenes look (default: the generator's TRAIN_STYLE).

    python -m scripts.make_detection_data --out data/detection-demo
    python -m scripts.make_detection_data --out /tmp/tiny --train 20 --val 5 --test 5
    python -m scripts.make_detection_data --out /tmp/alt --items 0.14,0.42 --untinted 0.35 --selection 300

The generator itself is part of training (scripts/train/data/detection_demo.py), which uses it
for `finetune object-detection` without --data; this is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts.train.data.detection_demo import SPLITS, TRAIN_STYLE, DemoSpec, SceneStyle, generate


def main(argv: list[str] | None = None) -> Path:
    """Generate the scenes into --out and print the folder."""
    p = argparse.ArgumentParser(prog="python -m scripts.make_detection_data", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--train", type=int, default=DemoSpec.train, help="train scenes")
    p.add_argument("--val", type=int, default=DemoSpec.val, help="validation scenes")
    p.add_argument("--test", type=int, default=DemoSpec.test, help="test scenes")
    p.add_argument("--shifted", type=int, default=None, help="shifted scenes, for evaluation only (default: --test)")
    p.add_argument(
        "--items",
        default=",".join(map(str, TRAIN_STYLE.item_fraction)),
        help="train/val item sizes, LOW,HIGH as fractions of the shorter side (default: %(default)s)",
    )
    p.add_argument(
        "--untinted", type=float, default=TRAIN_STYLE.untinted, help="share of train/val items left grey (%(default)s)"
    )
    p.add_argument("--selection", type=int, default=0, help="scenes in each selection split (val_tinted, val_shifted)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for k in (*SPLITS, "selection"):
        if (getattr(args, k) or 0) < 0:
            p.error(f"--{k} must be 0 or more")
    if not 0 <= args.untinted <= 1:
        p.error("--untinted must be between 0 and 1")
    try:
        lo, hi = (float(v) for v in args.items.split(","))
    except ValueError:
        p.error("--items wants LOW,HIGH, e.g. 0.14,0.42")
    if not 0 < lo <= hi <= 1:
        p.error("--items wants 0 < LOW <= HIGH <= 1")
    style = SceneStyle((lo, hi), untinted=args.untinted)
    spec = DemoSpec(args.train, args.val, args.test, args.seed, args.shifted, style, args.selection)
    out = generate(Path(args.out), spec)
    print(out, flush=True)
    return out


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
