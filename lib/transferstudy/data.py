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
  A label.csv that lists an image twice, or an image name that two folders' label.csv both list (one
  FER2013 image in two splits), is refused.
- FERPlus, Kaggle "FER2013Plus": ``train/<class>/`` + ``test/<class>/``, possibly one folder down
  (e.g. ``fer2013/train``); the folder names carry the (argmax) labels.

Class-folder copies number their files per split (``train/cat/0000.jpg`` and ``test/cat/0000.jpg`` are
different images), so a shared name proves nothing there; ``check_images`` (``transferstudy data --check``)
decodes every image and reports identical pixels across splits, as well as each file that will not decode.
``read_image`` is the one image reader; its docstring gives the 8-bit pixels it makes of each PIL mode.

Resizing and normalising happen per batch elsewhere.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm  # plain bars: notebooks run under papermill, where widgets cannot render

from .results import atomic_write_bytes, file_digest

DATASETS = ("cifar10", "ferplus")
CLASSES: dict[str, tuple[str, ...]] = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "ferplus": ("anger", "contempt", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"),
}
LABEL_RULES = ("majority", "argmax", "votes")
FERPLUS_MAX_VOTES = 10  # annotators per image in Microsoft's label.csv
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
_VOTE_COUNT = re.compile("[0-9]+")
_PROGRESS_MIN_IMAGES = 2000
# A dataset folder's checksum list, in sha256sum's format (so `sha256sum -c SHA256SUMS` reads it too), written by
# `transferstudy data --check --record`. JPEG and PNG decode damaged bytes to other pixels without an error more
# often than not; with the list there, every image a run reads (and every image --check decodes) is checked
# against it first.
CHECKSUMS = "SHA256SUMS"
_CHECKSUM_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")
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

    def take(self, idx: Any) -> Split:
        """The images at indices ``idx`` (in that order), as a split of their own."""
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return Split(None if self.images is None else self.images[idx], self.labels[idx],
                     None if self.soft is None else self.soft[idx], [self.files[i] for i in idx.tolist()])


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
    root = _source_root(name, data_dir, label_rule, download)
    if val_source not in _VAL_SOURCES:
        raise DataError(f"unknown val_source={val_source!r}; use one of {_VAL_SOURCES}")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise DataError(f"n_{split}={n!r} must be a positive int or None (= the whole split)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed={seed!r} must be a non-negative int")

    layout, rule, pools = _source_pools(name, root, label_rule, download)
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
    sums = read_checksums(root) if decode else None
    if sums is not None and (bad := verify_checksums(root, [f for f in sums if f.endswith("label.csv")], sums)):
        raise DataError(f"{root / bad[0][0]}: {bad[0][1]}; restore it from the dataset's archive")
    splits = {s: _make_split(root, source[s], chosen[s], gray, decode, f"{name} {s}", sums) for s in chosen}
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


