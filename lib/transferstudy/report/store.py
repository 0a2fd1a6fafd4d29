"""The results store as the book reads it: the only code that reads a run folder's records.

A profile's runs live at ``<runs>/<profile>/<dataset>/<model>/<regime>/`` (see ``results``). ``Store.load``
reads every cell of the study's matrix into a ``Run``: ``ok`` (finished), ``failed`` (its last attempt
failed; an earlier success stays on disk untouched), ``damaged`` (a record that cannot be read: the file is
named, the other runs are read as usual) or ``missing`` (never run). Every regime's ``metrics.json`` has one
schema, ``{"classifiers": {name: {"val": ..., "test": ...}}, "best": name}``: the network's own head is the
classifier ``head``, the frozen regime's SVM is ``linear_svm``, the classical regime has seven.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import config, results

DATASET_LABELS = {"cifar10": "CIFAR-10", "ferplus": "FERPlus"}
# models.BACKBONES[name].label, kept here because the store imports no torch (tests/test_backbones.py checks it)
MODEL_LABELS = {"alexnet": "AlexNet", "deit_base": "DeiT-Base"}
REGIME_LABELS = {"frozen_svm": "Frozen features → SVM", "linear_probe": "Linear probe",
                 "partial": "Partial fine-tune", "full": "Full fine-tune",
                 "classical": "Classical classifiers on embeddings"}
ANALYSIS_LABELS = {"feature_reuse": "Feature reuse", "data_scarcity": "Data scarcity",
                   "stats_transfer": "Statistics transfer"}
RUN_LABELS = {**REGIME_LABELS, **ANALYSIS_LABELS}  # what each notebook of the matrix is, for titles
# The tidy table each analysis writes into its run folder, and its columns (issue #12).
ANALYSIS_TABLES = {
    "feature_reuse": ("feature_reuse.csv", ("network", "layer", "measure", "value", "ci_low", "ci_high")),
    "data_scarcity": ("data_scarcity.csv", ("model", "dataset", "regime", "fraction", "seed", "n_train", "n_test",
                                            "test_accuracy")),
}
# the runs that score a classifier (metrics.json, predictions): the regimes, and the analyses that train as one
SCORED = (*config.NOTEBOOK_REGIMES, *config.TRAINS_AS)
REGIME_SHORT = {"frozen_svm": "frozen SVM", "linear_probe": "linear probe", "partial": "partial fine-tune",
                "full": "full fine-tune", "classical": "classical"}  # for table cells
LADDER = config.NOTEBOOK_REGIMES[:4]  # frozen SVM -> linear probe -> partial -> full: least to most trained
TABLE_COLUMNS = ["model", "dataset", "regime", "classifier", "best", "status", "val_accuracy", "test_accuracy",
                 "test_macro_f1", "n_test", "trainable", "total", "pretrained", "profile", "device", "wall_s",
                 "peak_rss_mb", "date", "split_hash", "error", "run_dir"]
CONTEXT_FILE = Path("book") / "_generated" / "context.json"
CONTEXT_ENV = "TRANSFERSTUDY_BOOK_CONTEXT"


class StoreError(ValueError):
    """A run folder that cannot be used for what was asked; the message names it and the fix."""


@dataclass(frozen=True)
class Predictions:
    """A run's test predictions: true and predicted labels, the image files, and probabilities where kept."""

    y_true: np.ndarray
    y_pred: np.ndarray
    files: np.ndarray
    probs: np.ndarray | None = None

    @property
    def correct(self) -> np.ndarray:
        return self.y_true == self.y_pred


