"""Inference bundles, as the original study exported them, and `transferstudy predict`.

A fine-tuned bundle holds ``checkpoint.pt`` (the best-on-val state dict), ``model.torchscript.pt``,
``classes.json`` and ``meta.json``. An SVM bundle holds ``extractor.pt`` (the state dict of the frozen
feature extractor, :func:`transferstudy.models.extractor`: only the layers the features need),
``extractor.torchscript.pt`` (the same extractor as TorchScript), ``classifier.skops`` (the fitted
StandardScaler + SVM pipeline, in skops' safe format rather than pickle), ``classes.json`` and
``meta.json``, which also names the embedding and holds the temperature that turns the SVM's margins
into probabilities (fitted on the validation split). ``meta.json`` records the preprocessing: RGB ->
[0, 1] -> resize/crop to ``size`` -> mean/std.

:func:`open_bundle` (what ``predict`` uses) trusts data, not code: by default it rebuilds the network or
extractor in this library's own architecture from the state dict (``torch.load(weights_only=True)``).
The TorchScript files are programs; they are loaded only with ``trust_torchscript=True``
(``transferstudy predict --trust-torchscript``). Before use a bundle is checked against itself:
``classes.json`` against ``meta.json``, the network's output size and the classifier's ``classes_``
against the classes, the extractor's output size against the classifier's input, and the recorded
preprocessing against what the network runs on. Each image is read, preprocessed and classified on its
own, so its answer never depends on the other images passed with it.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .classical import margin_probabilities, margin_temperature
from .preprocess import Preprocessor
from .results import atomic_write_bytes, write_json, write_state_dict

FINETUNED, SVM = "finetuned", "svm"
WEIGHTS = {FINETUNED: "checkpoint.pt", SVM: "extractor.pt"}
TORCHSCRIPT = {FINETUNED: "model.torchscript.pt", SVM: "extractor.torchscript.pt"}
# Types of our own that an SVM bundle may hold besides scikit-learn's (which skops trusts).
TRUSTED_TYPES = {"transferstudy.classical.ClippedPCA"}
# The preprocessing steps predict implements; meta.json must record exactly these.
_FIXED_PREPROCESSING = {"color": "RGB", "scale": "[0, 1]"}
_TRUST_HINT = ("Or pass --trust-torchscript (predict_files(..., trust_torchscript=True)) to run the bundle's "
               "TorchScript instead, only for a bundle from a source you trust: TorchScript is code")


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
    """Load TorchScript: this runs the code in the file; callers only do so with trust_torchscript."""
    if not path.is_file():
        raise BundleError(f"{path} is missing; re-export the bundle (rerun its run with --force)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _meta(kind: str, model: str, classes: tuple[str, ...], preprocess: Preprocessor, extra: dict) -> dict:
    return {"kind": kind, "model": model, "classes": list(classes),
            "preprocessing": {**_FIXED_PREPROCESSING, "size": preprocess.size, "mode": preprocess.mode,
                              "mean": list(preprocess.mean), "std": list(preprocess.std)}, **extra}


def export_finetuned(bundle_dir: Path, net: nn.Module, model: str, classes: tuple[str, ...],
                     preprocess: Preprocessor, extra: dict[str, Any]) -> Path:
    """Write a fine-tuned model's bundle; returns the checkpoint path."""
    bundle_dir = Path(bundle_dir)
    net = net.eval().cpu()
    write_state_dict(bundle_dir / WEIGHTS[FINETUNED], net.state_dict())
    _save_torchscript(net, bundle_dir / TORCHSCRIPT[FINETUNED],
                      torch.zeros(1, 3, preprocess.size, preprocess.size))
    write_json(bundle_dir / "classes.json", list(classes))
    write_json(bundle_dir / "meta.json", _meta(FINETUNED, model, classes, preprocess, extra))
    return bundle_dir / WEIGHTS[FINETUNED]