def _source_root(name: str, data_dir: str | Path, label_rule: str | None, download: bool) -> Path:
    """Check the arguments that pick a dataset copy; return ``data_dir`` as a Path."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset name={name!r}; use one of {DATASETS}")
    if label_rule is not None and label_rule not in LABEL_RULES:
        raise DataError(f"unknown label_rule={label_rule!r}; use one of {LABEL_RULES} or None")
    if download and name != "cifar10":
        raise DataError(f"download=True works for CIFAR-10 only; {name} needs a local copy: {_expected_layout(name)}")
    root = Path(data_dir).expanduser()
    if not root.is_dir() and not download:
        raise DataError(f"data_dir {root} does not exist. Expected {_expected_layout(name)}")
    return root


def _source_pools(
    name: str, root: Path, label_rule: str | None, download: bool
) -> tuple[str, str | None, dict[str, _Pool]]:
    """(layout, label rule used, source pools by split: train, test and, for Microsoft's FERPlus, valid)."""
    if name == "cifar10":
        layout, pools = _cifar10_pools(root, download)
        return layout, None, pools
    return _ferplus_pools(root, label_rule)


@dataclass
class ImageCheck:
    """What ``check_images`` found in one dataset copy.

    ``bad``: (file relative to data_dir, reason) for each image that will not decode or whose size
    differs from the rest of its split, and, where the folder has a checksum list (``SHA256SUMS``), each
    listed file whose bytes differ from it or that is gone, and each image not in it. ``duplicates``: groups
    (>= 2 files) of images with identical decoded pixels; ``across_splits`` are the groups whose files lie in
    more than one source split.
    """

    name: str
    data_dir: str
    layout: str
    label_rule: str | None
    n_images: int
    bad: list[tuple[str, str]]
    duplicates: list[list[str]]
    across_splits: list[list[str]]
    checksums: str = "none"  # what the bytes were checked against: "none", or "<n> files of SHA256SUMS"


def check_images(
    name: str, data_dir: str | Path, *, label_rule: str | None = None, download: bool = False,
    checksums: bool = True,
) -> ImageCheck:
    """Decode every listed image of every source split through ``read_image`` (with a progress bar).

    The listing is ``load_dataset``'s (so layout and label.csv errors raise DataError first), with
    ``label_rule`` picking the label.csv rows; FERPlus's FER2013Valid is checked even though
    ``val_source="split"`` leaves it unused. torchvision's pickled CIFAR-10 is already pixels: only
    its sizes and duplicates are checked. Nothing is raised for a bad image: each one is listed.
    ``checksums=False`` leaves the folder's checksum list unread (``--record`` replaces it).

    Duplicates are reported, not refused: FER2013 itself holds identical faces across its official
    splits, and refusing them would refuse the benchmark the study compares with.
    """
    root = _source_root(name, data_dir, label_rule, download)
    layout, rule, pools = _source_pools(name, root, label_rule, download)
    gray = name == "ferplus"
    items = [(split, i) for split, pool in pools.items() for i in range(len(pool.files))]

    def look(split: str, i: int) -> tuple[tuple[int, ...], str] | str:
        pool = pools[split]
        try:
            arr = pool.pixels[i] if pool.pixels is not None else read_image(root / pool.files[i], gray)
        except DataError as e:
            return str(e)
        arr = np.ascontiguousarray(arr)
        return tuple(arr.shape), hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()

    chunk = 128

    def work(start: int) -> list:
        return [look(*item) for item in items[start:start + chunk]]

    found: list = []
    bar = tqdm(total=len(items), desc=f"checking {name}", unit="img", mininterval=1.0)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as executor, bar:
        for part in executor.map(work, range(0, len(items), chunk)):
            found += part
            bar.update(len(part))

    bad: list[tuple[str, str]] = []
    by_split: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    groups: dict[str, list[tuple[str, str]]] = {}
    for (split, i), result in zip(items, found, strict=True):
        file = pools[split].files[i]
        if isinstance(result, str):
            bad.append((file, result))
            continue
        shape, digest = result
        by_split.setdefault(split, []).append((file, shape))
        groups.setdefault(digest, []).append((split, file))
    for split, shapes in by_split.items():
        (common, n_common), = Counter(s[-2:] for _, s in shapes).most_common(1)
        for file, shape in shapes:
            if shape[-2:] != common:
                bad.append((file, (
                    f"size {shape[-1]}x{shape[-2]} (WxH) differs from the {common[1]}x{common[0]} of {n_common} "
                    f"other images of the {split} split; a split is kept at native size in one tensor, so "
                    "resize or remove this image"
                )))
    order = {pools[split].files[i]: k for k, (split, i) in enumerate(items)}
    sums = read_checksums(root) if checksums and all(pool.pixels is None for pool in pools.values()) else None
    if sums is not None:  # every listed file, and every image of the listing
        bad += verify_checksums(root, [f for f in order if f not in sums], sums)
        bad += verify_checksums(root, list(sums), sums)
    bad.sort(key=lambda b: order.get(b[0], len(order)))
    duplicates = [[f for _, f in g] for g in groups.values() if len(g) > 1]
    across = [[f for _, f in g] for g in groups.values() if len({s for s, _ in g}) > 1]
    return ImageCheck(
        name=name, data_dir=str(root), layout=layout, label_rule=rule, n_images=len(items),
        bad=bad, duplicates=duplicates, across_splits=across,
        checksums="none" if sums is None else f"{len(sums):,} files of {CHECKSUMS}",
    )


def record_dataset_checksums(check: ImageCheck) -> Path:
    """After a ``check_images`` that found nothing bad, write ``SHA256SUMS`` for every image file under the
    dataset folder and every label.csv (whatever the label rule lists), so later checks and runs see bit rot."""
    root = Path(check.data_dir)
    if check.bad:
        raise DataError(f"not recording {root / CHECKSUMS}: {len(check.bad)} file(s) of {root} are bad (listed "
                        f"above); restore them first, so the list vouches only for sound files")
    if check.layout == "torchvision":
        raise DataError(f"{root} holds torchvision's pickled CIFAR-10, whose files torchvision checks itself (MD5); "
                        f"a checksum list is for image folders")
    files = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()
             and (p.suffix.lower() in _IMAGE_EXTENSIONS or p.name == "label.csv")]
    return record_checksums(root, files)


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
            pools, listed = {}, {}
            for split, dirname in _FERPLUS_SPLIT_DIRS.items():
                if not (base / dirname).is_dir():
                    raise DataError(f"missing folder {base / dirname}; Microsoft's FERPlus layout needs "
                                    f"{', '.join(_FERPLUS_SPLIT_DIRS.values())}")
                pools[split], listed[dirname] = _read_ferplus_csv(root, base / dirname, rule)
            _refuse_names_in_two_folders(base, listed)
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


