"""Dataset loading: CIFAR-10 and FERPlus as uint8 tensors at native size, with a fixed seeded split.

Files and labels are listed first (no decoding), the stratified 80/20 train/val split and the
optional subsets are drawn from the labels alone, and only then are the selected images decoded.
So a split depends on the labels and the seed only: it is the same for every model and regime.

Layouts, detected from ``data_dir`` (the dataset's own folder, e.g. ``data/cifar10``):

- CIFAR-10: ``train/<class>/*`` + ``test/<class>/*`` image folders, or torchvision's pickled
  ``cifar-10-batches-py/`` (``download=True`` fetches it through torchvision).
- FERPlus, Microsoft: ``FER2013Train|FER2013Valid|FER2013Test/`` with PNGs and ``label.csv``
  (votes turned into labels by a label rule). With ``val_source="split"`` val is 20% of
  FER2013Train and FER2013Valid is unused; with ``"official"`` val is FER2013Valid. Test is FER2013Test.
- FERPlus, Kaggle "FER2013Plus": ``train/<class>/`` + ``test/<class>/``, possibly one folder down
  (e.g. ``fer2013/train``); the folder names carry the (argmax) labels.

Resizing and normalising happen per batch elsewhere.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm  # plain bars: notebooks run under papermill, where widgets cannot render

DATASETS = ("cifar10", "ferplus")
CLASSES: dict[str, tuple[str, ...]] = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "ferplus": ("anger", "contempt", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"),
}
LABEL_RULES = ("majority", "argmax", "votes")
_VAL_SOURCES = ("split", "official")
_VAL_FRACTION = 0.2

# Microsoft's label.csv vote columns, in file order.
_FERPLUS_VOTE_COLUMNS = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF",
)
_FERPLUS_SPLIT_DIRS = {"train": "FER2013Train", "valid": "FER2013Valid", "test": "FER2013Test"}
# Kaggle-style class folder names (lower-cased) -> FERPlus class.
_FERPLUS_FOLDER_ALIASES = {
    "anger": "anger", "angry": "anger",
    "contempt": "contempt",
    "disgust": "disgust", "disgusted": "disgust",
    "fear": "fear", "fearful": "fear",
    "happiness": "happiness", "happy": "happiness",
    "neutral": "neutral", "neutrality": "neutral",
    "sadness": "sadness", "sad": "sadness",
    "surprise": "surprise", "surprised": "surprise",
}
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_PROGRESS_MIN_IMAGES = 2000
_DECODE_CHUNK = 512


class DataError(ValueError):
    """A dataset folder, file or argument that cannot be used; the message names it and the fix."""


@dataclass
class Split:
    """One split. ``images`` is None when loaded with ``decode=False``.

    ``images`` is uint8 [N, 3, H, W]; for grayscale data it is a stride-0 expanded view of one
    channel (index it or call ``.contiguous()`` before editing it in place). ``files`` are paths
    relative to data_dir; for torchvision's pickled CIFAR-10 they read ``cifar-10-batches-py/train#<i>``.
    """

    images: torch.Tensor | None
    labels: torch.Tensor
    soft: torch.Tensor | None
    files: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetSplits:
    """Train/val/test splits of one dataset, with the split's indices, hash and settings."""

    name: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    split_hash: str
    split_indices: dict[str, list[int]]
    info: dict


@dataclass
class _Pool:
    """A listing of one source split: files relative to data_dir, labels, optional soft targets.

    ``pixels`` holds already-decoded [N, H, W, 3] images (torchvision's pickled CIFAR-10).
    """

    files: list[str]
    labels: np.ndarray
    soft: np.ndarray | None = None
    pixels: np.ndarray | None = None


