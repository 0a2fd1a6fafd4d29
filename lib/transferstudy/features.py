"""The feature cache: a frozen backbone's embeddings, computed once and reused.

The frozen SVM, the linear probe without augmentation, the classical classifiers and the
embedding figures all read embeddings of the same images through the same frozen weights.
They are stored as float16 ``.npy`` files keyed by a content hash of everything upstream
(weights identity, embedding kind, the split's files, preprocessing), so any change there
computes them anew and nothing else does. Writes are atomic. AlexNet's penultimate embedding
is derived from its cached pooled one, so both cost one backbone pass per image.

Every ``features/<key>.npy`` has a checksum record ``feature-records/<key>.json`` beside the
``features`` folder (its SHA-256, byte size, shape and dtype; written after the array, each file
atomically). A cache hit reads the file once into memory, hashing it as it goes, and uses it only
when size, hash, shape and dtype all match the record (and the row count matches the split): nothing
is memory-mapped. A file that does not match, or has no record (one stored before the records
existed, or whose record write was interrupted), is damaged: a line naming its path is logged, the
file and its record are deleted and the features are computed and stored again.

The partial fine-tune without augmentation trains on cached activations of the frozen
prefix (:func:`prefix_splits`) instead of running that prefix again every epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import models, regimes, training
from .results import atomic_write_bytes, file_digest  # file_digest: the weights id of a file (session, notebook 05)


def cache_key(**parts: Any) -> str:
    """A stable hash of the parts that determine an embedding (order of keyword arguments is irrelevant)."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:24]


def split_digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


RECORDS = "feature-records"  # the checksum records' folder, beside ``features/`` in the cache folder
_RECORD_FORMAT = 1
_STORED = np.dtype(np.float16)
_CHUNK = 1 << 22


class _Damaged(Exception):
    """A cache file that cannot be trusted; the message says why."""


def record_path(cache_dir: str | Path, key: str) -> Path:
    """Where the checksum record of the cache file under ``key`` lives."""
    return Path(cache_dir) / RECORDS / f"{key}.json"


def cached(cache_dir: str | Path | None, key: str, compute: Callable[[], np.ndarray],
           log: Callable[[str], Any] = print, *, rows: int | None = None) -> np.ndarray:
    """Load the array stored under ``key`` or compute, store (float16) and return it (float32).

    A stored array is used only if it matches its checksum record (size, SHA-256, shape, dtype) and,
    given ``rows``, has that many rows; otherwise it is logged as damaged (with its path), deleted
    with its record, and computed and stored again.
    """
    if cache_dir is None:
        return np.asarray(compute(), dtype=np.float32)
    path = Path(cache_dir) / "features" / f"{key}.npy"
    record = record_path(cache_dir, key)
    if path.exists() or record.exists():
        try:
            stored = _read_verified(path, record, rows)
        except _Damaged as exc:
            log(f"feature cache damaged: {path}: {exc}; deleted it and its record, computing the features again")
            path.unlink(missing_ok=True)
            record.unlink(missing_ok=True)
        else:
            log(f"feature cache hit: {path.name}")
            return stored.astype(np.float32)
    array = np.asarray(compute(), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, array.astype(_STORED))
    payload = buf.getvalue()
    meta = {"format": _RECORD_FORMAT, "file": path.name, "sha256": hashlib.sha256(payload).hexdigest(),
            "bytes": len(payload), "shape": list(array.shape), "dtype": _STORED.name}
    record.unlink(missing_ok=True)  # a new array is never paired with an old record, even if this write stops here
    atomic_write_bytes(path, payload)
    atomic_write_bytes(record, (json.dumps(meta, indent=1) + "\n").encode())
    log(f"feature cache stored: {path.name} {tuple(array.shape)}")
    # Return what a later cache hit returns, so a run gives the same numbers either way.
    return array.astype(_STORED).astype(np.float32)


