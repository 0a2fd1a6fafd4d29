"""Write small synthetic datasets in the layouts ``transferstudy.data`` reads.

Every image is one flat colour given by ``pixel_value(relative path)``, so a test can check that a
decoded image belongs to the file it is listed with. CIFAR images are 32x32 JPEGs whose top half is
RGB (v, 255 - v, v // 2) and bottom half black (``cifar_image``); FERPlus images are 48x48 grayscale
PNGs of value v.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FERPLUS_SPLIT_DIRS = {"train": "FER2013Train", "valid": "FER2013Valid", "test": "FER2013Test"}
# Sizes of the conftest fixtures; uneven class sizes make stratification visible.
CIFAR_TRAIN_PER_CLASS = (16, 12, 10, 10, 8, 8, 6, 5, 5, 5)
FERPLUS_TRAIN_PER_EMOTION = {
    "neutral": 20, "happiness": 18, "surprise": 10, "sadness": 9, "anger": 8, "disgust": 4, "fear": 6, "contempt": 3,
}
# Kaggle folder name (spelled as some copies do) -> (n_train, n_test).
KAGGLE_FOLDERS = {
    "angry": (8, 2), "Contempt": (3, 1), "disgust": (4, 1), "fear": (6, 2),
    "happy": (18, 4), "neutral": (20, 4), "sad": (9, 2), "surprised": (10, 3),
}

# Microsoft's label.csv vote columns, in file order.
VOTE_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF")


def pixel_value(rel_path: str) -> int:
    """The flat pixel value (20..219) of the synthetic image at ``rel_path`` (posix, relative to its root)."""
    return 20 + int(hashlib.sha256(rel_path.encode()).hexdigest(), 16) % 200


def rgb_of(value: int) -> tuple[int, int, int]:
    """The RGB colour a CIFAR image of ``pixel_value`` ``value`` is filled with."""
    return value, 255 - value, value // 2


def cifar_image(value: int) -> np.ndarray:
    """The uint8 [32, 32, 3] pixels of a synthetic CIFAR image of ``pixel_value`` ``value``."""
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[:16] = rgb_of(value)
    return img


def _counts(per_class: int | Sequence[int], n_classes: int) -> list[int]:
    return [per_class] * n_classes if isinstance(per_class, int) else list(per_class)


def write_cifar_imagefolder(
    root: Path, train_per_class: int | Sequence[int] = 10, test_per_class: int | Sequence[int] = 3
) -> Path:
    """CIFAR-10 as ``train/<class>/NNNN.jpg`` + ``test/<class>/NNNN.jpg`` (32x32 JPEGs); returns ``root``."""
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for cls, n in zip(CIFAR10_CLASSES, _counts(per_class, len(CIFAR10_CLASSES)), strict=True):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                rel = f"{split}/{cls}/{j:04d}.jpg"
                Image.fromarray(cifar_image(pixel_value(rel))).save(root / rel, quality=95, subsampling=0)
    return root


def write_cifar_pickles(
    root: Path, train_per_class: int = 10, test_per_class: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's ``cifar-10-batches-py/`` (5 train batches, test batch, meta) with random pixels.

    Returns (train_pixels [N, 32, 32, 3], train_labels, test_pixels, test_labels) as written. The files'
    md5 sums differ from torchvision's, so tests must stub ``CIFAR10._check_integrity``.
    """
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for per_class in (train_per_class, test_per_class):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        pixels = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
        out += [pixels, labels]
    train_pixels, train_labels, test_pixels, test_labels = out
    batches = [(f"data_batch_{b + 1}", part) for b, part in enumerate(np.array_split(np.arange(len(train_labels)), 5))]
    for name, part in batches:
        _pickle(folder / name, train_pixels[part], train_labels[part])
    _pickle(folder / "test_batch", test_pixels, test_labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    return train_pixels, train_labels, test_pixels, test_labels


def _pickle(path: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    data = pixels.transpose(0, 3, 1, 2).reshape(len(pixels), -1)  # torchvision's row layout: CHW flattened
    with open(path, "wb") as f:
        pickle.dump({"data": data, "labels": labels.tolist()}, f)


def clear_votes(emotion: str, top: int = 8) -> list[int]:
    """A label.csv vote row (10 counts) with ``top`` votes for ``emotion`` and the rest for unknown."""
    votes = [0] * len(VOTE_COLUMNS)
    votes[VOTE_COLUMNS.index(emotion)] = top
    votes[VOTE_COLUMNS.index("unknown")] += 10 - top
    return votes


def write_ferplus_microsoft(root: Path, rows: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[str]]:
    """Microsoft's FERPlus layout: ``FER2013Train|Valid|Test/`` with 48x48 gray PNGs and ``label.csv``.

    ``rows`` maps "train"/"valid"/"test" to vote rows (10 counts in ``VOTE_COLUMNS`` order); a missing
    key writes an empty folder. Image names are ``ferNNNNNNN.png``, numbered across all three folders.
    Returns, per key, the written files relative to ``root`` in row order.
    """
    written: dict[str, list[str]] = {}
    k = 0
    for key, dirname in FERPLUS_SPLIT_DIRS.items():
        folder = root / dirname
        folder.mkdir(parents=True, exist_ok=True)
        lines, written[key] = [], []
        for votes in rows.get(key, ()):
            name = f"fer{k:07d}.png"
            rel = f"{dirname}/{name}"
            Image.new("L", (48, 48), pixel_value(rel)).save(folder / name)
            lines.append(f'{name},"(0, 0, 48, 48)",' + ",".join(str(v) for v in votes))
            written[key].append(rel)
            k += 1
        (folder / "label.csv").write_text("".join(line + "\n" for line in lines))
    return written


def write_ferplus_kaggle(
    root: Path, folders: Mapping[str, tuple[int, int]], nested: str | None = "fer2013"
) -> Path:
    """Kaggle "FER2013Plus" layout: ``[nested/]train/<folder>/`` and ``test/<folder>/`` of 48x48 gray PNGs.

    ``folders`` maps a class folder name (any spelling) to (n_train, n_test). Returns ``root``.
    """
    base = root / nested if nested else root
    for folder, counts in folders.items():
        for split, n in zip(("train", "test"), counts, strict=True):
            (base / split / folder).mkdir(parents=True, exist_ok=True)
            for j in range(n):
                path = base / split / folder / f"{j:05d}.png"
                Image.new("L", (48, 48), pixel_value(path.relative_to(root).as_posix())).save(path)
    return root