def load_dataset(
    name: str,
    data_dir: str | Path,
    *,
    label_rule: str | None = None,
    val_source: str = "split",
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 42,
    download: bool = False,
    decode: bool = True,
) -> DatasetSplits:
    """Load ``name`` from ``data_dir`` with a stratified, seeded split and optional subsets.

    label_rule: FERPlus only (ignored for CIFAR-10). None = the layout's natural rule:
      "majority" for Microsoft's label.csv, the folder (argmax) labels for the Kaggle folders.
    val_source: "split" = stratified 20% of the training pool; "official" = FER2013Valid
      (FERPlus Microsoft layout only).
    n_train/n_val/n_test: stratified subsets (None = all), drawn after the 80/20 split.
    download: CIFAR-10 only; fetch torchvision's copy into ``data_dir`` when no local copy exists.
    decode: False skips image decoding (``Split.images`` is None), for fast counts.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset name={name!r}; use one of {DATASETS}")
    if label_rule is not None and label_rule not in LABEL_RULES:
        raise DataError(f"unknown label_rule={label_rule!r}; use one of {LABEL_RULES} or None")
    if val_source not in _VAL_SOURCES:
        raise DataError(f"unknown val_source={val_source!r}; use one of {_VAL_SOURCES}")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise DataError(f"n_{split}={n!r} must be a positive int or None (= the whole split)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed={seed!r} must be a non-negative int")
    if download and name != "cifar10":
        raise DataError(f"download=True works for CIFAR-10 only; {name} needs a local copy: {_expected_layout(name)}")
    root = Path(data_dir).expanduser()
    if not root.is_dir() and not download:
        raise DataError(f"data_dir {root} does not exist. Expected {_expected_layout(name)}")

    if name == "cifar10":
        layout, pools = _cifar10_pools(root, download)
        rule = None
    else:
        layout, rule, pools = _ferplus_pools(root, label_rule)
    classes = CLASSES[name]

    train_pool = pools["train"]
    if val_source == "official":
        if "valid" not in pools:
            raise DataError(
                f"val_source='official' needs FERPlus in Microsoft's layout (FER2013Valid/), but {root} "
                f"holds {name} in the {layout!r} layout; use val_source='split'"
            )
        val_pool = pools["valid"]
        train_idx, val_idx = np.arange(len(train_pool.labels)), np.arange(len(val_pool.labels))
    else:
        val_pool = train_pool
        val_idx = _stratified_pick(train_pool.labels, _VAL_FRACTION, np.random.default_rng(seed))
        train_idx = np.setdiff1d(np.arange(len(train_pool.labels)), val_idx)
    test_pool = pools["test"]
    chosen = {"train": train_idx, "val": val_idx, "test": np.arange(len(test_pool.labels))}
    source = {"train": train_pool, "val": val_pool, "test": test_pool}

    for k, split in enumerate(("train", "val", "test"), start=1):
        idx, n = chosen[split], sizes[split]
        if len(idx) == 0:
            raise DataError(f"the {split} split of {root} is empty; the dataset has too few images to split")
        if n is not None:
            if n > len(idx):
                raise DataError(
                    f"n_{split}={n} is more than the {len(idx)} images of the {split} split of {root}; "
                    f"use at most {len(idx)} or None"
                )
            sub = _stratified_pick(source[split].labels[idx], n / len(idx), np.random.default_rng([seed, k]))
            chosen[split] = idx[sub]

    gray = name == "ferplus"
    splits = {s: _make_split(root, source[s], chosen[s], gray, decode, f"{name} {s}") for s in chosen}
    digest = hashlib.sha256(json.dumps({s: splits[s].files for s in splits}).encode()).hexdigest()[:16]
    return DatasetSplits(
        name=name,
        classes=classes,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        split_hash=digest,
        split_indices={s: chosen[s].tolist() for s in chosen},
        info={
            "layout": layout, "label_rule": rule, "val_source": val_source, "data_dir": str(root.resolve()),
            "seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test,
        },
    )


def summarize(ds: DatasetSplits) -> dict:
    """Counts per split and class, plus the split hash and the label/val settings (JSON-ready)."""
    splits = {}
    for split_name, split in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
        counts = np.bincount(split.labels.numpy(), minlength=len(ds.classes))
        splits[split_name] = {"n": len(split), "per_class": {c: int(counts[i]) for i, c in enumerate(ds.classes)}}
    return {
        "dataset": ds.name,
        "classes": list(ds.classes),
        "splits": splits,
        "split_hash": ds.split_hash,
        "label_rule": ds.info["label_rule"],
        "val_source": ds.info["val_source"],
    }


def _stratified_pick(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``round(share * len(labels))`` items, stratified by label.

    Each class gets floor or ceil of ``share`` times its size (largest remainder, ties to the lower
    class index); the items within a class are drawn by ``rng``.
    """
    quota = share * np.bincount(labels)
    take = np.floor(quota).astype(np.int64)
    extra = round(share * len(labels)) - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in enumerate(take) if k]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _expected_layout(name: str) -> str:
    if name == "cifar10":
        return (
            "CIFAR-10 as train/<class>/*.jpg + test/<class>/*.jpg folders or torchvision's "
            "cifar-10-batches-py/; pass download=True to fetch torchvision's copy, or unpack the local copy "
            "with ../shared/data/extract.sh DEST and pass DEST/cifar10"
        )
    return (
        "FERPlus as Microsoft's FER2013Train/ FER2013Valid/ FER2013Test/ folders (PNGs + label.csv), or the "
        "Kaggle FER2013Plus train/<class>/ + test/<class>/ folders (optionally one folder down); "
        "../shared/data/extract.sh DEST unpacks a copy into DEST/ferplus"
    )


