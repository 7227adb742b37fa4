"""Fine-tune a pretrained backbone, evaluate it, export it to ONNX, check parity, publish it.

    python -m scripts.finetune image-classification --quick
    python -m scripts.finetune image-classification --data ./my_images --strategy partial --epochs 3

Progress goes to stderr; the last line on stdout is the new artifact's folder. An option the task
does not support (scripts/train/capabilities.py) is refused before anything is loaded, with exit
status 2 and one line saying what to use instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from models.manifest import TASKS
from models.recipes import Recipe, recipe
from models.versions import default_registry
from scripts.train.capabilities import TABLE, refusal

# Options that set a recipe field of the same name (--image-size -> image_size).
RECIPE_OPTIONS = (
    "strategy",
    "trainable_blocks",
    "epochs",
    "batch_size",
    "lr",
    "image_size",
    "max_length",
    "adabn",
    "augment",
)


class Refused(SystemExit):
    """An option the task does not take, or a value it cannot use: exit status 2 (a usage error)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


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
        help="what to train: the head only, the last blocks too, or everything; auto: the task chooses "
        "(images: measured per dataset) (default: recipe's)",
    )
    p.add_argument("--trainable-blocks", type=int, help="with --strategy partial: how many last blocks train")
    p.add_argument("--epochs", type=int, help="training epochs (default: recipe's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate of the backbone layers")
    p.add_argument("--image-size", type=int, help="model input size in pixels (images, detection)")
    p.add_argument(
        "--augment",
        choices=["none", "light", "strong"],
        help="images, detection: training-time augmentation (flips, crops, scale, colour, greyscale, blur, "
        "JPEG); the level each recipe uses is recorded in the manifest (default: recipe's)",
    )
    p.add_argument("--max-length", type=int, help="longest text in tokens; longer texts are truncated (sentiment)")
    p.add_argument("--name", help="artifact name in the registry (default: the task name)")
    p.add_argument(
        "--registry",
        default=str(default_registry()),
        help="registry root (default: $MODEL_REGISTRY or models/registry)",
    )
    p.add_argument("--init-from", help="start from an earlier artifact of the task: NAME, NAME/VERSION or a folder")
    p.add_argument("--quantize", choices=["int8"], help="also write an int8 model and measure it against fp32")
    p.add_argument(
        "--adabn",
        action="store_true",
        default=None,
        help="images: re-estimate frozen BatchNorm statistics on your data (AdaBN) before training",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip measuring the baselines (linear probe, ...)")
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
        help="the |torch - onnx| allowed on each held-out output: this plus 1e-4 of the output's size (default 1e-3)",
    )
    return p


def given_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, object]:
    """The options set on the command line (flag -> value), in the parser's order."""
    out: dict[str, object] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value is not None and value is not False and value != action.default:
            out[action.option_strings[0]] = value
    return out


def check_values(args: argparse.Namespace) -> None:
    """Values no task can use, refused before anything is loaded."""
    if args.epochs is not None and args.epochs < 1:
        raise Refused(f"--epochs {args.epochs}: train at least 1 epoch")
    if args.batch_size is not None and args.batch_size < 1:
        raise Refused(f"--batch-size {args.batch_size}: use 1 or more")
    if args.lr is not None and not args.lr > 0:
        raise Refused(f"--lr {args.lr}: the learning rate must be positive")
    if args.trainable_blocks is not None and args.trainable_blocks < 0:
        raise Refused(f"--trainable-blocks {args.trainable_blocks}: use 0 or more")
    if args.resume and not args.checkpoint_dir:
        raise Refused("--resume needs --checkpoint-dir DIR: the folder a run saved its state in")
    if args.max_length is not None and not 8 <= args.max_length <= 512:
        raise Refused(f"--max-length {args.max_length}: use 8 to 512 tokens (BERT-family position limit)")
    if args.image_size is not None:
        if args.task == "object-detection" and (args.image_size < 64 or args.image_size % 32):
            raise Refused(f"--image-size {args.image_size}: object-detection needs a multiple of 32, at least 64")
        if not 16 <= args.image_size <= 1024:
            raise Refused(f"--image-size {args.image_size}: use 16 to 1024 pixels")


def resolve_recipe(args: argparse.Namespace) -> tuple[str, Recipe, frozenset[str]]:
    """The named recipe with the command line's values in place; also which fields were given."""
    name = args.recipe or ("quick" if args.quick else "default")
    try:
        base = recipe(args.task, name)
    except KeyError as e:
        raise Refused(f"--recipe {name}: {e.args[0]}") from None
    overrides = {k: getattr(args, k) for k in RECIPE_OPTIONS if getattr(args, k) is not None}
    if args.no_baselines:
        overrides["baselines"] = False
    return name, replace(base, **overrides), frozenset(overrides)


def main(argv: list[str] | None = None) -> Path:
    """Parse, check the options against the capability table, run the pipeline, print the artifact's folder."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_options(parser, args)
    unknown = set(given) - set(TABLE)
    if unknown:  # a new option must get its row in the capability table
        raise RuntimeError(f"options missing from scripts/train/capabilities.py: {sorted(unknown)}")
    try:
        why = refusal(args.task, given)
        if why:
            raise Refused(why)
        check_values(args)
        recipe_name, resolved, fields = resolve_recipe(args)
    except Refused as e:
        print(f"{parser.prog}: {e.message}", file=sys.stderr)
        raise

    from scripts.train.pipeline import run_recipe
    from scripts.train.task import Options

    options = Options(
        task=args.task,
        registry=Path(args.registry),
        name=args.name or args.task,
        recipe_name=recipe_name,
        seed=args.seed,
        data=Path(args.data) if args.data else None,
        backbone=args.backbone,
        init_from=args.init_from,
        quantize=args.quantize,
        adapt_on=Path(args.adapt_on) if args.adapt_on else None,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
        resume=args.resume,
        device=args.device,
        parity_tolerance=args.parity_tolerance,
        given=fields,
    )
    folder = run_recipe(options, resolved)
    print(folder, flush=True)
    return folder


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
