"""Shared fixtures: small synthetic datasets in every layout, the real data when this workplace has it, and the
smoke study that the book's tests (test_book.py) and the results bundles' (test_export.py) read."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
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

from transferstudy import config, runner

REPO = Path(__file__).resolve().parent.parent
# The book chapter that lists an analysis's runs where it has none of its own: the statistics-transfer runs are the
# Feature reuse chapter's weight-against-statistics-transfer section (_toc.yml).
CHAPTER_OF = {"stats_transfer": "feature_reuse"}
ANALYSIS_CHAPTERS = tuple(a for a in config.ANALYSES if a not in CHAPTER_OF)
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


# --- the smoke study: built once per session, removed after the last test that reads it ------------------

ONLY = "*/alexnet/*,cifar10/deit_base/frozen_svm,cifar10/deit_base/linear_probe"  # AlexNet everywhere; 2 DeiT runs
FAILING = "ferplus/deit_base/linear_probe"  # run with a file that holds no weights: a real failed run
BAD_WEIGHTS = str(Path(__file__).resolve())  # it exists (a missing file is refused before anything runs)
_SMOKE: dict[str, object] = {}  # the study's runs folder, and the node id of the last selected test that uses it


@pytest.fixture(scope="session")
def data_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real data root where this workplace has it, else synthetic CIFAR-10 and FERPlus big enough for smoke."""
    if EXTRACT.is_file():
        return request.getfixturevalue("real_data_root")
    root = tmp_path_factory.mktemp("data")
    write_cifar_imagefolder(root / "cifar10", 6, 3)
    emotions = list(FERPLUS_TRAIN_PER_EMOTION)
    write_ferplus_microsoft(root / "ferplus", {
        "train": [clear_votes(e) for e, n in FERPLUS_TRAIN_PER_EMOTION.items() for _ in range(n)],
        "valid": [clear_votes(e) for e in emotions],
        "test": [clear_votes(e) for e in emotions for _ in range(3)]})
    return root


@dataclass
class Study:
    """The shared smoke study: its ``<runs>/smoke`` folder and what became of each run (ok, failed, missing)."""

    profile_dir: Path
    status: dict[str, str]


@pytest.fixture(scope="session")
def smoke(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    """The smoke study (random init) over ``ONLY``, plus one run made to fail with a file that holds no weights.

    The pages must follow what happened, so a run that fails for another reason is checked as a failed run.
    """
    runs = tmp_path_factory.mktemp("runs")
    _SMOKE["runs"] = runs
    lines: list[str] = []
    outcomes = runner.run_matrix("smoke", data_root, runs, {"pretrained": False}, only=ONLY, report=lines.append)
    # past the runner's up-front check (which refuses such a file), so that the notebook itself fails
    outcomes.append(runner.execute(runner.matrix(FAILING)[0], "smoke", data_root, runs,
                                   {"pretrained": True, "weights_path": BAD_WEIGHTS}, report=lines.append))
    status = {spec.key: "missing" for spec in runner.matrix()} | {o.spec.key: o.status for o in outcomes}
    assert status[FAILING] == "failed", lines
    assert "ok" in status.values(), f"no smoke run finished, so no page shows a notebook: {lines}"
    yield Study(runs / "smoke", status)
    shutil.rmtree(runs, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after -k / -m / --lf have deselected what they will
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    users = [item.nodeid for item in items if "smoke" in getattr(item, "fixturenames", ())]
    _SMOKE["last"] = users[-1] if users else None


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Remove the smoke study's runs once the last test that reads them has run: its model bundles hold ~2 GB of
    weights, CI disks are small, and a session fixture would otherwise keep them to the end of the session."""
    if item.nodeid == _SMOKE.get("last") and "runs" in _SMOKE:
        shutil.rmtree(_SMOKE.pop("runs"), ignore_errors=True)
