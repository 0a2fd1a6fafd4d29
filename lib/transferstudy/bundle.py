"""Inference bundles, as the original study exported them, and `transferstudy predict`.

A fine-tuned bundle holds ``checkpoint.pt`` (the best-on-val state dict), ``model.torchscript.pt``,
``classes.json`` and ``meta.json``. An SVM bundle holds ``extractor.torchscript.pt`` (the frozen
feature extractor), ``classifier.skops`` (the fitted StandardScaler + SVM pipeline, in skops'
safe format rather than pickle), ``classes.json`` and ``meta.json``. ``meta.json`` records the
preprocessing: RGB -> [0, 1] -> resize/crop to 224 -> ImageNet mean/std.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessor
from .results import atomic_write_bytes, write_json

FINETUNED, SVM = "finetuned", "svm"
# Types of our own that an SVM bundle may hold besides scikit-learn's (which skops trusts).
TRUSTED_TYPES = {"transferstudy.classical.ClippedPCA"}


class BundleError(ValueError):
    """A bundle folder or image that cannot be used."""


def _save_torchscript(module: Callable[[torch.Tensor], torch.Tensor] | nn.Module, path: Path,
                      example: torch.Tensor) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated upstream, and is still what the study shipped
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    atomic_write_bytes(path, buf.getvalue())


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _meta(kind: str, model: str, classes: tuple[str, ...], preprocess: Preprocessor, extra: dict) -> dict:
    return {"kind": kind, "model": model, "classes": list(classes),
            "preprocessing": {"color": "RGB", "scale": "[0, 1]", "size": preprocess.size, "mode": preprocess.mode,
                              "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, **extra}


class _Embedder(nn.Module):
    """A traceable wrapper around an embedding function of a model."""

    def __init__(self, net: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.net, self.fn = net, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def export_finetuned(bundle_dir: Path, net: nn.Module, model: str, classes: tuple[str, ...],
                     preprocess: Preprocessor, extra: dict[str, Any]) -> Path:
    """Write a fine-tuned model's bundle; returns the checkpoint path."""
    bundle_dir = Path(bundle_dir)
    net = net.eval().cpu()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    atomic_write_bytes(bundle_dir / "checkpoint.pt", buf.getvalue())
    _save_torchscript(net, bundle_dir / "model.torchscript.pt", torch.zeros(1, 3, preprocess.size, preprocess.size))
    write_json(bundle_dir / "classes.json", list(classes))
    write_json(bundle_dir / "meta.json", _meta(FINETUNED, model, classes, preprocess, extra))
    return bundle_dir / "checkpoint.pt"


def export_svm(bundle_dir: Path, net: nn.Module, embed: Callable[[torch.Tensor], torch.Tensor], pipeline: Any,
               model: str, classes: tuple[str, ...], preprocess: Preprocessor, extra: dict[str, Any]) -> None:
    """Write a frozen-features + SVM bundle."""
    import skops.io as sio

    bundle_dir = Path(bundle_dir)
    net = net.eval().cpu()
    example = torch.zeros(1, 3, preprocess.size, preprocess.size)
    _save_torchscript(_Embedder(net, embed).eval(), bundle_dir / "extractor.torchscript.pt", example)
    atomic_write_bytes(bundle_dir / "classifier.skops", sio.dumps(pipeline))
    write_json(bundle_dir / "classes.json", list(classes))
    write_json(bundle_dir / "meta.json", _meta(SVM, model, classes, preprocess, extra))


def load_finetuned(bundle_dir: Path, model: str, num_classes: int) -> nn.Module:
    """The fine-tuned network of a bundle, from its checkpoint (weights only, no pickled code)."""
    from .models import build_model

    checkpoint = Path(bundle_dir) / "checkpoint.pt"
    if not checkpoint.exists():
        raise BundleError(f"{checkpoint} is missing: run the fine-tune first "
                          f"(transferstudy run --only '*/{model}/full'), or pass its run folder as source_dir")
    net = build_model(model, num_classes, pretrained=False)
    net.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return net.eval()


def _load_images(paths: list[str | Path]) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as img:
                arrays.append(np.asarray(img.convert("RGB")))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
            raise BundleError(f"cannot read image {path}: {exc}; pass image files (JPEG, PNG, ...)") from exc
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:  # different sizes: resize each to the first one's size before batching
        h, w = arrays[0].shape[:2]
        arrays = [np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR)) for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_meta(bundle_dir: Path) -> dict:
    meta_file = Path(bundle_dir) / "meta.json"
    if not meta_file.exists():
        raise BundleError(f"{bundle_dir} is not a bundle (no meta.json); bundles are written to "
                          f"<run folder>/bundle by the partial, full and frozen_svm notebooks")
    return json.loads(meta_file.read_text())


def predict_files(bundle_dir: str | Path, images: list[str | Path]) -> list[dict[str, Any]]:
    """Classify image files on CPU with a bundle: class name and probability (SVMs: decision margin)."""
    bundle_dir = Path(bundle_dir)
    meta = load_meta(bundle_dir)
    pre = meta["preprocessing"]
    x = Preprocessor(size=pre["size"], mode=pre["mode"])(_load_images(images), False)
    classes = meta["classes"]
    with torch.no_grad():
        if meta["kind"] == FINETUNED:
            scripted = _jit_load(bundle_dir / "model.torchscript.pt")
            probs = scripted(x).softmax(1).numpy()
            pred = probs.argmax(1)
            score = probs[np.arange(len(pred)), pred]
            score_name = "probability"
        else:
            import skops.io as sio

            extractor = _jit_load(bundle_dir / "extractor.torchscript.pt")
            skops_file = bundle_dir / "classifier.skops"
            untrusted = set(sio.get_untrusted_types(file=skops_file)) - TRUSTED_TYPES
            if untrusted:
                raise BundleError(f"{skops_file} contains types this project did not write: "
                                  f"{sorted(untrusted)}; refusing to load it")
            pipeline = sio.load(skops_file, trusted=sorted(TRUSTED_TYPES))
            feats = extractor(x).numpy()
            pred = pipeline.predict(feats)
            margins = pipeline.decision_function(feats)
            score = margins[np.arange(len(pred)), pred] if margins.ndim == 2 else np.abs(margins)
            score_name = "margin"
    return [{"image": str(path), "class": classes[int(p)], score_name: float(s)}
            for path, p, s in zip(images, pred, score)]
