"""Inference bundles, as the original study exported them, and `transferstudy predict`.

A fine-tuned bundle holds ``checkpoint.pt`` (the best-on-val state dict), ``model.torchscript.pt``,
``classes.json`` and ``meta.json``. An SVM bundle holds ``extractor.torchscript.pt`` (the frozen
feature extractor, only the layers the features need), ``classifier.skops`` (the fitted
StandardScaler + SVM pipeline, in skops' safe format rather than pickle), ``classes.json`` and
``meta.json``, which also holds the temperature that turns the SVM's margins into probabilities
(fitted on the validation split). ``meta.json`` records the preprocessing: RGB -> [0, 1] ->
resize/crop to 224 -> ImageNet mean/std.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .classical import margin_probabilities, margin_temperature
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessor
from .results import atomic_write_bytes, write_json, write_state_dict

FINETUNED, SVM = "finetuned", "svm"
# Types of our own that an SVM bundle may hold besides scikit-learn's (which skops trusts).
TRUSTED_TYPES = {"transferstudy.classical.ClippedPCA"}


class BundleError(ValueError):
    """A bundle folder or image that cannot be used."""


def _save_torchscript(module: nn.Module, path: Path,
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


def export_finetuned(bundle_dir: Path, net: nn.Module, model: str, classes: tuple[str, ...],
                     preprocess: Preprocessor, extra: dict[str, Any]) -> Path:
    """Write a fine-tuned model's bundle; returns the checkpoint path."""
    bundle_dir = Path(bundle_dir)
    net = net.eval().cpu()
    write_state_dict(bundle_dir / "checkpoint.pt", net.state_dict())
    _save_torchscript(net, bundle_dir / "model.torchscript.pt", torch.zeros(1, 3, preprocess.size, preprocess.size))
    write_json(bundle_dir / "classes.json", list(classes))
    write_json(bundle_dir / "meta.json", _meta(FINETUNED, model, classes, preprocess, extra))
    return bundle_dir / "checkpoint.pt"


def export_svm(bundle_dir: Path, extractor: nn.Module, pipeline: Any, model: str, classes: tuple[str, ...],
               preprocess: Preprocessor, extra: dict[str, Any], X_val: np.ndarray, y_val: np.ndarray) -> None:
    """Write a frozen-features + SVM bundle; ``extractor`` is :func:`transferstudy.models.extractor`.

    The validation split's features and labels fit the margin temperature that ``predict`` uses.
    """
    import skops.io as sio

    bundle_dir = Path(bundle_dir)
    temperature = margin_temperature(pipeline, X_val, y_val)
    example = torch.zeros(1, 3, preprocess.size, preprocess.size)
    _save_torchscript(extractor.eval().cpu(), bundle_dir / "extractor.torchscript.pt", example)
    atomic_write_bytes(bundle_dir / "classifier.skops", sio.dumps(pipeline))
    write_json(bundle_dir / "classes.json", list(classes))
    write_json(bundle_dir / "meta.json", _meta(SVM, model, classes, preprocess,
                                               {**extra, "margin_temperature": temperature}))


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
    """Classify image files on CPU with a bundle: class name and its probability.

    SVM bundles: the softmax of the margins at the temperature fitted on the validation split.
    """
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
            probs = margin_probabilities(pipeline, feats, meta["margin_temperature"])
            score = probs[np.arange(len(pred)), np.searchsorted(pipeline.classes_, pred)]
    return [{"image": str(path), "class": classes[int(p)], "probability": float(s)}
            for path, p, s in zip(images, pred, score)]
