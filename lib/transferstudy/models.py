"""The study's backbones (AlexNet, DeiT-Base) with a fresh head, their embeddings, device and AMP.

Everything the library knows about a backbone is one :class:`Backbone` record in :data:`BACKBONES` (as timm's
``PretrainedCfg``): how to build it, where its ImageNet weights come from, its head, its embeddings, its forward
pass as a sequence of stages (where the regimes split it), the layers the feature-reuse analysis probes, and the
benchmark's and figures' facts. The rest of the library reads the records; adding a backbone is adding a record.

`build_model` loads ImageNet weights the library's usual way (torchvision / timm), from a local
state-dict file (`weights_path`), or not at all (`pretrained=False`). `embed` returns the features the
book's classical classifiers use; `head` returns the classification layer.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import timm
import torch
import torchvision
from torch import nn
from torchvision.models import AlexNet_Weights

IMAGENET_CLASSES = 1000
_HOW_TO_SKIP = "To run without ImageNet weights, pass pretrained=False (CLI: `-p pretrained false`)."


class WeightsUnavailable(RuntimeError):
    """The ImageNet weights could not be downloaded or found in a cache; the message says what to place where."""


# ----------------------------------------------------------------------------- the record
Stages = Callable[[nn.Module], list[tuple[str, nn.Module]]]


@dataclass(frozen=True)
class Embedding:
    """One kind of features of a backbone: its size, and the module computing it from the network's layers.

    ``extractor(model)`` returns a module sharing ``model``'s layers (what a frozen-feature bundle saves, so its
    structure is part of the bundle format). A kind computed from another kind's cached features names that kind
    in ``derived_from`` and the layers in between as ``tail(model)`` (AlexNet's penultimate: pooled -> fc6, fc7),
    so the feature cache stores one backbone pass for both.
    """

    dim: int
    extractor: Callable[[nn.Module], nn.Module]
    derived_from: str | None = None
    tail: Callable[[nn.Module], nn.Module] | None = None


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's ImageNet weights come from.

    ``url``: a state-dict file (offline users download it and pass ``weights_path``; torchvision's loader reads
    it through torch hub's cache). ``hub_id``: the Hugging Face hub repo timm reads, and ``timm_name`` the timm
    architecture it is loaded into (None for a torchvision backbone).
    """

    url: str
    hub_id: str | None = None
    timm_name: str | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class Backbone:
    """Everything the library knows about one backbone (one entry of :data:`BACKBONES`).

    Module paths are dotted names as ``nn.Module.get_submodule`` takes them; :func:`module_at` also takes a
    negative index (``blocks.-1``: the last block, whatever the depth) or a slice (``features.:10``).

    * ``architecture(num_classes)``: the randomly initialised network with a ``num_classes``-way head;
      ``imagenet(record, num_classes)``: the network with ImageNet weights and a fresh head, raising
      :class:`WeightsUnavailable` with what to place where (:func:`torch_hub_imagenet`, :func:`timm_imagenet`).
    * ``head``: the path of the classification ``nn.Linear`` (its ``.weight`` is the state-dict key that tells an
      ImageNet checkpoint from a fine-tuned one); ``reset_head(model, num_classes)`` swaps it for a fresh one
      (None: a new ``nn.Linear`` at ``head``).
    * ``embeddings``: {kind: :class:`Embedding`} in order, the head's input last; ``default_embedding``.
    * ``stages(model)``: the forward pass as (state-key prefix, module) steps sharing ``model``'s modules, whose
      composition is ``model(x)``. The regimes split it: linear_probe trains from ``head`` on, partial from
      ``partial_split`` on (its ``partial_head`` gets the head's learning rate, the rest the backbone's).
    * ``probes`` / ``units``: the feature-reuse layers (:func:`transferstudy.reuse.probe_points`, ``units``),
      {name: path}; in a network of ``depth`` repeated blocks under ``blocks`` (None: none), entries with ``{n}``
      (1-based) and ``{i}`` (0-based) repeat per block, a run of consecutive such entries together.
    * ``channels_last``: input batches in channels-last memory format; ``largest_layer`` and
      ``min_forward_peak_fraction``: the benchmark's layer with the most FLOPs and its forward-speed target;
      ``image_sizes``: the input sizes the network takes (None: any the schema allows); ``colour``: figures.
    """

    name: str
    label: str
    architecture: Callable[[int], nn.Module]
    weights: WeightSource
    imagenet: Callable[[Backbone, int], nn.Module]
    head: str
    reset_head: Callable[[nn.Module, int], None] | None = None
    embeddings: Mapping[str, Embedding]
    default_embedding: str
    stages: Stages
    partial_split: str
    partial_head: str
    probes: Mapping[str, str]
    units: Mapping[str, str]
    blocks: str | None = None
    depth: int | None = None
    channels_last: bool = False
    largest_layer: str
    min_forward_peak_fraction: float
    image_sizes: tuple[int, ...] | None = None
    colour: str = "#777777"

    def __post_init__(self) -> None:
        for name in ("embeddings", "probes", "units"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        if self.default_embedding not in self.embeddings:
            raise ValueError(f"{self.name}: default_embedding={self.default_embedding!r} is not one of "
                             f"{tuple(self.embeddings)}.")
        for kind, emb in self.embeddings.items():
            if (emb.derived_from is None) != (emb.tail is None) or emb.derived_from not in (None, *self.embeddings):
                raise ValueError(f"{self.name}: embedding {kind!r} needs both derived_from (another kind) and tail, "
                                 "or neither.")
        if (self.blocks is None) != (self.depth is None):
            raise ValueError(f"{self.name}: give blocks and depth together (a network of repeated blocks) or neither.")

    @property
    def head_key(self) -> str:
        """The state-dict key of the head's weight, whose rows are the checkpoint's classes."""
        return f"{self.head}.weight"

    @property
    def dims(self) -> dict[str, int]:
        """{embedding kind: its size}."""
        return {kind: emb.dim for kind, emb in self.embeddings.items()}

    def stored_kind(self, kind: str) -> str:
        """The kind whose backbone pass the feature cache stores for ``kind``: itself, or the kind it derives from."""
        return self.embeddings[kind].derived_from or kind

    def probe_points(self, depth: int | None = None) -> dict[str, str]:
        """``probes`` for a network of ``depth`` blocks (default: the record's)."""
        return _expand(self.probes, self.depth if depth is None else depth)

    def unit_paths(self, depth: int | None = None) -> dict[str, str]:
        """``units`` for a network of ``depth`` blocks (default: the record's)."""
        return _expand(self.units, self.depth if depth is None else depth)

    def depth_of(self, model: nn.Module) -> int | None:
        """How many blocks ``model`` has (None for a network without ``blocks``)."""
        return None if self.blocks is None else len(model.get_submodule(self.blocks))

    def keys_depth(self, keys: Iterable[str]) -> int | None:
        """How many blocks a state with these keys has (None for a network without ``blocks``)."""
        if self.blocks is None:
            return None
        pattern = re.compile(rf"{re.escape(self.blocks)}\.(\d+)\.")
        found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
        if not found:
            raise ValueError(f"the state has no '{self.blocks}.N.*' keys, so it is not a {self.label} state; "
                             "check model_name.")
        return max(found) + 1


def _expand(table: Mapping[str, str], depth: int | None) -> dict[str, str]:
    """``table`` with each run of consecutive ``{n}`` / ``{i}`` entries repeated for blocks 1..depth, in order."""
    out: dict[str, str] = {}
    run: list[tuple[str, str]] = []

    def flush() -> None:
        for i in range(depth or 0):
            out.update((k.format(n=i + 1, i=i), p.format(n=i + 1, i=i)) for k, p in run)
        run.clear()

    for key, path in table.items():
        if "{" in key:
            run.append((key, path))
        else:
            flush()
            out[key] = path
    flush()
    return out


_INDEX = re.compile(r"-?\d+")
_SLICE = re.compile(r"(-?\d*):(-?\d*)")


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` ("" is ``model``); a part that is a negative index or a slice indexes an
    ``nn.Sequential`` / ``nn.ModuleList`` (``blocks.-1``, ``features.:10``)."""
    module = model
    for part in path.split(".") if path else []:
        if (m := _SLICE.fullmatch(part)) and isinstance(module, (nn.Sequential, nn.ModuleList)):
            start, stop = (int(v) if v else None for v in m.groups())
            module = module[start:stop]
        elif _INDEX.fullmatch(part) and isinstance(module, (nn.Sequential, nn.ModuleList)):
            module = module[int(part)]
        elif part in module._modules and module._modules[part] is not None:
            module = module._modules[part]
        else:
            raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (path {path!r}).")
    return module


def split_stages(model: nn.Module, record: Backbone, path: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """``record.stages(model)``'s modules before and from the stage that is the module at ``path``."""
    target = module_at(model, path)
    modules = [module for _, module in record.stages(model)]
    for i, module in enumerate(modules):
        if module is target:
            return modules[:i], modules[i:]
    raise ValueError(f"{record.name}: {path!r} is not one of the stages of its forward pass; a split point must "
                     "be a stage (Backbone.stages).")


# ----------------------------------------------------------------------------- building and weights
def torchvision_alexnet(num_classes: int) -> nn.Module:
    return torchvision.models.alexnet(weights=None, num_classes=num_classes)


def timm_architecture(timm_name: str, num_classes: int) -> nn.Module:
    """``timm.create_model(timm_name)``, randomly initialised, with a ``num_classes``-way head."""
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes)


def torch_hub_imagenet(record: Backbone, num_classes: int) -> nn.Module:
    """ImageNet weights the torchvision way: the state dict at ``record.weights.url`` from the torch hub cache
    (downloading it if absent) into ``record.architecture``, then a fresh ``num_classes``-way head."""
    model = record.architecture(IMAGENET_CLASSES)
    model.load_state_dict(_download(record))
    _replace_head(model, record, num_classes)
    return model


def timm_imagenet(record: Backbone, num_classes: int) -> nn.Module:
    """ImageNet weights the timm way: ``timm.create_model(record.weights.timm_name, pretrained=True)`` from the
    Hugging Face hub or its cache, with a fresh ``num_classes``-way head."""
    try:
        return timm.create_model(record.weights.timm_name, pretrained=True, num_classes=num_classes)
    except Exception as error:  # any download/cache failure: hub offline, HTTP, missing file
        raise WeightsUnavailable(_hub_help(record, error)) from error


def timm_reset_head(model: nn.Module, num_classes: int) -> None:
    """timm's own head swap, which keeps the model's ``num_classes`` and configuration in step."""
    model.reset_classifier(num_classes)


def _download(record: Backbone) -> dict[str, torch.Tensor]:
    """The state dict at ``record.weights.url`` from the torch hub cache, downloading it if absent."""
    url = record.weights.url
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, map_location="cpu",
                                                  weights_only=True)
    except Exception as error:  # URLError, HTTPError, hash mismatch, corrupt cache file
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        raise WeightsUnavailable(
            f"{record.label} ImageNet weights are unavailable ({type(error).__name__}: {error}). "
            f"Download {url} and place it as {target} (torch.hub.get_dir()/checkpoints/), "
            f"or pass weights_path=<that file>. {_HOW_TO_SKIP}"
        ) from error


def _hub_help(record: Backbone, error: Exception) -> str:
    try:
        from huggingface_hub import constants

        cache = f" ({constants.HF_HUB_CACHE})"
    except ImportError:
        cache = ""
    hub_id, url = record.weights.hub_id, record.weights.url
    return (
        f"{record.label} ImageNet weights are unavailable ({type(error).__name__}: {error}). "
        f"Put the timm hub repo {hub_id!r} in the Hugging Face cache{cache}, e.g. "
        f"`hf download {hub_id}` on a machine with network and copy the cache over; "
        f"or download {url} ({os.path.basename(url)}) and pass weights_path=<that file>. "
        "Without network, set HF_HUB_OFFLINE=1 so the hub fails at once instead of retrying. "
        f"{_HOW_TO_SKIP}"
    )


# ----------------------------------------------------------------------------- AlexNet's layers
def _alexnet_pooled(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.features, model.avgpool, nn.Flatten(1))


def _alexnet_penultimate(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.features, model.avgpool, nn.Flatten(1), *model.classifier[:6])


def _alexnet_fc67(model: nn.Module) -> nn.Module:
    return model.classifier[:6]


def _alexnet_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return ([(f"features.{i}", m) for i, m in enumerate(model.features)] + [("avgpool", model.avgpool),
            ("", nn.Flatten(1))] + [(f"classifier.{i}", m) for i, m in enumerate(model.classifier)])


# ----------------------------------------------------------------------------- timm ViT (DeiT) layers
class _DeiTPreLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class _ViTTokens(nn.Module):
    """A timm ViT's class token and position embedding on the patch tokens, then pos_drop, patch_drop, norm_pre."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if model.cls_token is None or model.reg_token is not None or model.no_embed_class or model.dynamic_img_size:
            raise ValueError("the stages of a ViT support the stock DeiT token layout only (one class token, no "
                             "register tokens, a fixed image size).")
        self.cls_token, self.pos_embed = model.cls_token, model.pos_embed
        self.pos_drop, self.patch_drop, self.norm_pre = model.pos_drop, model.patch_drop, model.norm_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))


class _ViTPool(nn.Module):
    """timm's CLS-token pooling (global_pool='token'), fc_norm and head_drop."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if model.global_pool != "token" or model.attn_pool is not None:
            raise ValueError("the stages of a ViT support DeiT's CLS-token pooling (global_pool='token') only.")
        self.fc_norm, self.head_drop = model.fc_norm, model.head_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_drop(self.fc_norm(x[:, 0]))


def _vit_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return ([("patch_embed", model.patch_embed), ("", _ViTTokens(model))]
            + [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
            + [("norm", model.norm), ("", _ViTPool(model)), ("head", model.head)])


# ----------------------------------------------------------------------------- the records
_DEIT_TIMM = "deit_base_patch16_224"

BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone(
        name="alexnet", label="AlexNet",
        architecture=torchvision_alexnet,
        weights=WeightSource(AlexNet_Weights.IMAGENET1K_V1.url),
        imagenet=torch_hub_imagenet,
        head="classifier.6",
        embeddings={"pooled": Embedding(9216, _alexnet_pooled),
                    "penultimate": Embedding(4096, _alexnet_penultimate, derived_from="pooled", tail=_alexnet_fc67)},
        default_embedding="penultimate",
        stages=_alexnet_stages,
        partial_split="features.10",  # conv5 on; fc6 and fc7 take the head's learning rate
        partial_head="classifier",
        probes={"pool1": "features.2", "pool2": "features.5", "relu3": "features.7", "relu4": "features.9",
                "pool5": "features.12", "fc6": "classifier.2", "fc7": "classifier.5"},
        units={"conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8",
               "conv5": "features.10", "fc6": "classifier.1", "fc7": "classifier.4", "head": "classifier.6"},
        # its convolutions run faster so on CUDA and on CPU too (oneDNN; ~1.4x for the frozen forward, 2 cores)
        channels_last=True,
        largest_layer="features.3", min_forward_peak_fraction=0.60,
        colour="#c8553d",
    ),
    Backbone(
        name="deit_base", label="DeiT-Base",
        architecture=functools.partial(timm_architecture, _DEIT_TIMM),
        weights=WeightSource("https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
                             hub_id="timm/deit_base_patch16_224.fb_in1k", timm_name=_DEIT_TIMM),
        imagenet=timm_imagenet,
        head="head", reset_head=timm_reset_head,
        embeddings={"cls": Embedding(768, _DeiTPreLogits)},
        default_embedding="cls",
        stages=_vit_stages,
        partial_split="blocks.-1",  # the last block, the final norm and the head
        partial_head="head",
        probes={"embed.cls": "norm_pre", "embed.mean": "norm_pre",
                "block{n}.cls": "blocks.{i}", "block{n}.mean": "blocks.{i}"},
        units={"patch_embed": "patch_embed", "cls_token": "cls_token", "pos_embed": "pos_embed",
               "block{n}": "blocks.{i}", "norm": "norm", "head": "head"},
        blocks="blocks", depth=12,
        largest_layer="blocks.0.mlp.fc1", min_forward_peak_fraction=0.85,
        image_sizes=(224,),
        colour="#4878a8",
    ),
)}

# Views of the records for the code that imports them, taken at import: the library's functions read BACKBONES
# itself (and `backbone(name)`), so a record added later works through them.
MODELS = tuple(BACKBONES)
EMBEDDINGS = {name: tuple(b.embeddings) for name, b in BACKBONES.items()}
EMBEDDING_DIMS = {(name, kind): dim for name, b in BACKBONES.items() for kind, dim in b.dims.items()}
DEFAULT_EMBEDDING = {name: b.default_embedding for name, b in BACKBONES.items()}


def backbone(name: str) -> Backbone:
    """The record of backbone ``name``; ValueError naming the choices for an unknown one."""
    check_name(name)
    return BACKBONES[name]


def check_name(name: str) -> None:
    """Raise ValueError unless `name` is one of the backbones (:data:`BACKBONES`)."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown model name={name!r}; choose one of {tuple(BACKBONES)}.")


INITS = ("imagenet", "stats", "random")


def build_model(
    name: str, num_classes: int, *, pretrained: bool = True, weights_path: str | Path | None = None,
    init: str = "imagenet", seed: int = 0,
) -> nn.Module:
    """Build `name` with a fresh `num_classes`-way head.

    pretrained=True: ImageNet weights from torchvision / timm (download or their caches), unless
    `weights_path` names a local state dict (ImageNet 1000-class head, or an already `num_classes`-way
    fine-tuned one, loaded as is). pretrained=False: random init, no file or network access.
    `init` says what the network starts from: "imagenet" (those weights: weight transfer), "stats"
    (statistics transfer: every tensor re-drawn from a normal with the mean and std of its ImageNet
    tensor, norm layers at their defaults, drawn with `seed`; see `reuse.stats_init`) or "random"
    (the architecture's own initialisation, as pretrained=False). With pretrained=False, "stats" draws
    from the statistics of the random initialisation instead, as a build without ImageNet weights must.
    """
    record = backbone(name)
    if init not in INITS:
        raise ValueError(f"init={init!r} is unknown; choose one of {INITS}.")
    if init == "random":
        if weights_path is not None:
            raise ValueError(f"weights_path={str(weights_path)!r} was given with init='random', which would not "
                             "read it; drop weights_path, or use init='imagenet' / 'stats'.")
        return build_model(name, num_classes, pretrained=False)
    if init == "stats":
        from .reuse import stats_init

        model = build_model(name, num_classes, pretrained=pretrained, weights_path=weights_path)
        return stats_init(model, {k: v.detach().clone() for k, v in model.state_dict().items()}, seed)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if weights_path is not None:
        if not pretrained:
            raise ValueError(
                f"weights_path={str(weights_path)!r} was given with pretrained=False; "
                "drop weights_path for a random init, or set pretrained=True to load it."
            )
        return _from_file(record, num_classes, Path(weights_path))
    if not pretrained:
        return record.architecture(num_classes)
    return record.imagenet(record, num_classes)


def _replace_head(model: nn.Module, record: Backbone, num_classes: int) -> None:
    """Swap the classification layer for a freshly initialised `num_classes`-way Linear."""
    if record.reset_head is not None:
        record.reset_head(model, num_classes)
        return
    old = model.get_submodule(record.head)
    parent, _, leaf = record.head.rpartition(".")
    new = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
    setattr(model.get_submodule(parent), leaf, new.train(old.training))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict (.pth/.pt via torch.load, or .safetensors), unwrapping {"model"|"state_dict": ...}."""
    if not path.is_file():
        raise FileNotFoundError(f"weights_path {str(path)!r} does not exist or is not a file.")
    hint = "save one with torch.save(model.state_dict(), path)"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # unpickling, truncated or foreign file formats
        raise ValueError(
            f"weights_path {str(path)!r} is not a readable state dict ({type(error).__name__}); {hint}."
        ) from error
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"weights_path {str(path)!r} holds a {type(state).__name__}, not a state dict; {hint}.")
    return state


def _from_file(record: Backbone, num_classes: int, path: Path) -> nn.Module:
    """Build ``record``'s network from the state dict at `path`, replacing a 1000-class ImageNet head."""
    state = _read_state_dict(path)
    head_weight = state.get(record.head_key)
    rows = num_classes if head_weight is None else head_weight.shape[0]
    if rows not in (num_classes, IMAGENET_CLASSES):
        raise ValueError(
            f"weights_path {str(path)!r} has a {rows}-class head ({record.head_key}); expected the "
            f"{IMAGENET_CLASSES}-class ImageNet head or num_classes={num_classes}."
        )
    model = record.architecture(rows)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights_path {str(path)!r} does not match {record.name}: missing keys {_few(result.missing_keys)}, "
            f"unexpected keys {_few(result.unexpected_keys)}. Pass a state dict of the {record.name} model."
        )
    if rows != num_classes:
        _replace_head(model, record, num_classes)
    return model


def _few(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def head(model: nn.Module, name: str) -> nn.Linear:
    """The classification layer (the record's ``head`` path): AlexNet `classifier[6]`, DeiT `head`."""
    return model.get_submodule(backbone(name).head)


def embed(model: nn.Module, name: str, x: torch.Tensor, kind: str | None = None) -> torch.Tensor:
    """Features of images `x` ([B, 3, 224, 224]) as [B, EMBEDDING_DIMS[(name, kind)]].

    AlexNet "pooled": features -> avgpool -> flatten; "penultimate" (default): the input of
    classifier[6]. DeiT "cls" (default): the CLS pre-logits. Runs in eval mode (dropout off) and
    restores the model's mode; wrap in torch.inference_mode() when no gradients are needed.
    """
    was_training = model.training
    model.eval()
    try:
        return extractor(model, name, kind)(x)
    finally:
        model.train(was_training)


def extractor(model: nn.Module, name: str, kind: str | None = None) -> nn.Module:
    """A module computing `embed`'s features from the layers they need (shared with `model`, not copied).

    What a frozen-feature bundle exports: AlexNet's "pooled" extractor is the 2.5M-parameter conv
    trunk, not the whole 57M-parameter network; DeiT's is the whole network (its head is 7,690
    parameters). The layers keep the model's current train/eval mode.
    """
    record = backbone(name)
    kind = record.default_embedding if kind is None else kind
    if kind not in record.embeddings:
        raise ValueError(f"Unknown kind={kind!r} for model {name!r}; choose one of {tuple(record.embeddings)}.")
    return record.embeddings[kind].extractor(model)


def select_device(preference: str = "auto") -> torch.device:
    """"auto": CUDA when available, else CPU; "cpu" / "cuda" force one (cuda must be available)."""
    choices = ("auto", "cpu", "cuda")
    if preference not in choices:
        raise ValueError(f"Unknown device preference={preference!r}; choose one of {choices}.")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device preference='cuda' but no CUDA device is available; use 'auto' or 'cpu'.")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def channels_last(name: str) -> bool:
    """Whether ``name`` gets channels-last input batches (the record's ``channels_last``): AlexNet, whose
    convolutions run faster so on CUDA and on CPU too (oneDNN; about 1.4x for the frozen forward on the 2-core
    dev machine)."""
    return backbone(name).channels_last


@contextlib.contextmanager
def autocast(device: torch.device | str) -> Iterator[None]:
    """Mixed precision for the forward pass: fp16 autocast on CUDA, plain fp32 elsewhere (never bf16 on CPU)."""
    if torch.device(device).type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            yield
    else:
        yield
