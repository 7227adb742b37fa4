"""Ask a running graft server about an image or a text, and print a readable answer.

python -m scripts.predict shoe.jpg                         # classify (an existing file)
python -m scripts.predict shelf.jpg --task detect          # boxes
python -m scripts.predict "the crew was lovely"            # sentiment (anything else)
python -m scripts.predict a.jpg b.jpg --json               # raw JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from scripts.client import GraftClient, GraftError


def _bar(score: float, width: int = 24) -> str:
    n = round(max(0.0, min(1.0, score)) * width)
    return "#" * n + "." * (width - n)


def render(task: str, subject: str, body: dict[str, Any]) -> str:
    model = body.get("model", {})
    head = f"{subject}  [{model.get('name')} {model.get('version')}]"
    lines = [head]
    if task == "classify":
        for p in body["predictions"]:
            lines.append(f"  {p['label']:<20} {p['score']:7.2%}  {_bar(p['score'])}")
    elif task == "detect":
        lines[0] += f"  {body['width']}x{body['height']} px"
        if not body["detections"]:
            lines.append("  (nothing found)")
        for d in body["detections"]:
            x1, y1, x2, y2 = d["box"]
            lines.append(f"  {d['label']:<16} {d['score']:6.2%}  box ({x1:.0f}, {y1:.0f}) - ({x2:.0f}, {y2:.0f})")
    else:
        for text, r in zip(body["texts"], body["results"], strict=True):
            short = text if len(text) <= 60 else text[:57] + "..."
            scores = "  ".join(f"{k} {v:.2f}" for k, v in r["scores"].items())
            lines.append(f"  {r['label']:<9} {r['score']:6.2%}  {short!r}  ({scores})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.predict", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="image files, or texts")
    p.add_argument("--task", choices=["auto", "classify", "detect", "sentiment"], default="auto")
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--model", help="model name (default: the task's default model)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--score-threshold", type=float)
    p.add_argument("--json", action="store_true", help="print the raw JSON answers")
    args = p.parse_args(argv)

    task = args.task
    if task == "auto":
        task = "classify" if all(Path(i).is_file() for i in args.inputs) else "sentiment"
    with GraftClient(args.url) as client:
        try:
            if task == "sentiment":
                body = client.sentiment(args.inputs, model=args.model)
                body["texts"] = args.inputs
                answers = [("texts", body)]
            elif task == "classify":
                answers = [(i, client.classify(i, top_k=args.top_k, model=args.model)) for i in args.inputs]
            else:
                answers = [
                    (i, client.detect(i, score_threshold=args.score_threshold, model=args.model)) for i in args.inputs
                ]
        except GraftError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except (OSError, httpx.HTTPError) as e:
            print(f"error: cannot reach {args.url} or read an input: {e}", file=sys.stderr)
            return 2
    for subject, body in answers:
        print(json.dumps(body, indent=2) if args.json else render(task, subject, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
