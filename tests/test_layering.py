"""Layers point down: training imports neither the server nor the benchmarks and tools built on
it, and each task module stays small and holds only what is its own."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TinyData

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "scripts" / "train"
TASK_MODULES = sorted(p for p in (TRAIN / "tasks").glob("*.py") if p.name != "__init__.py")
SERVER_STACK = ("service", "bentoml", "fastapi", "starlette")
# Built on training, so training must not import them back (import cycles).
ABOVE_TRAINING = (
    "scripts.bench",
    "scripts.make_detection_data",
    "scripts.transfer_study",
    "scripts.finetune",
    "scripts.ensure_models",
    "scripts.registry",
)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (relative ones made absolute)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join([*base, node.module] if node.module else base))
            else:
                out.add(node.module or "")
    return out


@pytest.mark.parametrize("path", sorted(TRAIN.rglob("*.py")), ids=lambda p: str(p.relative_to(TRAIN)))
def test_training_code_imports_nothing_above_it(path: Path) -> None:
    bad = {
        m
        for m in _imports(path)
        if m.split(".")[0] in SERVER_STACK or any(m == a or m.startswith(a + ".") for a in ABOVE_TRAINING)
    }
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.slow
def test_a_fine_tune_loads_no_server_module(tiny_data: TinyData, tmp_path: Path) -> None:
    """The imports a real run makes, not only the ones written at the top of files."""
    code = (
        "import sys\n"
        "from scripts.finetune import main\n"
        f"main(['image-classification', '--quick', '--data', {str(tiny_data.images)!r}, '--epochs', '1',\n"
        f"      '--no-baselines', '--registry', {str(tmp_path)!r}])\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_STACK!r})\n"
        "print('LOADED', loaded)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRAFT_NO_PROGRESS": "1", "GRAFT_WORKERS": "not-a-number"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    # A serving setting that does not parse (GRAFT_WORKERS above) cannot break a fine-tune either.
    assert "LOADED []" in r.stdout, r.stdout


@pytest.mark.parametrize("path", TASK_MODULES, ids=lambda p: p.name)
def test_task_modules_are_small(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 400, f"{path.name} has {lines} lines; shared steps belong in the pipeline"


def _windows(path: Path, size: int = 6) -> dict[tuple[str, ...], int]:
    """Every run of `size` consecutive meaningful lines (stripped; blank, comment and bracket-only lines
    left out), with the line number it starts at."""
    lines = [
        (i + 1, line.strip())
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())
        if line.strip() and not line.strip().startswith("#") and line.strip() not in {")", "]", "}", "),", "],", "},"}
    ]
    return {tuple(t for _, t in lines[k : k + size]): lines[k][0] for k in range(len(lines) - size + 1)}


def test_task_modules_share_no_block() -> None:
    """A block copied between tasks belongs in the pipeline (the `duplicates` tool checks this more
    thoroughly, same-shape blocks too; this catches copies anywhere the suite runs)."""
    shared = []
    for i, a in enumerate(TASK_MODULES):
        wa = _windows(a)
        for b in TASK_MODULES[i + 1 :]:
            for block, line in _windows(b).items():
                if block in wa:
                    shared.append(f"{a.name}:{wa[block]} ~ {b.name}:{line}")
    assert not shared, shared
