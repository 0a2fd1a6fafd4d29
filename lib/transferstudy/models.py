"""The two backbones of the study (AlexNet, DeiT-Base) with a fresh head, their embeddings, device and AMP.

`build_model` loads ImageNet weights the library's usual way (torchvision / timm), from a local
state-dict file (`weights_path`), or not at all (`pretrained=False`). `embed` returns the features the
book's classical classifiers use; `head` returns the classification layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn
from torchvision.models import AlexNet_Weights

MODELS = ("alexnet", "deit_base")
EMBEDDINGS = {"alexnet": ("pooled", "penultimate"), "deit_base": ("cls",)}
EMBEDDING_DIMS = {("alexnet", "pooled"): 9216, ("alexnet", "penultimate"): 4096, ("deit_base", "cls"): 768}
DEFAULT_EMBEDDING = {"alexnet": "penultimate", "deit_base": "cls"}

_IMAGENET_CLASSES = 1000
_ALEXNET_URL = AlexNet_Weights.IMAGENET1K_V1.url
_DEIT_ARCH = "deit_base_patch16_224"
_DEIT_HF_HUB_ID = "timm/deit_base_patch16_224.fb_in1k"
_DEIT_URL = "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth"
_HEAD_KEYS = {"alexnet": "classifier.6.weight", "deit_base": "head.weight"}
_HOW_TO_SKIP = "To run without ImageNet weights, pass pretrained=False (CLI: `-p pretrained false`)."


class WeightsUnavailable(RuntimeError):
    """The ImageNet weights could not be downloaded or found in a cache; the message says what to place where."""


def check_name(name: str) -> None:
    """Raise ValueError unless `name` is one of MODELS."""
    if name not in MODELS:
        raise ValueError(f"Unknown model name={name!r}; choose one of {MODELS}.")


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
    (the architecture's own initialisation, as pretrained=False).
    """
    check_name(name)
    if init not in INITS:
        raise ValueError(f"init={init!r} is unknown; choose one of {INITS}.")
    if init == "random":
        if weights_path is not None:
            raise ValueError(f"weights_path={str(weights_path)!r} was given with init='random', which would not "
                             "read it; drop weights_path, or use init='imagenet' / 'stats'.")
        return build_model(name, num_classes, pretrained=False)
    if init == "stats":
        if not pretrained:
            raise ValueError("init='stats' draws from the ImageNet tensors' statistics; it needs pretrained=True "
                             "(and weights_path offline). For the architecture's own initialisation use init='random'.")
        from .reuse import stats_init

        model = build_model(name, num_classes, pretrained=True, weights_path=weights_path)
        return stats_init(model, {k: v.detach().clone() for k, v in model.state_dict().items()}, seed)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if weights_path is not None:
        if not pretrained:
            raise ValueError(
                f"weights_path={str(weights_path)!r} was given with pretrained=False; "
                "drop weights_path for a random init, or set pretrained=True to load it."
            )
        return _from_file(name, num_classes, Path(weights_path))
    if not pretrained:
        return _architecture(name, num_classes)
    if name == "alexnet":
        model = _architecture(name, _IMAGENET_CLASSES)
        model.load_state_dict(_download_alexnet())
        _replace_head(model, name, num_classes)
        return model
    try:
        return timm.create_model(_DEIT_ARCH, pretrained=True, num_classes=num_classes)
    except Exception as error:  # any download/cache failure: hub offline, HTTP, missing file
        raise WeightsUnavailable(_deit_help(error)) from error


def _architecture(name: str, num_classes: int) -> nn.Module:
    """Randomly initialised architecture with a `num_classes`-way head."""
    if name == "alexnet":
        return torchvision.models.alexnet(weights=None, num_classes=num_classes)
    return timm.create_model(_DEIT_ARCH, pretrained=False, num_classes=num_classes)


def _replace_head(model: nn.Module, name: str, num_classes: int) -> None:
    """Swap the classification layer for a freshly initialised `num_classes`-way Linear."""
    if name == "alexnet":
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    else:
        model.reset_classifier(num_classes)


