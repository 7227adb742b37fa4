"""Fine-tune a pretrained backbone, evaluate it, export it to ONNX, check parity, publish it.

    python -m scripts.finetune image-classification --quick
    python -m scripts.finetune image-classification --data ./my_images --strategy partial --epochs 3

Progress goes to stderr; the last line on stdout is the new artifact's folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.manifest import TASKS
from models.recipes import recipe
from models.versions import default_registry

DEFAULT_REGISTRY = default_registry()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.finetune",
        description="Fine-tune, evaluate, export to ONNX with a parity check, and write a versioned artifact.",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument(
        "--data",
        help="dataset: ImageFolder dir (images); detection: a COCO json (split 80/10/10) or a folder with "
        "train.json [val.json, test.json], file_name relative to the json, images/ or images/<split>/; "
        "CSV/JSONL (sentiment); default: the packaged (or generated) demo data",
    )
    p.add_argument(
        "--backbone",
        help="pretrained backbone: a torchvision model name, HF id or local folder (default: the packaged one)",
    )
    p.add_argument(
        "--strategy",
        choices=["feature-extraction", "partial", "full", "auto"],
        help="what to train: the head only, the last blocks too, or everything (default: recipe's)",
    )
    p.add_argument("--trainable-blocks", type=int, help="with --strategy partial: how many last blocks train")
    p.add_argument("--epochs", type=int, help="training epochs (default: recipe's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate of the backbone layers")
    p.add_argument("--image-size", type=int, help="model input size in pixels (images)")
    p.add_argument("--name", help="artifact name in the registry (default: the task name)")
    p.add_argument(
        "--registry",
        default=str(DEFAULT_REGISTRY),
        help="registry root (default: $MODEL_REGISTRY or models/registry)",
    )
    p.add_argument("--init-from", help="start from an earlier artifact: NAME[/VERSION] or a folder")
    p.add_argument("--quantize", choices=["int8"], help="also quantize the exported model")
    p.add_argument(
        "--adabn",
        action="store_true",
        default=None,
        help="images: re-estimate frozen BatchNorm statistics on your data (AdaBN) before training",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip the linear-probe baseline measurement")
    p.add_argument("--checkpoint-dir", help="save resumable training state here after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir's last epoch")
    p.add_argument(
        "--adapt-on",
        metavar="FILE",
        help="text: continue masked-LM pretraining on unlabelled in-domain text (.txt lines, CSV/JSONL `text`) "
        "before fine-tuning",
    )
    p.add_argument(
        "--device",
        default=os.environ.get("GRAFT_TRAIN_DEVICE") or "auto",
        help="where to train: auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda, cuda:N or mps; "
        "evaluation, export and the parity check always run on the CPU (default: $GRAFT_TRAIN_DEVICE or auto)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the small, fast recipe (tests and demos)")
    p.add_argument("--recipe", help="recipe name (default: 'quick' with --quick, else 'default')")
    p.add_argument(
        "--parity-tolerance",
        type=float,
        default=1e-3,
        help="max |torch - onnx| allowed on held-out outputs (default 1e-3)",
    )
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    name = args.recipe or ("quick" if args.quick else "default")
    cfg = recipe(args.task, name)
    cfg["recipe"] = name
    cfg["seed"] = args.seed
    overrides = {
        "strategy": args.strategy,
        "trainable_blocks": args.trainable_blocks,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "image_size": args.image_size,
        "adabn": args.adabn,
    }
    for key, value in overrides.items():
        if value is not None:
            if key not in cfg:
                raise SystemExit(f"--{key.replace('_', '-')} does not apply to {args.task}")
            cfg[key] = value
    if getattr(args, "adapt_on", None) and args.task != "sentiment":
        raise SystemExit("--adapt-on applies to sentiment only")
    if args.checkpoint_dir and args.task != "image-classification":
        raise SystemExit("--checkpoint-dir/--resume apply to image-classification only")
    if args.resume and not args.checkpoint_dir:
        raise SystemExit("--resume needs --checkpoint-dir")
    cfg["checkpoint_dir"] = args.checkpoint_dir
    cfg["resume"] = args.resume
    if args.no_baselines:
        cfg["baselines"] = []
    if cfg.get("epochs", 1) < 1:
        raise SystemExit("--epochs must be at least 1")
    return cfg


# task -> module under scripts.train with `run(args, cfg) -> Path`
JOBS = {
    "image-classification": "scripts.train.image_classification",
    "sentiment": "scripts.train.sentiment",
    "object-detection": "scripts.train.detection",
}


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    if args.task not in JOBS:
        raise SystemExit(f"task {args.task!r} is not available in this build of graft yet")
    import importlib

    job = importlib.import_module(JOBS[args.task])
    Path(args.registry).mkdir(parents=True, exist_ok=True)
    folder = job.run(args, cfg)
    print(folder, flush=True)
    return folder


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
