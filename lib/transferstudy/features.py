"""The feature cache: a frozen backbone's embeddings, computed once and reused.

The frozen SVM, the linear probe without augmentation, the classical classifiers and the
embedding figures all read embeddings of the same images through the same frozen weights.
They are stored as float16 ``.npy`` files keyed by a content hash of everything upstream
(weights identity, embedding kind, the split's files, preprocessing), so any change there
computes them anew and nothing else does. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

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