def _cifar10_pools(root: Path, download: bool) -> tuple[str, dict[str, _Pool]]:
    if (root / "train").is_dir() and (root / "test").is_dir():
        pools = {s: _list_class_folders(root, root / s, CLASSES["cifar10"], None) for s in ("train", "test")}
        return "imagefolder", pools
    if (root / "cifar-10-batches-py").is_dir() or download:
        from torchvision.datasets import CIFAR10

        pools = {}
        for split in ("train", "test"):
            try:
                ds = CIFAR10(root=str(root), train=split == "train", download=download)
            except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
                raise DataError(
                    f"torchvision could not read CIFAR-10 from {root / 'cifar-10-batches-py'} ({e}); "
                    "delete that folder and pass download=True, or use the image-folder copy"
                ) from e
            if tuple(ds.classes) != CLASSES["cifar10"]:
                raise DataError(f"{root / 'cifar-10-batches-py'} lists classes {ds.classes}, not CIFAR-10's")
            files = [f"cifar-10-batches-py/{split}#{i}" for i in range(len(ds.data))]
            pools[split] = _Pool(files, np.asarray(ds.targets, dtype=np.int64), pixels=ds.data)
        return "torchvision", pools
    if any((root / n).is_dir() for n in DATASETS):
        hint = f"; it holds {', '.join(n for n in DATASETS if (root / n).is_dir())}/: pass that folder instead"
    else:
        hint = ""
    raise DataError(f"{root} holds no CIFAR-10 copy{hint}. Expected {_expected_layout('cifar10')}")


def _list_class_folders(
    root: Path, folder: Path, classes: tuple[str, ...], aliases: dict[str, str] | None
) -> _Pool:
    """List ``folder/<class>/*`` images sorted by class then name; ``aliases`` maps lower-case names."""
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        cls = aliases.get(entry.name.lower()) if aliases is not None else entry.name
        if cls not in classes:
            known = sorted(aliases) if aliases is not None else classes
            raise DataError(
                f"unknown class folder {Path(entry.path)}; class folders must be named one of {tuple(known)}: "
                "rename or remove it"
            )
        if cls in found:
            raise DataError(f"class folders {found[cls]} and {Path(entry.path)} both name class {cls!r}; merge them")
        found[cls] = Path(entry.path)
    files: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        if cls not in found:
            raise DataError(f"missing class folder {folder / cls} (classes: {classes}); restore it")
        names = sorted(
            e.name for e in os.scandir(found[cls])
            if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(_IMAGE_EXTENSIONS)
        )
        if not names:
            raise DataError(f"class folder {found[cls]} holds no images ({', '.join(_IMAGE_EXTENSIONS)})")
        prefix = found[cls].relative_to(root).as_posix()
        files += [f"{prefix}/{n}" for n in names]
        labels += [label] * len(names)
    return _Pool(files, np.asarray(labels, dtype=np.int64))