def _read_record(record: Path) -> dict[str, Any]:
    try:
        meta = json.loads(record.read_text())
        if not isinstance(meta, dict) or meta.get("format") != _RECORD_FORMAT:
            raise ValueError(f"not a format-{_RECORD_FORMAT} record")
        digest, size, shape, dtype = meta["sha256"], meta["bytes"], meta["shape"], meta["dtype"]
        if not (isinstance(digest, str) and len(digest) == 64 and isinstance(size, int) and size >= 0
                and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(dtype, str)):
            raise ValueError("sha256, bytes, shape or dtype is malformed")
    except (OSError, ValueError, KeyError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _Damaged(f"its checksum record {record} is unreadable ({exc})") from None
    return meta


def _read_verified(path: Path, record: Path, rows: int | None) -> np.ndarray:
    """The array in ``path`` if its bytes are what ``record`` describes; raises ``_Damaged`` otherwise.

    The file is read into memory once, hashed chunk by chunk on the way; the array is a view of exactly
    the bytes that were hashed.
    """
    if not path.is_file():
        raise _Damaged(f"the array file is missing but its checksum record {record} exists")
    if not record.is_file():
        raise _Damaged(f"it has no checksum record ({record}; stored before records existed, or its write was "
                       "interrupted), so it cannot be verified")
    meta = _read_record(record)
    size = path.stat().st_size
    if size != meta["bytes"]:
        raise _Damaged(f"it has {size} bytes, its record says {meta['bytes']} (truncated or altered)")
    buf = bytearray(size)
    view = memoryview(buf)
    hasher, got = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while got < size and (n := fh.readinto(view[got:got + _CHUNK])):
            hasher.update(view[got:got + n])
            got += n
        more = fh.read(1)
    view.release()
    if got != size or more:
        raise _Damaged(f"it changed size while being read (expected {size} bytes)")
    if hasher.hexdigest() != meta["sha256"]:
        raise _Damaged(f"its sha256 is {hasher.hexdigest()[:16]}..., its record says {meta['sha256'][:16]}... "
                       "(altered or corrupted on disk)")
    header = io.BytesIO(bytes(buf[:1 << 16]))
    try:
        version = np.lib.format.read_magic(header)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran_order, dtype = read_header(header)
    except ValueError as exc:
        raise _Damaged(f"it is not a readable .npy file ({exc})") from None
    expected = (tuple(meta["shape"]), meta["dtype"])
    if (shape, dtype.name) != expected or dtype != _STORED or fortran_order:
        raise _Damaged(f"it holds {dtype.name} {shape}{' (Fortran order)' if fortran_order else ''}, its record "
                       f"says {expected[1]} {expected[0]} and the cache stores {_STORED.name} in C order")
    count = math.prod(shape)
    if header.tell() + count * dtype.itemsize != size:
        raise _Damaged(f"its {size} bytes do not fit a {dtype.name} array of shape {shape}")
    if rows is not None and (not shape or shape[0] != rows):
        raise _Damaged(f"it holds {shape[0] if shape else 0} rows, the split has {rows} images")
    return np.frombuffer(buf, dtype=dtype, count=count, offset=header.tell()).reshape(shape)


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

    return cached(cache_dir if key is not None else None, key or "", compute, log=log, rows=len(split.images))


def embeddings(net: nn.Module, model: str, kind: str, splits: Mapping[str, Any], *, weights_id: str | None,
               cache_dir: str | Path | None, preprocess: training.Preprocess, batch_size: int,
               device: str | torch.device, context: Mapping[str, Any] | None = None,
               log: Callable[[str], Any] = print, progress: bool = False) -> dict[str, np.ndarray]:
    """Embeddings ``kind`` (see :data:`models.EMBEDDINGS`) of each split through ``net`` in eval mode.

    With a ``weights_id`` (what identifies ``net``'s weights) and a ``cache_dir`` they are read from
    the cache or stored there, keyed by model, weights, kind, the split's files, ``repr(preprocess)``
    and ``context`` (e.g. dataset and label rule); a kind derived from another (``models.Embedding.derived_from``:
    AlexNet's ``penultimate``) is then computed from that kind's cached embedding through its ``tail``
    (``classifier[:6]``), without a second backbone pass.
    """
    embedding = models.backbone(model).embeddings.get(kind)
    net.to(device)
    cacheable = weights_id is not None and cache_dir is not None
    common = dict(preprocess=preprocess, batch_size=batch_size, device=device, log=log, progress=progress)
    if cacheable and embedding is not None and embedding.derived_from is not None:
        source = embeddings(net, model, embedding.derived_from, splits, weights_id=weights_id, cache_dir=cache_dir,
                            context=context, **common)
        layers = embedding.tail(net)

        def tail(x: torch.Tensor) -> torch.Tensor:
            was_training = net.training
            net.eval()
            try:
                return layers(x)
            finally:
                net.train(was_training)

        return {name: training.extract(tail, FeatureSplit(source[name], split.labels), preprocess=identity,
                                       batch_size=batch_size, device=device)
                for name, split in splits.items()}
    out = {}
    for name, split in splits.items():
        key = cache_key(model=model, weights=weights_id, kind=kind, files=split_digest(split.files),
                        preprocess=repr(preprocess), **(context or {})) if cacheable else None
        out[name] = activations(lambda x: models.embed(net, model, x, kind), split, cache_dir=cache_dir, key=key,
                                **common)
    return out


def probes(net: nn.Module, model: str, splits: Mapping[str, Any], *, weights_id: str | None,
           cache_dir: str | Path | None, preprocess: training.Preprocess, batch_size: int,
           device: str | torch.device, context: Mapping[str, Any] | None = None,
           log: Callable[[str], Any] = print) -> dict[str, dict[str, np.ndarray]]:
    """{split: {probe point: [N, d]}}: the features at every probe point of ``net`` (``reuse.probe_points``), all
    of them from ONE forward pass per image (``reuse.collect``). Cached like :func:`embeddings`, as one
    [N, sum of the probes' d] array per split (float16 on disk) when ``weights_id`` and ``cache_dir`` are given;
    when every split comes from the cache, one image goes through ``net`` to learn the probes' widths."""
    from . import reuse

    net.to(device)
    cacheable = weights_id is not None and cache_dir is not None
    dims: dict[str, int] = {}
    flat = {}
    for name, split in splits.items():
        key = cache_key(model=model, weights=weights_id, kind="probes", files=split_digest(split.files),
                        preprocess=repr(preprocess), **(context or {})) if cacheable else None

        def compute(split: Any = split) -> np.ndarray:
            batches = (x for x, _ in training.eval_batches(split, preprocess=preprocess, batch_size=batch_size,
                                                           device=device))
            got = reuse.collect(net, model, batches)
            dims.update({layer: x.shape[1] for layer, x in got.items()})
            return np.concatenate(list(got.values()), axis=1)

        flat[name] = cached(cache_dir if key is not None else None, key or "", compute, log=log, rows=len(split.labels))
    if not dims:  # every split was a cache hit
        one = next(training.eval_batches(next(iter(splits.values())), preprocess=preprocess, batch_size=1,
                                         device=device))
        dims = {layer: x.shape[1] for layer, x in reuse.collect(net, model, [one[0]]).items()}
    ends = np.cumsum([0, *dims.values()])
    out = {}
    for name, array in flat.items():
        if array.shape[1] != ends[-1]:
            raise ValueError(f"probe features of {name} have {array.shape[1]} columns, the probes {ends[-1]}")
        out[name] = {layer: array[:, a:b] for layer, a, b in zip(dims, ends[:-1], ends[1:])}
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