def _read_ferplus_csv(root: Path, folder: Path, rule: str) -> tuple[_Pool, dict[str, int]]:
    """``folder``'s label.csv as a pool of the rows ``rule`` keeps, and every listed image name -> its line.

    A row naming an image that an earlier row of the same file names is refused (it would give one
    image two labels, or two votes in a split).
    """
    csv_path = folder / "label.csv"
    if not csv_path.is_file():
        raise DataError(f"missing {csv_path}; Microsoft's FERPlus layout has one label.csv per folder")
    classes = CLASSES["ferplus"]
    column_to_class = [classes.index(c) for c in _FERPLUS_VOTE_COLUMNS[:8]]
    present = {e.name for e in os.scandir(folder) if e.is_file()}
    prefix = folder.relative_to(root).as_posix()
    listed: dict[str, int] = {}
    files: list[str] = []
    labels: list[int] = []
    soft: list[list[float]] = []
    line_no = 0
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                line_no = reader.line_num
                if not row:
                    continue
                try:
                    if len(row) != 12:
                        raise ValueError(f"{len(row)} fields")
                    counts = [v.strip() for v in row[2:]]
                    bad = [v for v in counts if not _VOTE_COUNT.fullmatch(v)]
                    if bad:
                        raise ValueError(f"vote count {bad[0]!r} is not a whole number >= 0")
                    votes = [int(v) for v in counts]
                    if not 1 <= sum(votes) <= FERPLUS_MAX_VOTES:
                        raise ValueError(f"its votes sum to {sum(votes)}; FERPlus has 10 annotators per image, so "
                                         f"a row's votes sum to 1..{FERPLUS_MAX_VOTES} (10 in all but one row)")
                except ValueError as e:
                    raise DataError(
                        f"{csv_path}, line {line_no}: cannot parse row {row!r} ({e}); expected image name, "
                        f"\"(x, y, w, h)\", then 10 vote counts ({', '.join(_FERPLUS_VOTE_COLUMNS)})"
                    ) from e
                if row[0] in listed:
                    raise DataError(
                        f"{csv_path} lists image {row[0]!r} twice, on lines {listed[row[0]]} and {line_no}: one "
                        "image would count twice (or with two labels); delete one of the two rows"
                    )
                listed[row[0]] = line_no
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
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(
                f"{csv_path}, after line {line_no}: not a readable UTF-8 CSV file ({type(e).__name__}: {e}); "
                "restore the label.csv of Microsoft's FERPlus"
            ) from e
    if not files:
        raise DataError(f"{csv_path}: no row keeps a label under label_rule={rule!r}; check the file or the rule")
    pool = _Pool(
        files,
        np.asarray(labels, dtype=np.int64),
        np.asarray(soft, dtype=np.float32) if rule == "votes" else None,
    )
    return pool, listed


def _refuse_names_in_two_folders(base: Path, listed: dict[str, dict[str, int]]) -> None:
    """Refuse an image name listed by the label.csv of two FERPlus folders (one FER2013 image in two splits)."""
    dirs = list(listed)
    for i, first in enumerate(dirs):
        for second in dirs[i + 1:]:
            shared = sorted(listed[first].keys() & listed[second].keys())
            if shared:
                name = shared[0]
                more = f" (and {len(shared) - 1} more shared names)" if len(shared) > 1 else ""
                raise DataError(
                    f"image name {name!r} is listed both in {base / first / 'label.csv'} (line {listed[first][name]}) "
                    f"and in {base / second / 'label.csv'} (line {listed[second][name]}){more}: FERPlus names "
                    "each FER2013 image once, so one image would sit in two splits (train/test leakage); "
                    "remove it from one of the two folders and its label.csv"
                )


