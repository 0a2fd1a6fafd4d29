"""Shared fixtures: small synthetic datasets in every layout, and the real data when this workplace has it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from synthetic import (
    CIFAR_TRAIN_PER_CLASS,
    FERPLUS_TRAIN_PER_EMOTION,
    KAGGLE_FOLDERS,
    clear_votes,
    write_cifar_imagefolder,
    write_ferplus_kaggle,
    write_ferplus_microsoft,
)

REPO = Path(__file__).resolve().parent.parent
EXTRACT = REPO.parent / "shared" / "data" / "extract.sh"

@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 in the image-folder layout (JPEGs), uneven class sizes, 3 test images per class."""
    return write_cifar_imagefolder(tmp_path_factory.mktemp("cifar10"), CIFAR_TRAIN_PER_CLASS, 3)


@pytest.fixture(scope="session")
def fer_microsoft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FERPlus in Microsoft's layout; every row has a clear (majority) winner, plus one dropped NF row per folder."""
    nf = clear_votes("NF")
    train = [clear_votes(e) for e, n in FERPLUS_TRAIN_PER_EMOTION.items() for _ in range(n)] + [nf]
    small = [clear_votes(e) for e in FERPLUS_TRAIN_PER_EMOTION] + [nf]
    root = tmp_path_factory.mktemp("ferplus_microsoft")
    write_ferplus_microsoft(root, {"train": train, "valid": small, "test": small})
    return root


@pytest.fixture(scope="session")
def fer_kaggle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FERPlus as Kaggle's FER2013Plus folders under a nested ``fer2013/``, with alias folder names."""
    return write_ferplus_kaggle(tmp_path_factory.mktemp("ferplus_kaggle"), KAGGLE_FOLDERS, nested="fer2013")


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """``<repo>/data`` holding cifar10/ and ferplus/, unpacked by ../shared/data/extract.sh (idempotent)."""
    if not EXTRACT.is_file():
        pytest.skip(f"real datasets not available: {EXTRACT} does not exist on this machine")
    dest = REPO / "data"
    result = subprocess.run(["bash", str(EXTRACT), str(dest)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"{EXTRACT} {dest} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return dest
