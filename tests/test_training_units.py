"""Training pieces that need no dataset: resumable checkpoints, AdaBN, metrics, the guard."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.recipes import IMAGE_QUICK, recipe
from scripts.train.fit import Trainer, fit, frozen_prefix
from scripts.train.metrics import classification_report
from scripts.train.nets.backbones import adapt_batchnorm
from scripts.train.tasks.image_classification import image_trainer, negative_transfer_notes

TOY = replace(IMAGE_QUICK, batch_size=16, lr=0.01, head_lr=0.05, weight_decay=0.0, label_smoothing=0.0)


def _toy():
    torch.manual_seed(0)
    top = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    x = torch.randn(96, 8)
    y = (x[:, 0] > 0).long().numpy() + (x[:, 1] > 1).long().numpy()
    return top, x, y


def _sgd_trainer(top: nn.Module, x: torch.Tensor, y: np.ndarray, epochs: int) -> Trainer:
    return image_trainer(top, top[-1], x, y, x, y, TOY, epochs)


def _adamw_trainer(top: nn.Module, x: torch.Tensor, y: np.ndarray, epochs: int) -> Trainer:
    """Adam's state (moments, step counts), a warm-up schedule and python-drawn batch order."""

    trainer = _sgd_trainer(top, x, y, epochs)
    opt = torch.optim.AdamW(top.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))

    def batches(streams) -> list[torch.Tensor]:
        order = list(range(len(x)))
        streams.python.shuffle(order)
        return [torch.tensor(order[i : i + 16]) for i in range(0, len(order), 16)]

    return replace_trainer(trainer, optimizer=opt, scheduler=sched, batches=batches, clip=1.0)


def replace_trainer(trainer: Trainer, **changes) -> Trainer:
    from dataclasses import replace as dc_replace

    return dc_replace(trainer, **changes)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("make", [_sgd_trainer, _adamw_trainer], ids=["sgd-onecycle", "adamw-lambda"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path, make) -> None:
    top, x, y = _toy()
    straight = copy.deepcopy(top)
    torch.manual_seed(7)  # each run is a fresh process: set_seed, then dropout draws from the global RNG
    a = fit(make(straight, x, y, 4), epochs=4, patience=99, seed=3)

    # A run killed during its third epoch, after the checkpoint of the second was written.
    interrupted = copy.deepcopy(top)
    trainer = make(interrupted, x, y, 4)
    validate, calls = trainer.validate, []

    def dies_in_epoch_3() -> dict[str, float]:
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return validate()

    torch.manual_seed(7)
    with pytest.raises(Interrupted):
        fit(replace_trainer(trainer, validate=dies_in_epoch_3), epochs=4, patience=99, seed=3, checkpoint=tmp_path)
    resumed = copy.deepcopy(top)  # a fresh process rebuilds the model from scratch
    torch.manual_seed(7)
    b = fit(make(resumed, x, y, 4), epochs=4, patience=99, seed=3, checkpoint=tmp_path, resume=True)
    assert b.resumed_after == 2
    assert [h["epoch"] for h in b.history] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["train_loss"] for h in a.history], [h["train_loss"] for h in b.history], rtol=1e-6)
    for k in a.best:
        torch.testing.assert_close(a.best[k], b.best[k])
    for k, v in straight.state_dict().items():  # the weights after the last epoch, not only the best
        torch.testing.assert_close(v, resumed.state_dict()[k])

    # A checkpoint of another run (here: another seed) is refused, not continued.
    with pytest.raises(SystemExit, match="written by another run"):
        fit(make(copy.deepcopy(top), x, y, 4), epochs=4, patience=99, seed=3, checkpoint=tmp_path, resume=True,
            fingerprint="another run")  # fmt: skip


def test_early_stopping_keeps_the_best_epoch() -> None:
    top, x, y = _toy()
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    trainer = replace_trainer(_sgd_trainer(top, x, y, 5), validate=lambda: {"val_accuracy": next(scores)})
    result = fit(trainer, epochs=5, patience=2, seed=0)
    assert [h["val_accuracy"] for h in result.history] == [0.5, 0.7, 0.6, 0.65]  # stopped after 2 without a gain