def _make_split(root: Path, pool: _Pool, idx: np.ndarray, gray: bool, decode: bool, desc: str,
                sums: dict[str, str] | None = None) -> Split:
    files = [pool.files[i] for i in idx]
    images = None
    if decode:
        if pool.pixels is not None:
            images = torch.from_numpy(np.ascontiguousarray(pool.pixels[idx].transpose(0, 3, 1, 2)))
        else:
            if sums is not None and (bad := verify_checksums(root, files, sums)):
                shown = "; ".join(f"{root / f}: {why}" for f, why in bad[:5])
                more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
                raise DataError(f"{len(bad)} image(s) of the {desc} split do not match {root / CHECKSUMS}: {shown}"
                                f"{more}; restore them from the dataset's archive (`transferstudy data --check` "
                                f"lists every one)")
            images = _decode_files(root, files, gray, desc)
    return Split(
        images=images,
        labels=torch.from_numpy(pool.labels[idx].copy()),
        soft=torch.from_numpy(pool.soft[idx].copy()) if pool.soft is not None else None,
        files=files,
    )


def read_checksums(root: Path) -> dict[str, str] | None:
    """``root/SHA256SUMS`` as {file relative to root: sha256}, or None when there is none; a malformed line is a
    DataError naming the file and the line."""
    path = Path(root) / CHECKSUMS
    if not path.is_file():
        return None
    sums = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        match = _CHECKSUM_LINE.fullmatch(line)
        if match is None:
            raise DataError(f"{path}, line {n}: {line[:80]!r} is not '<64 hex digits>  <file>' (sha256sum's "
                            f"format); write the list again with `transferstudy data --check --record`")
        sums[match[2]] = match[1]
    return sums


def verify_checksums(root: Path, files: list[str], sums: dict[str, str]) -> list[tuple[str, str]]:
    """(file, reason) for each of ``files`` (relative to ``root``) that the checksum list does not vouch for."""
    bad = []
    for file in files:
        if file not in sums:
            bad.append((file, f"not in {CHECKSUMS} (added after the list was recorded?); check it and record the "
                              f"list again with `transferstudy data --check --record`"))
            continue
        try:
            digest = file_digest(root / file)
        except OSError as exc:
            bad.append((file, f"cannot be read ({exc})"))
            continue
        if digest != sums[file]:
            bad.append((file, f"its bytes differ from {CHECKSUMS} (altered since the list was recorded: bit rot or an "
                              f"edit); JPEG and PNG often decode such bytes to other pixels without an error"))
    return bad


def record_checksums(root: Path, files: list[str]) -> Path:
    """Write ``root/SHA256SUMS`` for ``files`` (relative to ``root``), atomically."""
    text = "".join(f"{file_digest(root / f)}  {f}\n" for f in sorted(files))
    atomic_write_bytes(Path(root) / CHECKSUMS, text.encode())
    return Path(root) / CHECKSUMS