def export_svm(bundle_dir: Path, extractor: nn.Module, pipeline: Any, model: str, classes: tuple[str, ...],
               preprocess: Preprocessor, extra: dict[str, Any], X_val: np.ndarray, y_val: np.ndarray) -> None:
    """Write a frozen-features + SVM bundle; ``extractor`` is :func:`transferstudy.models.extractor`
    of a ``len(classes)``-way ``model`` (``predict`` rebuilds it from its weights, so no other module will do).

    The validation split's features and labels fit the margin temperature that ``predict`` uses.
    """
    import skops.io as sio

    bundle_dir = Path(bundle_dir)
    extractor = extractor.eval().cpu()
    embedding = _embedding_of(extractor, model, len(classes))
    temperature = margin_temperature(pipeline, X_val, y_val)
    write_state_dict(bundle_dir / WEIGHTS[SVM], extractor.state_dict())
    example = torch.zeros(1, 3, preprocess.size, preprocess.size)
    _save_torchscript(extractor, bundle_dir / TORCHSCRIPT[SVM], example)
    atomic_write_bytes(bundle_dir / "classifier.skops", sio.dumps(pipeline))
    write_json(bundle_dir / "classes.json", list(classes))
    write_json(bundle_dir / "meta.json", _meta(SVM, model, classes, preprocess,
                                               {**extra, "embedding": embedding, "margin_temperature": temperature}))


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _embedding_of(extractor: nn.Module, model: str, num_classes: int) -> str:
    """Which ``models.extractor(net, model, kind)`` of a ``num_classes``-way net ``extractor`` is."""
    from . import models

    models.check_name(model)
    shapes = _shapes(extractor)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        net = models.build_model(model, num_classes, pretrained=False)
    for kind in models.EMBEDDINGS[model]:
        if _shapes(models.extractor(net, model, kind)) == shapes:
            return kind
    raise ValueError(f"export_svm: the extractor is not transferstudy.models.extractor(net, {model!r}, kind) of a "
                     f"{num_classes}-class {model} for any kind in {models.EMBEDDINGS[model]}; predict rebuilds "
                     f"the extractor from its weights, so pass models.extractor(net, model, embedding)")


def _read_state_dict(path: Path, missing_hint: str) -> dict[str, torch.Tensor]:
    """A state dict read as data only (``weights_only=True``: no pickled code runs)."""
    if not path.is_file():
        raise BundleError(f"{path} is missing: {missing_hint}")
    try:
        with warnings.catch_warnings():  # torch.load's "dispatching to torch.jit.load": with weights_only it refuses
            warnings.filterwarnings("ignore", message=".*TorchScript archive", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated file, a TorchScript or foreign file
        raise BundleError(f"{path} is not a readable state dict ({type(exc).__name__}: {exc}); "
                          f"re-export the bundle (rerun its run with --force)") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise BundleError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; "
                          f"re-export the bundle (rerun its run with --force)")
    return state