def test_epochs_around_the_learning_rate_peak_do_not_count_towards_early_stopping() -> None:
    """One-cycle over 20 epochs (the peak at epoch 3, half the peak again at about 11.5): the score
    dips around the peak and recovers as the rate comes down. The dip does not stop the run."""
    top, x, y = _toy()
    dip = [0.5, 0.4, 0.3, 0.3, 0.35, 0.4, 0.45, 0.45, 0.48, 0.49, 0.49]  # epochs 1-11: no gain on epoch 1
    scores = iter([*dip, 0.6, 0.55, 0.55, 0.55, 0.9, 0.9, 0.9, 0.9, 0.9])
    trainer = replace_trainer(_sgd_trainer(top, x, y, 20), validate=lambda: {"val_accuracy": next(scores)})
    result = fit(trainer, epochs=20, patience=3, seed=0)
    # Counted only from epoch 12 on: the gain there, then three epochs without one.
    assert [h["val_accuracy"] for h in result.history] == [*dip, 0.6, 0.55, 0.55, 0.55]


def test_a_constant_learning_rate_still_stops_early() -> None:
    top, x, y = _toy()
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    trainer = replace_trainer(_adamw_trainer(top, x, y, 5), validate=lambda: {"val_accuracy": next(scores)})
    result = fit(trainer, epochs=5, patience=2, seed=0)  # warm-up within epoch 1, then constant
    assert [h["val_accuracy"] for h in result.history] == [0.5, 0.7, 0.6, 0.65]


def test_parity_allows_float32_rounding_in_proportion_to_the_outputs_size() -> None:
    """The case that was refused: logits up to about 100, the largest difference 1.5e-3 at a logit
    of 52 (3e-5 relative), every label the same. It passes; the same difference on small logits
    does not, nor does a real export error, nor NaN; a zero tolerance accepts an exact match."""
    from scripts.train.export import parity_message, parity_report

    rng = np.random.default_rng(0)
    large = (rng.standard_normal((1000, 10)) * 30).astype(np.float32)
    large[0, 3] = 52.0
    off = large.copy()
    off[0, 3] += 1.5e-3
    report = parity_report(large, off, tolerance=1e-3)
    assert report.passed and report.max_abs_diff == pytest.approx(1.5e-3, rel=0.01)
    assert 0.2 < report.extra["tolerance_used"] < 0.3  # 1.5e-3 of 1e-3 + 1e-4 * 52
    assert "(tolerance 0.001 + 0.0001 x |torch|)" in parity_message(report)

    small = np.full((1000, 10), 0.5, dtype=np.float32)
    small[:, 0] = 2.0
    nudged = small.copy()
    nudged[0, 3] += 1.5e-3
    assert not parity_report(small, nudged, tolerance=1e-3).passed
    assert not parity_report(large, large * 1.01, tolerance=1e-3).passed  # 1% off: an export bug
    broken = off.copy()
    broken[5, 5] = np.nan
    assert not parity_report(large, broken, tolerance=1e-3).passed
    assert parity_report(large, large.copy(), tolerance=0.0).passed
    assert not parity_report(large, off, tolerance=0.0, relative=0.0).passed


def test_strategies_freeze_the_leading_blocks() -> None:
    assert frozen_prefix("feature-extraction", 18, 3) == 18
    assert frozen_prefix("partial", 18, 3) == 15
    assert frozen_prefix("partial", 6, 9) == 0
    assert frozen_prefix("full", 18, 3) == 0
    with pytest.raises(ValueError, match="unknown strategy"):
        frozen_prefix("most", 18, 3)


def test_adabn_moves_statistics_to_the_target_domain() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net.eval()
    target = (np.random.default_rng(0).normal(5.0, 2.0, size=(64, 3, 12, 12))).astype(np.float32)
    assert adapt_batchnorm(net, target) == 1
    with torch.no_grad():
        conv_out = net[0](torch.from_numpy(target))
    torch.testing.assert_close(net[1].running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-3, rtol=1e-3)
    assert not net.training and net[1].momentum == 0.1


