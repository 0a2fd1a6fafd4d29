"""The study's three transfer regimes: which parameters train, their learning-rate groups, and the frozen prefix.

linear_probe: head only. partial: the stages of the forward pass from the backbone record's ``partial_split``
on (AlexNet `features[10:]` + whole classifier; DeiT last block + final norm + head). full: everything.
"""

from __future__ import annotations

import torch
from torch import nn

from transferstudy.models import backbone, build_model, head, module_at, split_stages
from transferstudy.training import make_optimizer

REGIMES = ("linear_probe", "partial", "full")


def _check_regime(regime: str) -> None:
    if regime not in REGIMES:
        raise ValueError(f"Unknown regime={regime!r}; choose one of {REGIMES}.")


def _groups(model: nn.Module, name: str, regime: str) -> dict[str, list[nn.Parameter]]:
    """The regime's trainable parameters by learning-rate group, from the model's structure."""
    record = backbone(name)
    _check_regime(regime)
    head_params = list(head(model, name).parameters())
    if regime == "linear_probe":
        return {"head": head_params}
    if regime == "full":
        head_ids = {id(p) for p in head_params}
        return {"backbone": [p for p in model.parameters() if id(p) not in head_ids], "head": head_params}
    _, trained = split_stages(model, record, record.partial_split)
    head_params = list(module_at(model, record.partial_head).parameters())
    head_ids = {id(p) for p in head_params}
    return {"backbone": [p for p in nn.Sequential(*trained).parameters() if id(p) not in head_ids],
            "head": head_params}


def apply_regime(model: nn.Module, name: str, regime: str) -> nn.Module:
    """Freeze everything, then unfreeze what `regime` trains (in place); returns `model`."""
    groups = _groups(model, name, regime)
    model.requires_grad_(False)
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    return model


def param_groups(model: nn.Module, name: str, regime: str) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters as {"backbone": [...], "head": [...]} ("head" only for linear_probe).

    For discriminative learning rates; frozen parameters are in no group. The model must have had
    `apply_regime(model, name, regime)` applied.
    """
    groups = _groups(model, name, regime)
    grouped = {id(p) for params in groups.values() for p in params}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if grouped != trainable:
        raise ValueError(
            f"The model's trainable parameters do not match regime={regime!r} for {name!r}; "
            f"call apply_regime(model, {name!r}, {regime!r}) first."
        )
    return groups


def optimizer(model: nn.Module, name: str, regime: str, cfg: dict) -> torch.optim.Optimizer:
    """The regime's optimiser from its settings ``cfg`` (``config.resolve``): one learning rate (``lr``) or
    one per group (``lr_backbone``, ``lr_head``), weight decay, and momentum for SGD."""
    lr = cfg["lr"] if "lr" in cfg else {"backbone": cfg["lr_backbone"], "head": cfg["lr_head"]}
    return make_optimizer(param_groups(model, name, regime), name=cfg["optimizer"], lr=lr,
                          weight_decay=cfg["weight_decay"], momentum=cfg["momentum"])


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def param_table(name: str, num_classes: int) -> list[dict]:
    """[{"model", "regime", "trainable", "total"}] for every regime (random init on the meta device)."""
    with torch.device("meta"):
        model = build_model(name, num_classes, pretrained=False)
    rows = []
    for regime in REGIMES:
        trainable, total = count_params(apply_regime(model, name, regime))
        rows.append({"model": name, "regime": regime, "trainable": trainable, "total": total})
    return rows


def frozen_prefix(model: nn.Module, name: str, regime: str) -> tuple[nn.Module, nn.Module]:
    """(prefix, rest) sharing `model`'s modules, with rest(prefix(x)) == model(x).

    The prefix holds exactly the parameters `regime` freezes, so its outputs can be cached once;
    call it in eval mode (AlexNet's classifier dropout sits in the linear-probe prefix). The backbone
    record's stages (``Backbone.stages``) split at its ``partial_split`` (partial) or its ``head`` (linear_probe):
    partial: AlexNet features[:10] | features[10:]..classifier; DeiT up to blocks[:-1] | blocks[-1]+norm+head.
    linear_probe: everything up to the embedding | head. "full" has no frozen prefix (ValueError).
    """
    record = backbone(name)
    _check_regime(regime)
    if regime == "full":
        raise ValueError("regime='full' trains every parameter, so there is no frozen prefix; use the model itself.")
    prefix, rest = split_stages(model, record, record.head if regime == "linear_probe" else record.partial_split)
    return nn.Sequential(*prefix), rest[0] if len(rest) == 1 else nn.Sequential(*rest)