def _download_alexnet() -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 state dict from the torch hub cache, downloading it if absent."""
    try:
        return torch.hub.load_state_dict_from_url(
            _ALEXNET_URL, progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except Exception as error:  # URLError, HTTPError, hash mismatch, corrupt cache file
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_ALEXNET_URL)
        raise WeightsUnavailable(
            f"AlexNet ImageNet weights are unavailable ({type(error).__name__}: {error}). "
            f"Download {_ALEXNET_URL} and place it as {target} (torch.hub.get_dir()/checkpoints/), "
            f"or pass weights_path=<that file>. {_HOW_TO_SKIP}"
        ) from error


def _deit_help(error: Exception) -> str:
    try:
        from huggingface_hub import constants

        cache = f" ({constants.HF_HUB_CACHE})"
    except ImportError:
        cache = ""
    return (
        f"DeiT-Base ImageNet weights are unavailable ({type(error).__name__}: {error}). "
        f"Put the timm hub repo {_DEIT_HF_HUB_ID!r} in the Hugging Face cache{cache}, e.g. "
        f"`hf download {_DEIT_HF_HUB_ID}` on a machine with network and copy the cache over; "
        f"or download {_DEIT_URL} (deit_base_patch16_224-b5f2ef4d.pth) and pass weights_path=<that file>. "
        "Without network, set HF_HUB_OFFLINE=1 so the hub fails at once instead of retrying. "
        f"{_HOW_TO_SKIP}"
    )


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


def _from_file(name: str, num_classes: int, path: Path) -> nn.Module:
    """Build `name` from the state dict at `path`, replacing a 1000-class ImageNet head."""
    state = _read_state_dict(path)
    head_weight = state.get(_HEAD_KEYS[name])
    rows = num_classes if head_weight is None else head_weight.shape[0]
    if rows not in (num_classes, _IMAGENET_CLASSES):
        raise ValueError(
            f"weights_path {str(path)!r} has a {rows}-class head ({_HEAD_KEYS[name]}); expected the "
            f"{_IMAGENET_CLASSES}-class ImageNet head or num_classes={num_classes}."
        )
    model = _architecture(name, rows)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights_path {str(path)!r} does not match {name}: missing keys {_few(result.missing_keys)}, "
            f"unexpected keys {_few(result.unexpected_keys)}. Pass a state dict of the {name} model."
        )
    if rows != num_classes:
        _replace_head(model, name, num_classes)
    return model


def _few(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def head(model: nn.Module, name: str) -> nn.Linear:
    """The classification layer: AlexNet `classifier[6]`, DeiT `head`."""
    check_name(name)
    return model.classifier[6] if name == "alexnet" else model.head


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


class _DeiTPreLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def extractor(model: nn.Module, name: str, kind: str | None = None) -> nn.Module:
    """A module computing `embed`'s features from the layers they need (shared with `model`, not copied).

    What a frozen-feature bundle exports: AlexNet's "pooled" extractor is the 2.5M-parameter conv
    trunk, not the whole 57M-parameter network; DeiT's is the whole network (its head is 7,690
    parameters). The layers keep the model's current train/eval mode.
    """
    check_name(name)
    kind = DEFAULT_EMBEDDING[name] if kind is None else kind
    if kind not in EMBEDDINGS[name]:
        raise ValueError(f"Unknown kind={kind!r} for model {name!r}; choose one of {EMBEDDINGS[name]}.")
    if name == "deit_base":
        return _DeiTPreLogits(model)
    layers = [model.features, model.avgpool, nn.Flatten(1)]
    return nn.Sequential(*layers, *(model.classifier[:6] if kind == "penultimate" else []))


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
    """Whether ``name`` gets channels-last input batches: AlexNet, whose convolutions run faster so on
    CUDA and on CPU too (oneDNN; about 1.4x for the frozen forward on the 2-core dev machine)."""
    check_name(name)
    return name == "alexnet"


@contextlib.contextmanager
def autocast(device: torch.device | str) -> Iterator[None]:
    """Mixed precision for the forward pass: fp16 autocast on CUDA, plain fp32 elsewhere (never bf16 on CPU)."""
    if torch.device(device).type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            yield
    else:
        yield