def _few(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)``, with an error that lists what does not fit."""
    expected = _shapes(module)
    problems = []
    if missing := sorted(expected.keys() - state.keys()):
        problems.append(f"missing {_few(missing)}")
    if unexpected := sorted(state.keys() - expected.keys()):
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong := [f"{k} {tuple(state[k].shape)} (expected {v})" for k, v in expected.items()
                 if k in state and tuple(state[k].shape) != v]:
        problems.append(f"wrong shape {_few(wrong)}")
    if problems:
        raise BundleError(f"{path} does not fit {what}: {'; '.join(problems)}")
    module.load_state_dict(state)


def _finetuned_from(checkpoint: Path, model: str, num_classes: int, asked: str) -> nn.Module:
    """The ``num_classes``-way network of ``checkpoint``; ``asked`` says where ``num_classes`` came from."""
    from .models import build_model, head

    state = _read_state_dict(checkpoint, f"run the fine-tune first (transferstudy run --only '*/{model}/full'), "
                                         f"or pass its run folder as source_dir")
    net = build_model(model, num_classes, pretrained=False)
    layer = head(net, model)
    head_key = next(name for name, module in net.named_modules() if module is layer) + ".weight"
    if head_key in state and state[head_key].shape[0] != num_classes:
        raise BundleError(f"{checkpoint}: the model's output size is {state[head_key].shape[0]} classes "
                          f"({head_key} {tuple(state[head_key].shape)}), but {asked}; "
                          f"the checkpoint and the classes must come from the same run")
    _load_into(net, state, checkpoint, f"a {num_classes}-class {model}")
    return net.eval()


def load_finetuned(bundle_dir: Path, model: str, num_classes: int) -> nn.Module:
    """The fine-tuned network of a bundle, from its checkpoint (weights only, no pickled code)."""
    return _finetuned_from(Path(bundle_dir) / WEIGHTS[FINETUNED], model, num_classes,
                           f"num_classes={num_classes} was asked for")


def _read_image(path: str | Path, gray: bool = False) -> torch.Tensor:
    """One image file as a uint8 ``[3, H, W]`` tensor at its own size, through the library's one image reader:
    RGB, or (``gray``, for a network trained on gray images such as FERPlus) its luma in all three channels."""
    from .data import DataError, read_image

    try:
        pixels = torch.from_numpy(np.array(read_image(Path(path), gray=gray)))  # a writable copy
        return pixels.unsqueeze(0).expand(3, -1, -1) if gray else pixels
    except DataError as exc:
        raise BundleError(f"{exc}; pass image files (JPEG, PNG, ...)") from exc


def _bundle_dir(path: Path) -> Path:
    """``path`` if it is a bundle folder; otherwise an error that points at the bundle meant."""
    if (path / "bundle" / "meta.json").is_file() and not (path / "classes.json").is_file():
        # a run folder: its own meta.json is the run's record, not a bundle's
        raise BundleError(f"{path} is a run folder, not a bundle; its bundle is {path / 'bundle'}: "
                          f"pass --bundle {path / 'bundle'}")
    if (path / "meta.json").is_file():
        return path
    if path.is_file() and (path.parent / "meta.json").is_file():
        raise BundleError(f"{path} is a file of a bundle; pass the bundle folder {path.parent}")
    if not path.exists():
        raise BundleError(f"bundle folder {path} does not exist; bundles are written to <run folder>/bundle "
                          f"by the partial, full and frozen_svm notebooks")
    raise BundleError(f"{path} is not a bundle (no meta.json); bundles are written to "
                      f"<run folder>/bundle by the partial, full and frozen_svm notebooks")


def load_meta(bundle_dir: Path) -> dict:
    """A bundle's ``meta.json``; a run folder or a file of a bundle is pointed at its bundle folder."""
    meta_file = _bundle_dir(Path(bundle_dir)) / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_file} is not readable JSON ({exc}); re-export the bundle") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_file} holds a {type(meta).__name__}, not an object; re-export the bundle")
    return meta


def _preprocessor(pre: Any, meta_file: Path) -> Preprocessor:
    """The eval preprocessing ``meta.json`` records, which must be one that predict implements."""
    keys = ("color", "scale", "size", "mode", "mean", "std")
    if not isinstance(pre, dict) or set(keys) - set(pre):
        raise BundleError(f"{meta_file}: 'preprocessing' must record {keys}, got {pre!r}; re-export the bundle")
    for key, value in _FIXED_PREPROCESSING.items():
        if pre[key] != value:
            raise BundleError(f"{meta_file}: preprocessing {key}={pre[key]!r}, but predict implements "
                              f"{key}={value!r} only")
    try:
        return Preprocessor(size=pre["size"], mode=pre["mode"], mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{meta_file}: the recorded preprocessing {pre} is not usable: {exc}") from exc


def _classes(bundle_dir: Path, meta: dict) -> list[str]:
    classes_file = bundle_dir / "classes.json"
    if not classes_file.is_file():
        raise BundleError(f"{classes_file} is missing; re-export the bundle")
    try:
        classes = json.loads(classes_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{classes_file} is not readable JSON ({exc}); re-export the bundle") from exc
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)):
        raise BundleError(f"{classes_file} must list at least 2 distinct class names, got {classes!r}")
    if classes != meta.get("classes"):
        raise BundleError(f"{classes_file} lists {len(classes)} classes {classes}, but {bundle_dir / 'meta.json'} "
                          f"records {meta.get('classes')!r}; the two must be the same list, in the same order")
    return classes