# Modes decoded as they are or through PIL's own colour conversion (1 becomes 0/255, P its palette colours).
_PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_GRAY_FAMILY = ("1", "L", "LA", "La")  # composited in one channel when alpha is present
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image(path: Path, gray: bool) -> np.ndarray:
    """One image file as uint8 pixels: [H, W] when ``gray``, else [3, H, W]; what will not decode is a DataError.

    The first frame of a multi-frame file is read; EXIF orientation is not applied. Per PIL mode:

    - ``1``: 0 and 255. ``L``: as stored. ``RGB``: as stored (16-bit RGB PNG/PPM: Pillow's 8-bit reduction).
    - ``P``: the palette colours; ``CMYK``, ``YCbCr``, ``RGBX``, ``HSV``: PIL's conversion to RGB.
    - Alpha (``LA``, ``PA``, ``RGBA``, premultiplied ``La``/``RGBa``, and ``L``/``RGB``/``P`` files with a
      transparency key or palette alpha): composited on white, ``round((c * a + 255 * (255 - a)) / 255)``,
      so a fully transparent pixel is 255 whatever colour it hides.
    - ``I;16`` (16-bit gray, any byte order): 0..65535 scaled to 0..255, ``round(v / 257)``. A 16-bit
      PGM, which Pillow opens as ``I`` already stretched from its maxval to 0..65535, is scaled the same way.
    - ``I`` (32-bit integer, other than PGM) and ``F`` (32-bit float): no scale is implied, so the values
      are taken as 8-bit only when every one is a whole number in 0..255; anything else is refused.
    - Any other mode (e.g. ``LAB``) is refused.

    ``gray`` then takes ITU-R 601 luma (PIL's ``convert("L")``) of colour pixels; one-channel pixels are
    kept, and copied into three channels when not ``gray``.
    """
    try:
        with Image.open(path) as im:
            im.load()
            pixels = _to_uint8(im, path, gray)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 -- whatever PIL raises on a bad file, named with its type
        raise DataError(
            f"cannot decode image {path} ({type(e).__name__}: {e}); replace the file or re-extract the dataset"
        ) from e
    if pixels.size == 0:
        raise DataError(f"image {path} has no pixels (size {pixels.shape[1]}x{pixels.shape[0]}); replace the file")
    if gray:
        return pixels
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)) if pixels.ndim == 3 else np.stack([pixels] * 3)


def _to_uint8(im: Image.Image, path: Path, gray: bool) -> np.ndarray:
    """``im`` (loaded) as uint8 [H, W] (one channel) or [H, W, 3]; see ``read_image`` for the rule per mode."""
    mode = im.mode
    if mode in _MODES_16BIT or (mode == "I" and im.format == "PPM"):
        wide = np.asarray(im).astype(np.int64)
        if wide.min(initial=0) < 0 or wide.max(initial=0) > 65535:
            raise DataError(f"image {path} (mode {mode}) holds values outside 0..65535; replace the file")
        return ((wide + 128) // 257).astype(np.uint8)
    if mode in ("I", "F"):
        values = np.asarray(im)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        whole = bool(np.isfinite(values).all() and (values == np.round(values)).all())
        if not (whole and lo >= 0 and hi <= 255):
            kind = "32-bit integer" if mode == "I" else "32-bit float"
            raise DataError(
                f"image {path} has {kind} pixels (PIL mode {mode}) with values {lo:g}..{hi:g}"
                f"{'' if whole else ', not all whole numbers'}: no 8-bit scale is implied, so they are refused "
                "rather than clipped; convert the file to 8-bit (values 0..255) or to 16-bit PNG"
            )
        return values.astype(np.uint8)
    if mode not in _PLAIN_MODES + _ALPHA_MODES:
        raise DataError(
            f"image {path} has PIL mode {mode}, which is not decoded to 8-bit pixels here "
            f"(decoded: {', '.join(_PLAIN_MODES + _ALPHA_MODES + _MODES_16BIT)}, I, F); convert the file to RGB or L"
        )
    if mode in _ALPHA_MODES or "transparency" in im.info:
        if mode in _GRAY_FAMILY:
            return _on_white(np.asarray(im.convert("LA")))
        rgb = _on_white(np.asarray(im.convert("RGBA")))
        return np.asarray(Image.fromarray(rgb).convert("L")) if gray else rgb
    if mode in _GRAY_FAMILY:
        return np.asarray(im.convert("L"))
    rgb = im.convert("RGB")
    return np.asarray(rgb.convert("L") if gray else rgb)


def _on_white(with_alpha: np.ndarray) -> np.ndarray:
    """[H, W, C + 1] uint8 with alpha last, composited on white: [H, W, C], or [H, W] when C == 1."""
    colour = with_alpha[..., :-1].astype(np.int32)
    alpha = with_alpha[..., -1:].astype(np.int32)
    out = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def _decode_files(root: Path, files: list[str], gray: bool, desc: str) -> torch.Tensor:
    """Decode ``files`` into uint8 [N, 3, H, W] with a small thread pool; all must share one size."""
    first = read_image(root / files[0], gray)
    out = np.empty((len(files), *first.shape), dtype=np.uint8)

    def work(start: int) -> int:
        stop = min(start + _DECODE_CHUNK, len(files))
        for i in range(start, stop):
            arr = read_image(root / files[i], gray)
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
