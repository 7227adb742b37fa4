"""The lone-request rule: a batch of one runs on every CPU only while no worker runs a model."""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import service.tasks  # noqa: F401 (registers the task classes)
from models.servable import open_version
from service.config import Settings
from service.served import TASKS
from service.siblings import QUIET_S, Siblings, board_path, remove_board


def test_a_worker_goes_wide_only_after_its_siblings_were_quiet(tmp_path: Path) -> None:
    board = tmp_path / "board"
    first, second, third = (Siblings(board, i, 3) for i in range(3))
    assert first.all_idle() and second.all_idle()  # nobody has run yet
    with second.running():
        assert not first.all_idle(quiet_s=0) and not third.all_idle(quiet_s=0)
        assert not second.all_idle(quiet_s=0)  # a run of another model in the same worker counts too
        with second.running():  # the event loop and the inference thread at once
            pass
        assert not first.all_idle(quiet_s=0)  # still one run in progress in `second`
    assert not first.all_idle(quiet_s=60)  # `second` ran a moment ago: a lull, not a lone client
    assert first.all_idle(quiet_s=0) and third.all_idle(quiet_s=0)
    time.sleep(QUIET_S * 1.5)
    assert first.all_idle() and second.all_idle()  # its own last run does not count


def test_the_board_refuses_impossible_slots_and_links(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Siblings(tmp_path / "board", 64, 65)
    with pytest.raises(ValueError):
        Siblings(tmp_path / "board", 2, 2)  # a worker the others would not look at
    (tmp_path / "elsewhere").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(OSError):
        Siblings(tmp_path / "link", 0, 2)


def test_the_board_is_named_after_the_serving_process_and_removed_with_it() -> None:
    pid = 2**22 + 12345  # no such process: a name nobody else uses
    path = board_path(pid)
    assert str(pid) in path.name
    Siblings(path, 0, 2)
    assert path.exists()
    remove_board(pid)
    assert not path.exists()


class Counting:
    """A session that counts its runs."""

    def __init__(self, session) -> None:
        self.session, self.runs = session, 0

    def run(self, names, feeds):
        self.runs += 1
        return self.session.run(names, feeds)

    def get_providers(self):
        return self.session.get_providers()


@pytest.fixture
def classifier(image_artifact: Path, tmp_path: Path):
    settings = dataclasses.replace(Settings.from_env(), ort_threads=1)
    pool = ThreadPoolExecutor(1)
    model = TASKS["image-classification"](
        open_version(image_artifact, threads=1),
        settings,
        infer_executor=pool,
        cpu_executor=pool,
        siblings=Siblings(tmp_path / "board", 0, 2),
    )
    yield model, Siblings(tmp_path / "board", 1, 2)
    pool.shutdown()


def test_a_lone_request_runs_on_the_solo_session_only_while_the_server_is_idle(classifier) -> None:
    model, other_worker = classifier
    assert model.open_solo(threads=2, max_mb=64)  # also ran the warm-up check on it
    assert model.describe()["batching"]["lone_request_threads"] == 2
    shared, solo = Counting(model.session), Counting(model.solo_session)
    model.session, model.solo_session = shared, solo
    image = model.rows_from_bytes([model.artifact.file(model.manifest.warmup.file).read_bytes()])[0]

    alone = model.run_batch([image])
    assert (solo.runs, shared.runs) == (1, 0)

    with other_worker.running():
        busy = model.run_batch([image])
    assert (solo.runs, shared.runs) == (1, 1)
    model.run_batch([image])  # the other worker stopped a moment ago: still its own share
    assert (solo.runs, shared.runs) == (1, 2)
    time.sleep(QUIET_S * 1.5)

    batch = model.run_batch([image, image])
    assert (solo.runs, shared.runs) == (1, 3)

    # The same model file either way: the same answer alone, beside a busy worker, or batched.
    for other in (busy[0], *batch):
        for name, out in alone[0].outputs.items():
            np.testing.assert_allclose(out, other.outputs[name], rtol=1e-4, atol=1e-5)


def test_no_solo_session_when_it_would_not_pay(classifier, image_artifact: Path) -> None:
    model, _ = classifier
    assert not model.open_solo(threads=1, max_mb=64)  # no CPU to add
    model.settings = dataclasses.replace(model.settings, ort_threads=2)
    assert not model.open_solo(threads=2, max_mb=64)  # the worker's session has as many threads
    model.settings = dataclasses.replace(model.settings, ort_threads=1)
    assert not model.open_solo(threads=2, max_mb=0)  # the model file is over the memory cap
    assert model.solo_session is None and model.describe()["batching"]["lone_request_threads"] is None
    model.siblings = None  # one worker, or no board: nothing to consult
    assert not model.open_solo(threads=2, max_mb=64)
