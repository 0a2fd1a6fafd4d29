"""The feature cache: a frozen backbone's embeddings, computed once and reused.

The frozen SVM, the linear probe without augmentation, the classical classifiers and the
embedding figures all read embeddings of the same images through the same frozen weights.
They are stored as float16 ``.npy`` files keyed by a content hash of everything upstream
(weights identity, embedding kind, the split's files, preprocessing), so any change there
computes them anew and nothing else does. Writes are atomic. AlexNet's penultimate embedding
is derived from its cached pooled one, so both cost one backbone pass per image.

The partial fine-tune without augmentation trains on cached activations of the frozen
prefix (:func:`prefix_splits`) instead of running that prefix again every epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import models, regimes, training
from .results import atomic_write_bytes


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (identifies a weights file or a fine-tuned checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    """A stable hash of the parts that determine an embedding (order of keyword arguments is irrelevant)."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:24]


def split_digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def cached(cache_dir: str | Path | None, key: str, compute: Callable[[], np.ndarray],
           log: Callable[[str], Any] = print) -> np.ndarray:
    """Load the array stored under ``key`` or compute, store (float16) and return it (float32)."""
    if cache_dir is None:
        return np.asarray(compute(), dtype=np.float32)
    path = Path(cache_dir) / "features" / f"{key}.npy"
    if path.exists():
        log(f"feature cache hit: {path.name}")
        return np.asarray(np.load(path, mmap_mode="r"), dtype=np.float32)
    array = np.asarray(compute(), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, array.astype(np.float16))
    atomic_write_bytes(path, buf.getvalue())
    log(f"feature cache stored: {path.name} {tuple(array.shape)}")
    # Return what a later cache hit returns, so a run gives the same numbers either way.
    return array.astype(np.float16).astype(np.float32)


class FeatureSplit:
    """Cached embeddings standing in for a data split when training a head on them."""

    def __init__(self, features: np.ndarray, labels: torch.Tensor, soft: torch.Tensor | None = None):
        self.images = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        self.labels = labels
        self.soft = soft

    def __len__(self) -> int:
        return len(self.labels)


def identity(batch: torch.Tensor, train: bool) -> torch.Tensor:
    """The 'preprocessing' of cached features: none."""
    return batch


def activations(fn: Callable[[torch.Tensor], torch.Tensor], split: Any, *, preprocess: training.Preprocess,
                batch_size: int, device: str | torch.device, cache_dir: str | Path | None = None,
                key: str | None = None, log: Callable[[str], Any] = print, progress: bool = False) -> np.ndarray:
    """``fn``'s outputs over ``split`` as float32 ``[N, *output shape]``, from the cache under ``key`` if given.

    A module ``fn`` is moved to ``device`` and put in eval mode (as :func:`training.extract` does).
    """
    if isinstance(fn, nn.Module):
        fn.to(device).eval()
    shape: list[int] = []

    def run(x: torch.Tensor) -> torch.Tensor:
        out = fn(x)
        shape[:] = out.shape[1:]
        return out

    def compute() -> np.ndarray:
        flat = training.extract(run, split, preprocess=preprocess, batch_size=batch_size, device=device,
                                progress=progress)
        return flat.reshape(len(flat), *shape)

    return cached(cache_dir if key is not None else None, key or "", compute, log=log)


def embeddings(net: nn.Module, model: str, kind: str, splits: Mapping[str, Any], *, weights_id: str | None,
               cache_dir: str | Path | None, preprocess: training.Preprocess, batch_size: int,
               device: str | torch.device, context: Mapping[str, Any] | None = None,
               log: Callable[[str], Any] = print, progress: bool = False) -> dict[str, np.ndarray]:
    """Embeddings ``kind`` (see :data:`models.EMBEDDINGS`) of each split through ``net`` in eval mode.

    With a ``weights_id`` (what identifies ``net``'s weights) and a ``cache_dir`` they are read from
    the cache or stored there, keyed by model, weights, kind, the split's files, ``repr(preprocess)``
    and ``context`` (e.g. dataset and label rule); AlexNet's ``penultimate`` is then computed from the
    cached ``pooled`` embedding through ``classifier[:6]``, without a second backbone pass.
    """
    models.check_name(model)
    net.to(device)
    cacheable = weights_id is not None and cache_dir is not None
    common = dict(preprocess=preprocess, batch_size=batch_size, device=device, log=log, progress=progress)
    if cacheable and model == "alexnet" and kind == "penultimate":
        pooled = embeddings(net, model, "pooled", splits, weights_id=weights_id, cache_dir=cache_dir,
                            context=context, **common)

        def tail(x: torch.Tensor) -> torch.Tensor:
            was_training = net.training
            net.eval()
            try:
                return net.classifier[:6](x)
            finally:
                net.train(was_training)

        return {name: training.extract(tail, FeatureSplit(pooled[name], split.labels), preprocess=identity,
                                       batch_size=batch_size, device=device)
                for name, split in splits.items()}
    out = {}
    for name, split in splits.items():
        key = cache_key(model=model, weights=weights_id, kind=kind, files=split_digest(split.files),
                        preprocess=repr(preprocess), **(context or {})) if cacheable else None
        out[name] = activations(lambda x: models.embed(net, model, x, kind), split, cache_dir=cache_dir, key=key,
                                **common)
    return out


def prefix_splits(net: nn.Module, model: str, regime: str, splits: Mapping[str, Any], *,
                  weights_id: str | None, cache_dir: str | Path | None, preprocess: training.Preprocess,
                  batch_size: int, device: str | torch.device, context: Mapping[str, Any] | None = None,
                  log: Callable[[str], Any] = print, progress: bool = False
                  ) -> tuple[dict[str, FeatureSplit], nn.Module]:
    """Activations of ``regime``'s frozen prefix (:func:`regimes.frozen_prefix`) per split, and the module to train.

    Returns ``({split name: FeatureSplit of flattened activations}, module)`` where ``module`` is
    ``Unflatten -> rest``: it holds ``net``'s own trainable modules, so training it with
    :func:`training.fit` (``preprocess=identity``) trains ``net``. Valid only without augmentation:
    the prefix sees every image once, through ``preprocess`` in eval mode. Cached like
    :func:`embeddings` (float16 on disk) when ``weights_id`` and ``cache_dir`` are given.
    """
    if not splits:
        raise ValueError("prefix_splits needs at least one split, e.g. {'train': data.train, 'val': data.val}")
    prefix, rest = regimes.frozen_prefix(net, model, regime)
    cacheable = weights_id is not None and cache_dir is not None
    out, shape = {}, None
    for name, split in splits.items():
        key = cache_key(model=model, weights=weights_id, kind=f"{regime}_prefix", files=split_digest(split.files),
                        preprocess=repr(preprocess), **(context or {})) if cacheable else None
        acts = activations(prefix, split, preprocess=preprocess, batch_size=batch_size, device=device,
                           cache_dir=cache_dir, key=key, log=log, progress=progress)
        shape = acts.shape[1:]
        out[name] = FeatureSplit(acts.reshape(len(acts), -1), split.labels, split.soft)
    return out, nn.Sequential(nn.Unflatten(1, shape), rest)