def _ferplus_pools(root: Path, label_rule: str | None) -> tuple[str, str, dict[str, _Pool]]:
    candidates = [root] + [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    for base in candidates:
        if any((base / d).is_dir() for d in _FERPLUS_SPLIT_DIRS.values()):
            rule = label_rule or "majority"
            pools = {}
            for split, dirname in _FERPLUS_SPLIT_DIRS.items():
                if not (base / dirname).is_dir():
                    raise DataError(f"missing folder {base / dirname}; Microsoft's FERPlus layout needs "
                                    f"{', '.join(_FERPLUS_SPLIT_DIRS.values())}")
                pools[split] = _read_ferplus_csv(root, base / dirname, rule)
            return "microsoft", rule, pools
    nested = [p for p in candidates[1:] if (p / "train").is_dir() and (p / "test").is_dir()]
    if (root / "train").is_dir() and (root / "test").is_dir():
        base = root
    elif len(nested) == 1:
        base = nested[0]
    else:
        where = f" (several candidates: {', '.join(p.name for p in nested)}; pass one)" if nested else ""
        raise DataError(f"{root} holds no FERPlus copy{where}. Expected {_expected_layout('ferplus')}")
    if label_rule in ("majority", "votes"):
        raise DataError(
            f"label_rule={label_rule!r} needs Microsoft's label.csv vote counts, but {base} holds the Kaggle "
            "class folders (argmax labels); use label_rule=None or 'argmax', or Microsoft's FERPlus layout"
        )
    classes = CLASSES["ferplus"]
    pools = {s: _list_class_folders(root, base / s, classes, _FERPLUS_FOLDER_ALIASES) for s in ("train", "test")}
    return "kaggle", "argmax", pools


def _ferplus_label(votes: list[int], rule: str) -> int | None:
    """Index into ``_FERPLUS_VOTE_COLUMNS`` of a row's label under ``rule``, or None if the row is dropped.

    "majority": counts of exactly 1 are zeroed; the top column must hold strictly more than half of
    the rest. "argmax"/"votes": the first maximal column (file order). Unknown/NF winners drop the row.
    """
    if rule == "majority":
        votes = [0 if v == 1 else v for v in votes]
    top = max(range(len(votes)), key=votes.__getitem__)  # first index of the maximum
    if votes[top] == 0 or top >= 8:
        return None
    if rule == "majority" and not votes[top] > sum(votes) / 2:
        return None
    return top


def _read_ferplus_csv(root: Path, folder: Path, rule: str) -> _Pool:
    csv_path = folder / "label.csv"
    if not csv_path.is_file():
        raise DataError(f"missing {csv_path}; Microsoft's FERPlus layout has one label.csv per folder")
    classes = CLASSES["ferplus"]
    column_to_class = [classes.index(c) for c in _FERPLUS_VOTE_COLUMNS[:8]]
    present = {e.name for e in os.scandir(folder)}
    prefix = folder.relative_to(root).as_posix()
    files: list[str] = []
    labels: list[int] = []
    soft: list[list[float]] = []
    with open(csv_path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            try:
                if len(row) != 12:
                    raise ValueError(f"{len(row)} fields")
                votes = [int(v) for v in row[2:]]
                if min(votes) < 0:
                    raise ValueError("negative vote count")
            except ValueError as e:
                raise DataError(
                    f"{csv_path}, line {line_no}: cannot parse row {row!r} ({e}); expected image name, "
                    f"\"(x, y, w, h)\", then 10 vote counts ({', '.join(_FERPLUS_VOTE_COLUMNS)})"
                ) from e
            top = _ferplus_label(votes, rule)
            if top is None:
                continue
            if row[0] not in present:
                raise DataError(f"{csv_path}, line {line_no}: image {folder / row[0]} is missing; restore it")
            files.append(f"{prefix}/{row[0]}")
            labels.append(column_to_class[top])
            if rule == "votes":
                target = [0.0] * len(classes)
                for col, v in enumerate(votes[:8]):
                    target[column_to_class[col]] = v
                total = sum(target)
                soft.append([v / total for v in target])
    if not files:
        raise DataError(f"{csv_path}: no row keeps a label under label_rule={rule!r}; check the file or the rule")
    return _Pool(
        files,
        np.asarray(labels, dtype=np.int64),
        np.asarray(soft, dtype=np.float32) if rule == "votes" else None,
    )


def _make_split(root: Path, pool: _Pool, idx: np.ndarray, gray: bool, decode: bool, desc: str) -> Split:
    files = [pool.files[i] for i in idx]
    images = None
    if decode:
        if pool.pixels is not None:
            images = torch.from_numpy(np.ascontiguousarray(pool.pixels[idx].transpose(0, 3, 1, 2)))
        else:
            images = _decode_files(root, files, gray, desc)
    return Split(
        images=images,
        labels=torch.from_numpy(pool.labels[idx].copy()),
        soft=torch.from_numpy(pool.soft[idx].copy()) if pool.soft is not None else None,
        files=files,
    )


def _read_image(path: Path, gray: bool) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if gray else "RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path} ({e}); replace the file or re-extract the dataset") from e
    return arr if gray else arr.transpose(2, 0, 1)


def _decode_files(root: Path, files: list[str], gray: bool, desc: str) -> torch.Tensor:
    """Decode ``files`` into uint8 [N, 3, H, W] with a small thread pool; all must share one size."""
    first = _read_image(root / files[0], gray)
    out = np.empty((len(files), *first.shape), dtype=np.uint8)

    def work(start: int) -> int:
        stop = min(start + _DECODE_CHUNK, len(files))
        for i in range(start, stop):
            arr = _read_image(root / files[i], gray)
            if arr.shape != first.shape:
                raise DataError(
                    f"image {root / files[i]} has size {arr.shape[-2:]} but {files[0]} has {first.shape[-2:]}; "
                    "images are kept at native size in one tensor, so all must share one size"
                )
            out[i] = arr
        return stop - start

    workers = min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(files), desc=f"decoding {desc}", unit="img", mininterval=1.0,
               disable=len(files) <= _PROGRESS_MIN_IMAGES)
    with ThreadPoolExecutor(workers) as pool, bar:
        for done in pool.map(work, range(0, len(files), _DECODE_CHUNK)):
            bar.update(done)
    images = torch.from_numpy(out)
    return images.unsqueeze(1).expand(-1, 3, -1, -1) if gray else images