def test_classification_report_numbers() -> None:
    r = classification_report(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert r.accuracy == 0.6
    assert r.per_class["b"] == {"precision": 0.66667, "recall": 1.0, "f1": 0.8, "support": 2}
    assert r.per_class["c"]["f1"] == 0.0 and r.confusion[2, 0] == 1
    assert abs(r.macro_f1 - (0.5 + 0.8 + 0.0) / 3) < 1e-9


def test_negative_transfer_is_said_plainly() -> None:
    notes = negative_transfer_notes(0.80, {"linear-probe": {"val_accuracy": 0.85}})
    assert notes and notes[0].startswith("NEGATIVE TRANSFER WARNING")
    assert negative_transfer_notes(0.9, {"linear-probe": {"val_accuracy": 0.85}})[0].startswith("fine-tuning beats")


def test_transfer_study_label_fractions_are_what_they_say() -> None:
    from scripts.transfer_study import label_subset

    labels = np.repeat(np.arange(10), 5500)  # Fashion-MNIST's train split after validation
    for fraction, expected in ((0.01, 550), (0.05, 2750), (0.25, 13750)):
        idx = label_subset(labels, fraction, seed=1)
        assert len(idx) == expected and len(np.unique(idx)) == expected
        assert np.all(np.bincount(labels[idx], minlength=10) == expected // 10), "not stratified"
    assert len(label_subset(labels, 1.0, seed=1)) == len(labels)
    assert len(label_subset(labels, 1e-6, seed=1)) == 10  # at least one per class
    assert not np.array_equal(label_subset(labels, 0.01, seed=1), label_subset(labels, 0.01, seed=2))


def test_small_training_sets_get_enough_steps() -> None:
    from scripts.train.fit import small_data_schedule

    cfg = replace(IMAGE_QUICK, epochs=2, batch_size=64, patience=2, min_steps=150, max_epochs=60)
    out, note = small_data_schedule(cfg, 49, epochs_given=False)  # 1 step an epoch
    assert out.epochs == 60 and out.patience == 15 and note and "49 examples" in note
    out, note = small_data_schedule(cfg, 2000, epochs_given=False)  # 32 steps: 5 epochs
    assert out.epochs == 5 and out.patience == 2 and note
    assert small_data_schedule(cfg, 49, epochs_given=True) == (cfg, None)  # --epochs wins
    no_floor = replace(cfg, min_steps=0)
    assert small_data_schedule(no_floor, 49, epochs_given=False) == (no_floor, None)
    # The shipped recipes on their own demo data keep their epochs (their results stay valid).
    for task, name, n_train in [
        ("image-classification", "default", 55_000),
        ("image-classification", "quick", 5_000),
        ("sentiment", "default", 28_545),
        ("sentiment", "quick", 3_000),
        ("object-detection", "default", 2_000),
        ("object-detection", "quick", 1_000),
    ]:
        r = recipe(task, name)
        assert small_data_schedule(r, n_train, epochs_given=False)[1] is None, (task, name)


def test_image_folder_leaves_out_unreadable_files(tmp_path: Path) -> None:
    import io

    from PIL import Image

    from scripts.train.data.images import load_image_folder

    for cls, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        (tmp_path / cls).mkdir()
        for i in range(12):
            buf = io.BytesIO()
            Image.new("RGB", (20 + i, 16), colour).save(buf, format="PNG")
            (tmp_path / cls / f"{i}.png").write_bytes(buf.getvalue())
    good = (tmp_path / "red" / "0.png").read_bytes()
    (tmp_path / "red" / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "blue" / "text.jpg").write_bytes(b"not an image")
    (tmp_path / "blue" / ".hidden.png").write_bytes(good)
    data = load_image_folder(tmp_path, val_size=2, seed=0)
    paths = [p.name for s in (data.train, data.val, data.test) for p in s.paths or []]
    assert len(paths) == 24 and not {"cut.png", "text.jpg", ".hidden.png"} & set(paths)
    assert "2 unreadable file(s) left out" in data.description
    assert "red/cut.png" in data.description and "blue/text.jpg" in data.description


def test_input_size_follows_the_images(tmp_path: Path) -> None:
    from PIL import Image

    from scripts.train.data.images import input_size_for

    def folder(name: str, sizes: list[tuple[int, int]]) -> list[Path]:
        paths = []
        for i, wh in enumerate(sizes):
            p = tmp_path / f"{name}{i}.png"
            Image.new("RGB", wh).save(p)
            paths.append(p)
        return paths

    assert input_size_for(folder("mnist", [(28, 28)] * 5)) == (64, 28)  # never below 64
    assert input_size_for(folder("scan", [(150, 120), (160, 130), (170, 140)])) == (128, 130)
    assert input_size_for(folder("photo", [(4000, 3000), (640, 480), (800, 600)])) == (224, 600)
    (tmp_path / "junk0.png").write_bytes(b"not an image")
    assert input_size_for([tmp_path / "junk0.png"]) == (64, 64)


def test_training_device_is_chosen_or_refused_plainly(monkeypatch, tmp_path: Path) -> None:
    import pytest

    from scripts import finetune
    from scripts.train.device import describe_device, module_device, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device(None) == torch.device("cpu")
    assert describe_device(pick_device(" CPU ")) == "cpu"
    with pytest.raises(SystemExit, match="sees no CUDA GPU"):
        pick_device("cuda")
    with pytest.raises(SystemExit, match="use auto, cpu, cuda"):
        pick_device("gpu0")
    with pytest.raises(SystemExit, match="trains on cpu, cuda or mps"):
        pick_device("meta")
    # The flag reaches the trainers and is refused before any data is read or weights loaded.
    for task in ("image-classification", "sentiment", "object-detection"):
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):
            finetune.main([task, "--quick", "--device", "cuda:0", "--registry", str(tmp_path)])
    assert not any(tmp_path.rglob("*.onnx"))

    # A machine with one GPU: `cuda` means the current one, an index past the last is refused,
    # and TF32 is switched off so the float32 parity check compares like with like.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    saved = torch.backends.fp32_precision
    try:
        torch.backends.fp32_precision = "tf32"
        assert pick_device("auto") == torch.device("cuda", 0)
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        torch.backends.fp32_precision = saved
    with pytest.raises(SystemExit, match=r"has 1 CUDA GPU\(s\)"):
        pick_device("cuda:3")

    assert module_device(nn.Sequential()) == torch.device("cpu")
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")


def _tiny_mlp(path: Path, rng: np.random.Generator) -> None:
    """x (batch, 8) -> MatMul + bias -> Relu -> MatMul + bias: two weight GEMMs to quantize."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1 = rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    w2, b2 = rng.normal(size=(16, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["o"]),
            helper.make_node("Add", ["o", "b2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_static_int8_is_close_and_batch_independent(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from scripts.train.int8 import QuantizationError, quantize_int8

    rng = np.random.default_rng(0)
    _tiny_mlp(tmp_path / "fp32.onnx", rng)
    calib = [{"x": rng.normal(size=(64, 8)).astype(np.float32)} for _ in range(4)]
    result = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calib)
    assert (result.gemms, result.activations, result.calibration_rows) == (2, 2, 256)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and "DynamicQuantizeLinear" not in ops and "MatMul" not in ops

    fp32, int8 = (
        ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]) for f in ("fp32.onnx", "int8.onnx")
    )
    x = rng.normal(size=(32, 8)).astype(np.float32)
    ref, got = fp32.run(None, {"x": x})[0], int8.run(None, {"x": x})[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # int8 error, not a different function
    # Fixed scales: each row's answer is the same alone as in the batch (dynamic int8 fails this).
    alone = np.concatenate([int8.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    assert np.array_equal(alone, got)

    # A graph with nothing to quantize is refused, and no output file is written.
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "relu.onnx"))
    with pytest.raises(QuantizationError, match="no MatMul/Gemm"):
        quantize_int8(tmp_path / "relu.onnx", tmp_path / "relu8.onnx", calib)
    assert not (tmp_path / "relu8.onnx").exists()
    with pytest.raises(QuantizationError, match="calibration"):
        quantize_int8(tmp_path / "fp32.onnx", tmp_path / "none.onnx", [])