def _output_size(network: nn.Module, size: int, path: Path) -> int:
    """The feature / logit count ``network`` gives for one image at the recorded preprocessing size."""
    try:
        with torch.inference_mode():
            out = network(torch.zeros(1, 3, size, size))
    except Exception as exc:  # a size the architecture cannot take (DeiT-Base: 224 only), a broken program
        raise BundleError(f"{path} does not run on the recorded preprocessing (meta.json size {size}): "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        raise BundleError(f"{path} gives {getattr(out, 'shape', type(out).__name__)} for one image, "
                          f"not [1, n]; re-export the bundle")
    return int(out.shape[1])


@dataclass
class Bundle:
    """A bundle checked against itself, ready to classify images one by one (:meth:`classify`)."""

    path: Path
    kind: str
    model: str
    classes: list[str]
    preprocess: Preprocessor
    network: nn.Module  # fine-tuned: the whole network; svm: the feature extractor
    pipeline: Any = None
    temperature: float | None = None
    gray: bool = False  # trained on gray images (meta.json "input"): colour files are read as their luma

    def classify(self, image: torch.Tensor) -> tuple[int, float]:
        """Index into :attr:`classes` and its probability for one uint8 ``[C, H, W]`` image, alone."""
        x = self.preprocess(image.unsqueeze(0), False)
        with torch.inference_mode():
            out = self.network(x)
        if self.kind == FINETUNED:
            probs = out.softmax(1)[0]
            index = int(probs.argmax())
            return index, float(probs[index])
        feats = out.numpy()
        index = int(self.pipeline.predict(feats)[0])
        probs = margin_probabilities(self.pipeline, feats, self.temperature)[0]
        return index, float(probs[np.searchsorted(self.pipeline.classes_, index)])


def _load_pipeline(skops_file: Path, n_classes: int) -> Any:
    import skops.io as sio

    if not skops_file.is_file():
        raise BundleError(f"{skops_file} is missing; re-export the bundle")
    untrusted = set(sio.get_untrusted_types(file=skops_file)) - TRUSTED_TYPES
    if untrusted:
        raise BundleError(f"{skops_file} contains types this project did not write: "
                          f"{sorted(untrusted)}; refusing to load it")
    pipeline = sio.load(skops_file, trusted=sorted(TRUSTED_TYPES))
    labels = np.asarray(getattr(pipeline, "classes_", []))
    if labels.ndim != 1 or len(labels) < 2 or labels.dtype.kind not in "iu":
        raise BundleError(f"{skops_file}: the classifier's classes_ {labels.tolist()} are not class indices "
                          f"into classes.json; re-export the bundle")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise BundleError(f"{skops_file}: the classifier's classes_ {labels.tolist()} are not all indices into "
                          f"the {n_classes} classes of classes.json; the classifier and classes.json must come "
                          f"from the same run")
    return pipeline


def open_bundle(bundle_dir: str | Path, *, trust_torchscript: bool = False) -> Bundle:
    """Load a bundle on CPU and check it against itself (see the module's docstring).

    By default the network (fine-tuned) or feature extractor (SVM) is rebuilt in this library's
    architecture from its state dict, read as data only; ``trust_torchscript=True`` runs the bundle's
    TorchScript instead (code, so only for a bundle from a source you trust). An SVM whose ``classes_``
    are some of the indices into ``classes.json``, not all, is accepted: it never saw the others.
    """
    from . import models

    bundle_dir = _bundle_dir(Path(bundle_dir))
    meta = load_meta(bundle_dir)
    meta_file = bundle_dir / "meta.json"
    kind, model = meta.get("kind"), meta.get("model")
    if kind not in (FINETUNED, SVM):
        raise BundleError(f"{meta_file}: kind={kind!r} is unknown; a bundle is {FINETUNED!r} or {SVM!r}")
    if model not in models.MODELS:
        raise BundleError(f"{meta_file}: model={model!r} is unknown; this library builds {models.MODELS}")
    classes = _classes(bundle_dir, meta)
    preprocess = _preprocessor(meta.get("preprocessing"), meta_file)
    source = bundle_dir / (TORCHSCRIPT if trust_torchscript else WEIGHTS)[kind]
    if not trust_torchscript and not source.is_file():
        what = ("the fine-tuned network" if kind == FINETUNED else
                "the feature extractor (a bundle written before extractors were saved as weights has its "
                "extractor only as TorchScript; rerun its frozen_svm run with --force to re-export it)")
        raise BundleError(f"{source} is missing: predict rebuilds {what} from it. {_TRUST_HINT}")

    if kind == FINETUNED:
        network = (_jit_load(source).eval() if trust_torchscript else
                   _finetuned_from(source, model, len(classes), f"classes.json lists {len(classes)} classes"))
        outputs = _output_size(network, preprocess.size, source)
        if outputs != len(classes):
            raise BundleError(f"{source}: the model's output size is {outputs}, but classes.json lists "
                              f"{len(classes)} classes; the model and classes.json must come from the same run")
        return Bundle(bundle_dir, kind, model, classes, preprocess, network, gray=meta.get("input") == "gray")

    pipeline = _load_pipeline(bundle_dir / "classifier.skops", len(classes))
    temperature = meta.get("margin_temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise BundleError(f"{meta_file}: margin_temperature={temperature!r} must be a positive number; "
                          f"re-export the bundle")
    if trust_torchscript:
        network = _jit_load(source).eval()
    else:
        embedding = meta.get("embedding")
        if embedding not in models.EMBEDDINGS[model]:
            raise BundleError(f"{meta_file}: embedding={embedding!r} is not one of {model}'s "
                              f"{models.EMBEDDINGS[model]}; re-export the bundle")
        network = models.extractor(models.build_model(model, len(classes), pretrained=False), model, embedding)
        _load_into(network, _read_state_dict(source, "re-export the bundle"), source,
                   f"models.extractor(<{len(classes)}-class {model}>, {model!r}, {embedding!r})")
        network.eval()
    features = _output_size(network, preprocess.size, source)
    if features != pipeline.n_features_in_:
        raise BundleError(f"{source}: the extractor's output size is {features} features, but "
                          f"{bundle_dir / 'classifier.skops'} was fitted on {pipeline.n_features_in_}; "
                          f"the extractor and the classifier must come from the same run")
    return Bundle(bundle_dir, kind, model, classes, preprocess, network, pipeline, float(temperature),
                  gray=meta.get("input") == "gray")


def predict_files(bundle_dir: str | Path, images: list[str | Path], *,
                  trust_torchscript: bool = False) -> list[dict[str, Any]]:
    """Classify image files on CPU with a bundle: class name and its probability, each image on its own.

    SVM bundles: the softmax of the margins at the temperature fitted on the validation split.
    ``trust_torchscript``: see :func:`open_bundle`.
    """
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise BundleError(f"no such image file: {_few(missing)}; pass image files (JPEG, PNG, ...)")
    bundle = open_bundle(bundle_dir, trust_torchscript=trust_torchscript)
    rows = []
    for path in images:
        index, probability = bundle.classify(_read_image(path, bundle.gray))
        rows.append({"image": str(path), "class": bundle.classes[index], "probability": probability})
    return rows
