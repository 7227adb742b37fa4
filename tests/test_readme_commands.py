"""Every `python -m scripts.finetune` and `python -m scripts.registry` command shown in README.md
runs, in the order shown, on tiny data with the quick recipe, in a registry holding the demo
models (so `--init-from image-classification` means what it says there).

Commands are read from the README's code blocks, so a new example is covered when it is
written. What is changed to make them run here: `--data` paths (and commands without `--data`)
point at tiny datasets of the command's task, `--quick` and `--epochs 1` are added where the
command sets neither a recipe nor epochs, and a version placeholder such as `20261127T...` is
the newest version of that model.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from models import versions
from tests.conftest import TinyData, publish_copy

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = ("python -m scripts.finetune", "python -m scripts.registry")


def readme_commands(text: str) -> list[str]:
    """The finetune and registry commands in the README's code blocks, continuation lines joined,
    prompts (`$ `) and trailing comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|console|sh)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ").strip()
            if line.startswith(PROGRAMS):
                commands.append(re.sub(r"\s+#.*$", "", line).strip())
    return commands


def test_the_readme_shows_commands_of_both_tools() -> None:
    commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    assert sum(c.startswith(PROGRAMS[0]) for c in commands) >= 4, commands
    assert any(c.startswith(PROGRAMS[1]) for c in commands), commands
    assert readme_commands("```bash\npython -m scripts.finetune sentiment \\\n    --quick  # fast\n```") == [
        "python -m scripts.finetune sentiment --quick"
    ]


def test_the_readme_shows_the_capability_table() -> None:
    from scripts.train.capabilities import as_markdown

    assert as_markdown(only_differences=True) in (REPO / "README.md").read_text(encoding="utf-8")


def _adapt(command: str, tiny: TinyData, registry: Path) -> list[str]:
    """The README command as argv, made to run here (see the module docstring)."""
    argv = shlex.split(command)[1:]  # drop "python"
    if argv[1] == "scripts.registry":
        out = []
        for word in argv:
            if re.fullmatch(r"\d{8}T[0-9.]*\.\.\.", word):  # a version placeholder: the newest version
                name = out[-1]
                word = versions.list_versions(registry, name)[-1]
            out.append(word)
        return out
    task = argv[2]
    data = {
        "image-classification": tiny.images,
        "sentiment": tiny.texts,
        "object-detection": tiny.coco_json if ".json" in command else tiny.coco,
    }[task]
    if "--data" in argv:
        argv[argv.index("--data") + 1] = str(data)
    else:
        argv += ["--data", str(data)]
    if "--quick" not in argv and "--recipe" not in argv:
        argv.append("--quick")
    if "--epochs" not in argv:
        argv += ["--epochs", "1"]
    return argv


def test_readme_commands_run(
    tiny_data: TinyData, image_artifact: Path, detection_artifact: Path, sentiment_artifact: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    for artifact in (image_artifact, detection_artifact, sentiment_artifact):
        publish_copy(artifact, registry)
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRAFT_NO_PROGRESS": "1", "MODEL_REGISTRY": str(registry)}
    commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    for command in commands:
        argv = _adapt(command, tiny_data, registry)
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert r.returncode == 0, f"README command failed: {command}\nran: {argv}\n{r.stderr[-4000:]}"
        if argv[1] == "scripts.finetune":
            folder = Path(r.stdout.strip().splitlines()[-1])  # the artifact's folder is printed last
            assert folder.parent.parent == registry and (folder / "manifest.json").is_file(), r.stdout