@dataclass
class Run:
    """One cell of the study's matrix as its run folder records it."""

    dataset: str
    model: str
    regime: str
    status: str  # ok | failed | damaged | missing
    run_dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.model}/{self.regime}"

    @property
    def label(self) -> str:
        """'AlexNet, linear probe': the model and regime, for legends and sentences."""
        return f"{MODEL_LABELS[self.model]}, {RUN_LABELS[self.regime].lower()}"

    @property
    def title(self) -> str:
        return f"{RUN_LABELS[self.regime]}: {MODEL_LABELS[self.model]} on {DATASET_LABELS[self.dataset]}"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def pretrained(self) -> bool | None:
        return self.meta.get("pretrained", self.params.get("pretrained"))

    @property
    def classes(self) -> list[str]:
        from ..data import CLASSES

        return list(self.meta.get("classes") or CLASSES[self.dataset])

    @property
    def scores(self) -> dict[str, dict[str, Any]]:
        """Every classifier's ``{"val": metrics, "test": metrics}`` (empty unless the run finished)."""
        return self.metrics.get("classifiers", {})

    @property
    def best(self) -> str | None:
        """The classifier chosen on validation, whose test predictions the run kept."""
        return self.metrics.get("best")

    @property
    def test(self) -> dict[str, Any]:
        """The best classifier's test metrics (accuracy, macro F1, per class, confusion matrix)."""
        return self.scores.get(self.best, {}).get("test", {}) if self.best else {}

    @property
    def val(self) -> dict[str, Any]:
        return self.scores.get(self.best, {}).get("val", {}) if self.best else {}

    def provenance(self) -> str:
        """Profile, initialisation, device and date: where this run's numbers came from."""
        if self.status == "missing":
            return "not run yet"
        parts = [f"profile `{self.meta.get('profile', self.params.get('profile', '?'))}`", init_label(self.pretrained)]
        if self.meta.get("device"):
            parts.append(f"device `{self.meta['device']}`")
        if self.meta.get("date"):
            parts.append(str(self.meta["date"])[:10])
        return " · ".join(parts)

    def _file(self, name: str) -> Path:
        if not self.ok or self.run_dir is None:
            raise StoreError(f"run {self.key} has status {self.status!r}: it has no {name}; run it first "
                             f"(`transferstudy run --only {self.key}`)")
        return self.run_dir / name

    @cached_property
    def predictions(self) -> Predictions:
        """The kept test predictions (``predictions.npz``), checked against the recorded metrics."""
        path = self._file("predictions.npz")
        try:
            with np.load(path) as npz:
                pred = Predictions(npz["y_true"], npz["y_pred"], npz["files"].astype(str),
                                   npz["probs"] if "probs" in npz.files else None)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise StoreError(f"{path} is unreadable ({exc or type(exc).__name__}); rerun {self.key} with "
                             f"--force") from exc
        recorded = self.test.get("accuracy")
        if recorded is not None and not np.isclose(pred.correct.mean(), recorded):
            raise StoreError(f"{path} gives test accuracy {pred.correct.mean():.4f} but metrics.json records "
                             f"{recorded:.4f} for {self.best!r}: the files do not belong together; rerun {self.key}")
        return pred

    def table(self) -> pd.DataFrame:
        """An analysis run's tidy table (``ANALYSIS_TABLES``), checked for its columns."""
        name, columns = ANALYSIS_TABLES[self.regime]
        path = self._file(name)
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path} is unreadable ({exc}); rerun {self.key} with --force") from exc
        if missing := [c for c in columns if c not in frame.columns]:
            raise StoreError(f"{path} lacks the columns {missing} (written by another version?); rerun {self.key} "
                             f"with --force")
        return frame

    def cka_matrices(self) -> dict[str, tuple[list[str], np.ndarray]]:
        """A feature-reuse run's layer x layer CKA matrix of each network with itself: {network: (layers, matrix)}."""
        path = self._file("cka_matrices.npz")
        try:
            with np.load(path) as npz:
                return {key.removeprefix("cka_"): (list(npz[f"layers_{key.removeprefix('cka_')}"].astype(str)),
                                                   npz[key]) for key in npz.files if key.startswith("cka_")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise StoreError(f"{path} is unreadable ({exc or type(exc).__name__}); rerun {self.key} with "
                             f"--force") from exc

    def embeddings(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The plot embeddings ``embeddings-<name>.npz`` (features, labels) kept by the run, or None."""
        path = self._file(f"embeddings-{name}.npz")
        if not path.is_file():
            return None
        with np.load(path) as npz:
            return npz["X"], npz["y"]

    @cached_property
    def split_info(self) -> dict[str, Any]:
        """What the loader applied (``split.json``'s info): layout, label rule, validation source, subset sizes."""
        path = self._file("split.json")
        try:
            return results.read_json(path).get("info", {}) if path.is_file() else {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path} is unreadable ({exc}); rerun {self.key} with --force") from exc

    def test_set(self) -> str:
        """What the test images are, in words: the label rule and how many (for like-for-like checks)."""
        n = self.test.get("per_class")
        count = sum(c["support"] for c in n.values()) if n else None
        words = f"{count:,} test images" if count is not None else "test images unknown"
        if self.dataset == "ferplus" and self.ok:
            info = self.split_info
            words += f", label rule `{info.get('label_rule', '?')}`, `{info.get('layout', '?')}` layout"
        return words


def init_label(pretrained: bool | None) -> str:
    return {True: "ImageNet-pretrained", False: "**random initialisation**"}.get(pretrained, "initialisation unknown")


def _read(path: Path) -> dict[str, Any]:
    return results.read_json(path) if path.is_file() else {}


def read_run(run_dir: Path, dataset: str | None = None, model: str | None = None,
             regime: str | None = None) -> Run:
    """One run folder (``.failed`` ones too). An unreadable record gives a ``damaged`` run naming the file."""
    run_dir = Path(run_dir)
    regime = regime or run_dir.name.split(".")[0]
    model, dataset = model or run_dir.parent.name, dataset or run_dir.parent.parent.name
    if not (run_dir / "meta.json").is_file():
        raise StoreError(f"{run_dir} is not a run folder (no meta.json); pass <runs>/<profile>/<dataset>/<model>/"
                         f"<regime>, e.g. runs/quick/cifar10/alexnet/full")
    reading = run_dir / "meta.json"
    try:
        meta = results.read_json(reading)
        reading = run_dir / "params.json"
        params = _read(reading)
        status = meta.get("status", "ok")
        reading = run_dir / "metrics.json"
        metrics = _read(reading) if status == "ok" else {}
        if status == "ok" and regime in SCORED and "classifiers" not in metrics:
            raise ValueError("it has no 'classifiers' (missing, or written by an older version)")
    except (ValueError, OSError) as exc:  # bad JSON, unreadable file
        return Run(dataset, model, regime, "damaged", run_dir,
                   error=f"{reading} is unreadable: {exc}; rerun it with "
                         f"`transferstudy run --only {dataset}/{model}/{regime} --force`")
    return Run(dataset, model, regime, status, run_dir, meta, params, metrics,
               error=meta.get("error") if status != "ok" else None)


def _latest(run_dir: Path) -> Path | None:
    """The run folder that holds a matrix cell's latest outcome: a failure newer than the success wins, but an
    attempt that was only interrupted (killed, kept by the runner as ``.failed`` marked ``interrupted``) has no
    outcome, so it never hides a finished result; the runner resumes it at its next start."""
    failed = run_dir.with_name(run_dir.name + ".failed")
    candidates = [d for d in (run_dir, failed) if (d / "meta.json").is_file()]
    if len(candidates) == 2 and _interrupted(failed):
        return run_dir
    return max(candidates, key=lambda d: (d / "meta.json").stat().st_mtime) if candidates else None


def _interrupted(folder: Path) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text()).get("interrupted") is True
    except (OSError, ValueError, AttributeError):
        return False  # an unreadable record is read (and reported as damaged) as the latest outcome


def _rows(run: Run) -> list[dict[str, Any]]:
    base = {k: run.meta.get(k) for k in TABLE_COLUMNS if k in run.meta}
    base.update(model=run.model, dataset=run.dataset, regime=run.regime, status=run.status,
                run_dir=str(run.run_dir), error=run.error, classifier=None, best=None)
    if not run.ok:
        return [base]
    return [{**base, "classifier": name, "best": name == run.best, "val_accuracy": m["val"]["accuracy"],
             "test_accuracy": m["test"]["accuracy"], "test_macro_f1": m["test"]["macro_f1"],
             "n_test": sum(c["support"] for c in m["test"]["per_class"].values())}
            for name, m in run.scores.items()]


def collect(profile_dir: Path) -> pd.DataFrame:
    """One row per run and classifier under ``profile_dir`` (``<runs>/<profile>``); ``best`` marks the kept one."""
    rows: list[dict[str, Any]] = []
    for cell in sorted({p.parent.with_name(p.parent.name.split(".")[0])
                        for p in Path(profile_dir).glob("*/*/*/meta.json")}):
        if cell.name not in config.NOTEBOOK_REGIMES:
            continue
        latest = _latest(cell)
        if latest is not None:
            rows.extend(_rows(read_run(latest, cell.parent.parent.name, cell.parent.name, cell.name)))
    frame = pd.DataFrame(rows, columns=TABLE_COLUMNS).astype({"trainable": "Int64", "total": "Int64",
                                                              "n_test": "Int64"})
    return frame.sort_values(["dataset", "model", "regime", "classifier"], na_position="first", ignore_index=True)


def write_table(profile_dir: Path) -> pd.DataFrame:
    """``<profile_dir>/results.csv``: the table across runs, rewritten after every run."""
    frame = collect(profile_dir)
    results.atomic_write_bytes(Path(profile_dir) / "results.csv", frame.to_csv(index=False).encode())
    return frame


@dataclass
class Store:
    """Every run of one profile, and where the book's other inputs are (data root, searches)."""

    profile: str
    profile_dir: Path
    data_root: Path
    runs: dict[tuple[str, str, str], Run]
    analyses: dict[tuple[str, str, str], Run] = field(default_factory=dict)  # (dataset, model, analysis)

    @classmethod
    def load(cls, profile_dir: str | Path, data_root: str | Path = "data") -> Store:
        profile_dir = Path(profile_dir)
        if profile_dir.name not in config.profiles():
            raise StoreError(f"profile_dir={str(profile_dir)!r} must be <runs dir>/<profile>, with a profile out of "
                             f"{', '.join(config.profiles())}; e.g. runs/{next(iter(config.profiles()))}")
        cells = {}
        for dataset in config.DATASETS:
            for model in config.MODELS:
                for regime in config.NOTEBOOKS:
                    latest = _latest(profile_dir / dataset / model / regime)
                    cells[(dataset, model, regime)] = (read_run(latest, dataset, model, regime) if latest
                                                       else Run(dataset, model, regime, "missing"))
        runs = {key: run for key, run in cells.items() if key[2] in config.NOTEBOOK_REGIMES}
        analyses = {key: run for key, run in cells.items() if key[2] in config.ANALYSES}
        return cls(profile_dir.name, profile_dir, Path(data_root), runs, analyses)

    def run(self, dataset: str, model: str, regime: str) -> Run:
        return self.runs[(dataset, model, regime)]

    def analysis(self, dataset: str, model: str, name: str) -> Run:
        return self.analyses[(dataset, model, name)]

    def analysis_frame(self, name: str) -> pd.DataFrame:
        """Every finished ``name`` analysis run's table (``ANALYSIS_TABLES``), with ``model`` and ``dataset`` columns."""
        _, columns = ANALYSIS_TABLES[name]
        frames = []
        for (dataset, model, analysis), run in self.analyses.items():
            if analysis == name and run.ok:
                frames.append(run.table().assign(model=model, dataset=dataset))
        lead = [c for c in ("model", "dataset") if c not in columns]
        if not frames:
            return pd.DataFrame(columns=[*lead, *columns])
        frame = pd.concat(frames, ignore_index=True)
        return frame[[*lead, *[c for c in frame.columns if c not in lead]]]

    def every_run(self) -> list[Run]:
        """The regime runs, then the analysis runs."""
        return [*self.runs.values(), *self.analyses.values()]

    def finished(self) -> list[Run]:
        return [r for r in self.runs.values() if r.ok]

    def counts(self) -> dict[str, int]:
        """How many runs of the matrix (regimes and analyses) are ok, failed, damaged and missing."""
        return {s: sum(r.status == s for r in self.every_run()) for s in ("ok", "failed", "damaged", "missing")}

    @property
    def pretrained(self) -> bool | None:
        """The finished runs' common initialisation (None when they differ or nothing finished)."""
        values = {r.pretrained for r in self.finished()}
        return values.pop() if len(values) == 1 else None

    def table(self) -> pd.DataFrame:
        """One row per run and classifier (the ``results.csv`` columns)."""
        rows = [row for run in self.runs.values() if run.status != "missing" for row in _rows(run)]
        return pd.DataFrame(rows, columns=TABLE_COLUMNS).astype({"trainable": "Int64", "total": "Int64",
                                                                 "n_test": "Int64"})

    def source(self, runs: list[Run] | None = None) -> str:
        """'Source: profile ... · initialisation · device · dates.' of the given (default: all finished) runs."""
        runs = [r for r in (self.finished() if runs is None else runs) if r.ok]
        if not runs:
            return f"Source: no finished run of profile `{self.profile}`."
        inits = sorted({init_label(r.pretrained) for r in runs})
        devices = sorted({str(r.meta.get("device", "?")) for r in runs})
        days = sorted({str(r.meta.get("date", "?"))[:10] for r in runs})
        when = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
        return (f"Source: profile `{self.profile}` · {' and '.join(inits)} · device "
                f"{', '.join(f'`{d}`' for d in devices)} · {when}.")

    def banner(self) -> str:
        """The notice at the top of every results page (MyST): initialisation, provenance, what finished."""
        done = self.finished()
        if not done:
            return (f"```{{note}}\nNo finished runs in profile `{self.profile}` yet, so this page shows no results. "
                    f"Run the study with `make book PROFILE={self.profile}`.\n```\n")
        text = ""
        random = [r for r in done if r.pretrained is False]
        if random:
            which = "every run" if len(random) == len(done) else f"{len(random)} of the {len(done)} finished runs"
            text += (f"```{{warning}}\nThis book was built from **randomly initialised** backbones "
                     f"(`pretrained: false`) in {which}, not from ImageNet weights: the numbers show that the "
                     f"pipeline runs, not what transfer learning achieves.\n```\n\n")
        c = self.counts()
        text += (f"**Results in this book:** {self.source(done).removeprefix('Source: ').rstrip('.')} · "
                 f"{c['ok']} of {len(self.every_run())} runs finished, {c['failed']} failed, "
                 f"{c['missing']} not run yet")
        text += f", {c['damaged']} damaged." if c["damaged"] else "."
        if self.profile == "smoke":
            text += " The smoke profile trains on a handful of images: its numbers mean nothing."
        return text + "\n"

    def searches(self) -> list[Path]:
        """The search folders (``transferstudy search``) beside this profile, of any profile."""
        return sorted(p.parent for p in (self.profile_dir.parent / "search").glob("*/summary.json"))


def write_context(book_root: Path, profile_dir: Path, data_root: Path) -> Path:
    """Tell the book's pages which store to read: ``book/_generated/context.json`` under ``book_root``."""
    path = Path(book_root) / CONTEXT_FILE
    results.write_json(path, {"profile_dir": str(Path(profile_dir).resolve()),
                              "data_root": str(Path(data_root).resolve())})
    return path


def load(start: str | Path | None = None) -> Store:
    """The store a book page reads: named by ``$TRANSFERSTUDY_BOOK_CONTEXT`` or the nearest ``context.json``.

    ``transferstudy book-data`` (run by ``make book``) writes the context file; a page executed by Jupyter
    Book runs in its own folder under ``book/``, so the file is found by walking up from there.
    """
    if os.environ.get(CONTEXT_ENV):
        path = Path(os.environ[CONTEXT_ENV])
    else:
        here = Path(start or Path.cwd()).resolve()
        path = next((d / CONTEXT_FILE for d in (here, *here.parents) if (d / CONTEXT_FILE).is_file()), None)
        if path is None:
            raise StoreError(f"no {CONTEXT_FILE} above {here}: run `transferstudy book-data --profile P` (or "
                             f"`make book`) first, or set {CONTEXT_ENV} to a context file")
    try:
        context = json.loads(Path(path).read_text())
        return Store.load(context["profile_dir"], context["data_root"])
    except StoreError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"book context {path} is unreadable ({exc!r}); rerun `transferstudy book-data`") from exc
