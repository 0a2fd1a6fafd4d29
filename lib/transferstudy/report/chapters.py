"""What the Datasets, Models, Embeddings, Errors and Search chapters show, as data for their cells.

Each function returns a DataFrame, arrays or a short message: the pages draw them with ``figures``.
A piece that cannot be computed (a missing data root, a run that has not finished) raises
``Unavailable`` with a message that says why and what to run; the pages show it as a note.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import config, data, results
from .store import Run, Store, StoreError

FERPLUS_RULES = {
    "majority": "FERPlus's official rule: single votes are zeroed, the top emotion needs more than half of "
                "the remaining votes; unknown / not-a-face winners are dropped",
    "argmax": "the top vote (first on ties) unless it is unknown / not-a-face: the labels of the Kaggle "
              "FER2013Plus folders",
    "votes": "the same images as argmax, each keeping its vote distribution as a soft target",
}


class Unavailable(Exception):
    """Something a page wanted to show cannot be computed; the message says why and what to do."""


# --- datasets -------------------------------------------------------------------------------------
#
# The Datasets and Errors pages read the data root, or, in a book built from a results bundle (which carries no data),
# the bundle's data summary: a folder holding ``summary.json`` (what the functions below computed from the data root
# when the bundle was exported, by ``data_summary``) and the pictures they show, as PNGs under ``pictures/``. The
# store's ``data_root`` names one or the other, and these functions alone tell them apart, so the pages do not.

SUMMARY_FILE = "summary.json"
SUMMARY_KIND = "transferstudy data summary"
PICTURES = "pictures"
EXAMPLES_PER_CLASS = 6
MISCLASSIFIED_SHOWN = 12


@dataclass(frozen=True)
class DatasetSummary:
    """What the Datasets page shows of one dataset with the study's split (seed, label rule and subsets of the
    store's profile): the split sizes, the images per class of each split, and the training images it pictures
    (``examples``: class -> files relative to the dataset folder, or why there are none)."""

    name: str
    split_hash: str
    seed: int
    layout: str
    sizes: pd.DataFrame
    counts: dict[str, dict[str, int]]
    examples: dict[str, list[str]] | str


def _bundled(store: Store) -> dict[str, Any] | None:
    """The results bundle's data summary that stands in for the data root, or None where the data root is real."""
    path = store.data_root / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = results.read_json(path)
        if not isinstance(summary, dict) or summary.get("kind") != SUMMARY_KIND:
            raise ValueError(f"it is not a {SUMMARY_KIND}")
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is unreadable ({exc}); import the results bundle again "
                         f"(`transferstudy import-results BUNDLE --to DIR`)") from exc
    return summary


def data_source_sentence(store: Store) -> str:
    """Where the Datasets and Errors pages take the data from, said as it is: the data root, or a bundle's summary."""
    if _bundled(store) is not None:
        return ("this book was built from a results bundle, which carries no images: the counts and pictures on "
                "this page come from the bundle's data summary, computed from the data root by the same loader "
                "when the results were exported")
    return (f"they are read from the data root that `transferstudy book-data` was given ({store.data_root}), "
            "by the loader the notebooks use (`transferstudy.data.load_dataset`)")


def _picture_file(store: Store, dataset: str, file: str) -> Path:
    """Where a picture the pages show is kept: the data root's image file, or its PNG in a bundle's data summary."""
    if (store.data_root / SUMMARY_FILE).is_file():
        return store.data_root / PICTURES / dataset / f"{file}.png"
    return store.data_root / dataset / file


def _picture(path: Path) -> np.ndarray:
    """An image file as [H, W, 3] uint8 for a figure (through the library's one image reader)."""
    return data.read_image(path, gray=False).transpose(1, 2, 0)


def dataset_summary(store: Store, dataset: str) -> DatasetSummary:
    """The dataset as the study splits it: whole dataset and this profile's subsets, images per class, pictures."""
    bundled = _bundled(store)
    if bundled is not None:
        entry = bundled["datasets"][dataset]
        if "unavailable" in entry:
            raise Unavailable(entry["unavailable"])
        return DatasetSummary(dataset, entry["split_hash"], entry["seed"], entry["layout"],
                              pd.DataFrame(entry["sizes"]), entry["counts"], entry["examples"])
    cfg = config.resolve("full", config.MODELS[0], dataset, store.profile)
    data_dir = store.data_root / dataset
    args = dict(label_rule=cfg["label_rule"] if dataset == "ferplus" else None, val_source=cfg["val_source"],
                seed=cfg["seed"], decode=False)
    try:
        ds = data.load_dataset(dataset, data_dir, **args)
    except data.DataError as exc:
        raise Unavailable(f"The data root `{store.data_root}` has no usable `{dataset}/` folder ({exc}). Run "
                          f"`make data` (or pass `--data-root` to `transferstudy book-data`) and rebuild.") from exc
    try:
        sub = data.load_dataset(dataset, data_dir, n_train=cfg["n_train"], n_val=cfg["n_val"], n_test=cfg["n_test"],
                                **args)
        sizes = {s: len(getattr(sub, s)) for s in ("train", "val", "test")}
    except data.DataError:  # the profile asks for more images than this copy has
        sizes = {s: None for s in ("train", "val", "test")}
    frame = pd.DataFrame({"split": ["train", "val", "test"],
                          "whole dataset": [len(getattr(ds, s)) for s in ("train", "val", "test")],
                          f"profile {store.profile}": [sizes[s] for s in ("train", "val", "test")]})
    summary = data.summarize(ds)
    counts = {s: summary["splits"][s]["per_class"] for s in ("train", "val", "test")}
    # up to EXAMPLES_PER_CLASS random training images of each class (seed 0), shown at their native size
    rng = np.random.default_rng(0)
    labels = ds.train.labels.numpy()
    picked = {cls: [ds.train.files[i] for i in rng.permutation(np.flatnonzero(labels == k))[:EXAMPLES_PER_CLASS]]
              for k, cls in enumerate(ds.classes)}
    if any((data_dir / f).is_file() for files in picked.values() for f in files):
        examples: dict[str, list[str]] | str = {cls: [f for f in files if (data_dir / f).is_file()]
                                                for cls, files in picked.items()}
    else:
        examples = (f"No example images: the {dataset} files under `{data_dir}` are not individual image files "
                    f"(e.g. torchvision's pickled CIFAR-10).")
    return DatasetSummary(dataset, ds.split_hash, ds.info["seed"], ds.info["layout"], frame, counts, examples)


def examples(store: Store, summary: DatasetSummary) -> dict[str, list[np.ndarray]]:
    """The training images ``summary`` pictures, per class, at their native size."""
    if isinstance(summary.examples, str):
        raise Unavailable(summary.examples)
    return {cls: [_picture(_picture_file(store, summary.name, f)) for f in files]
            for cls, files in summary.examples.items()}


def label_rules(store: Store) -> tuple[pd.DataFrame, pd.DataFrame]:
    """FERPlus under each label rule: images kept per official folder, and training images per class."""
    bundled = _bundled(store)
    if bundled is not None:
        rules = bundled["label_rules"]
        if isinstance(rules, str):
            raise Unavailable(rules)
        return pd.DataFrame(rules["kept"]), pd.DataFrame(rules["per_class"])
    counts, per_class = [], {}
    for rule, keeps in FERPLUS_RULES.items():
        try:
            ds = data.load_dataset("ferplus", store.data_root / "ferplus", label_rule=rule, val_source="official",
                                   decode=False)
        except data.DataError as exc:
            raise Unavailable(f"The label rules need Microsoft's `label.csv` files ({exc}).") from exc
        n = {s: len(getattr(ds, s)) for s in ("train", "val", "test")}
        counts.append({"rule": rule, "what it keeps": keeps, "train": n["train"], "valid": n["val"],
                       "test": n["test"], "total": sum(n.values())})
        per_class[rule] = data.summarize(ds)["splits"]["train"]["per_class"]
    return pd.DataFrame(counts), pd.DataFrame(per_class).rename_axis("class").reset_index()


def data_summary(store: Store) -> tuple[dict[str, Any], dict[str, bytes]]:
    """What the pages read from ``store``'s data root, for a results bundle: the ``summary.json`` that
    ``dataset_summary``, ``label_rules`` and ``misclassified`` read back, and the pictures they show (the training
    examples, and the first misclassified test images of every finished run) as PNG files by their name under the
    summary folder. What cannot be computed is kept as the note the page would show."""
    from PIL import Image

    if _bundled(store) is not None:
        raise StoreError(f"{store.data_root} is already a results bundle's data summary; export from the runs and "
                         f"the data root they used")
    datasets: dict[str, Any] = {}
    wanted: set[tuple[str, str]] = set()
    for dataset in config.DATASETS:
        try:
            s = dataset_summary(store, dataset)
        except Unavailable as why:
            datasets[dataset] = {"unavailable": str(why)}
            continue
        datasets[dataset] = {"split_hash": s.split_hash, "seed": s.seed, "layout": s.layout,
                             "sizes": s.sizes.to_dict(orient="list"), "counts": s.counts, "examples": s.examples}
        if isinstance(s.examples, dict):
            wanted |= {(dataset, f) for files in s.examples.values() for f in files}
    for run in store.finished():
        pred = run.predictions
        wanted |= {(run.dataset, str(pred.files[i])) for i in np.flatnonzero(~pred.correct)[:MISCLASSIFIED_SHOWN]}
    try:
        kept, per_class = label_rules(store)
        rules: dict[str, Any] | str = {"kept": kept.to_dict(orient="list"),
                                       "per_class": per_class.to_dict(orient="list")}
    except Unavailable as why:
        rules = str(why)
    pictures = {}
    for dataset, file in sorted(wanted):
        path = _picture_file(store, dataset, file)
        if path.is_file():
            buffer = io.BytesIO()
            Image.fromarray(_picture(path)).save(buffer, format="PNG")
            pictures[f"{PICTURES}/{dataset}/{file}.png"] = buffer.getvalue()
    summary = {"kind": SUMMARY_KIND, "profile": store.profile, "datasets": datasets, "label_rules": rules}
    return summary, pictures


# --- models ---------------------------------------------------------------------------------------


def _describe(module: Any) -> str:
    """A layer in a few words: its shape for a leaf, counts of its direct children's types otherwise."""
    from torch import nn

    children = [c for c in module.children() if not isinstance(c, nn.Identity)]
    if not children:
        if isinstance(module, nn.Linear):
            return f"Linear({module.in_features} → {module.out_features})"
        if isinstance(module, nn.Conv2d):
            return (f"Conv2d({module.in_channels} → {module.out_channels}, "
                    f"{module.kernel_size[0]}×{module.kernel_size[1]})")
        return type(module).__name__
    counts: dict[str, int] = {}
    for child in children:
        counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
    return ", ".join(f"{n} × {kind}" for kind, n in counts.items())


def architecture(model: str, n_classes: int = 10) -> pd.DataFrame:
    """The top-level modules of ``model`` as the library builds it (on the meta device: no weights, no memory)."""
    import torch
    from torch import nn

    from .. import models

    with torch.device("meta"):
        net = models.build_model(model, n_classes, pretrained=False)
    rows = [{"module": name, "layers": _describe(module), "parameters": sum(p.numel() for p in module.parameters())}
            for name, module in net.named_children() if not isinstance(module, nn.Identity)]
    own = [(k, p.numel()) for k, p in net.named_parameters(recurse=False)]
    if own:
        rows.append({"module": ", ".join(k for k, _ in own), "layers": "learned tokens / embeddings",
                     "parameters": sum(n for _, n in own)})
    rows.append({"module": "total", "layers": "", "parameters": sum(p.numel() for p in net.parameters())})
    return pd.DataFrame(rows)


def parameter_counts() -> pd.DataFrame:
    """Trainable and total parameters of every regime, counted by ``regimes.param_table`` on the real modules."""
    from .. import regimes

    rows = [{"dataset": dataset, **row, "share trained": row["trainable"] / row["total"]}
            for dataset in config.DATASETS
            for model in config.MODELS for row in regimes.param_table(model, len(data.CLASSES[dataset]))]
    return pd.DataFrame(rows)[["dataset", "model", "regime", "trainable", "total", "share trained"]]


# --- embeddings and errors ------------------------------------------------------------------------


def embedding_panels(store: Store, dataset: str, model: str) -> dict[str, tuple[np.ndarray, np.ndarray, Run]]:
    """The test embeddings before training (frozen-SVM run) and after the full fine-tune, where kept."""
    from .projections import MIN_POINTS

    sources = {"frozen (before training)": (store.run(dataset, model, "frozen_svm"), "frozen"),
               "fine-tuned (full)": (store.run(dataset, model, "full"), "finetuned")}
    panels, missing = {}, []
    for label, (run, name) in sources.items():
        arrays = run.embeddings(name) if run.ok else None
        if arrays is None:
            missing.append(f"{label}: no `embeddings-{name}.npz` ({run.key} is {run.status})")
        elif len(arrays[1]) < MIN_POINTS:
            missing.append(f"{label}: only {len(arrays[1])} embeddings kept (t-SNE and UMAP need at least "
                           f"{MIN_POINTS}; raise `n_embed_plot`)")
        else:
            panels[label] = (*arrays, run)
    if not panels:
        raise Unavailable("Not shown: " + "; ".join(missing) + ".")
    return panels


def error_run(store: Store, dataset: str, model: str) -> Run | None:
    """The run whose errors a model's section shows: the full fine-tune, else its most accurate finished run."""
    full = store.run(dataset, model, "full")
    if full.ok:
        return full
    mine = [r for r in store.finished() if r.dataset == dataset and r.model == model and r.regime != "classical"]
    return max(mine, key=lambda r: r.test.get("accuracy", 0.0)) if mine else None


def misclassified(run: Run, store: Store, limit: int = MISCLASSIFIED_SHOWN) -> tuple[list[np.ndarray], list[str]]:
    """The first ``limit`` misclassified test images of ``run``, with 'true / predicted' captions."""
    pred = run.predictions
    wrong = np.flatnonzero(~pred.correct)[:limit]
    shown = [(path, i) for i in wrong if (path := _picture_file(store, run.dataset, str(pred.files[i]))).is_file()]
    if len(wrong) and not shown:
        raise Unavailable(f"The misclassified images are not readable under `{store.data_root}`: pass the data root "
                          f"the runs used.")
    classes = run.classes
    return ([_picture(p) for p, _ in shown],
            [f"true: {classes[pred.y_true[i]]}\npredicted: {classes[pred.y_pred[i]]}" for _, i in shown])


# --- searches -------------------------------------------------------------------------------------

SUMMARY_KEYS = ("study", "dataset", "model", "regime", "profile", "states")


class SearchFolderError(ValueError):
    """A search folder that cannot be read; the message names it and the fix."""


def read_search(folder: Path) -> tuple[dict[str, Any], pd.DataFrame, list[dict[str, Any]]]:
    """A search folder's ``summary.json``, ``trials.csv`` (parameters as the text the search wrote) and the
    trials' run records (``meta.json``). A trial's ``run_dir`` is its folder inside ``folder`` where that holds it
    (also after the search folder was moved, or unpacked from a results bundle), else the one it recorded."""
    fix = (f"rerun one worker of that search (`transferstudy search` with the same options) to rewrite it, "
           f"or remove {folder}")
    try:
        summary = results.read_json(folder / "summary.json")
        columns = pd.read_csv(folder / "trials.csv", nrows=0).columns
        trials = pd.read_csv(folder / "trials.csv", dtype={c: str for c in columns if c.startswith("param_")})
    except (ValueError, FileNotFoundError) as exc:  # bad JSON, an empty or missing trials.csv
        raise SearchFolderError(f"search folder {folder}: {exc}; {fix}") from exc
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise SearchFolderError(f"{folder / 'summary.json'} lacks {', '.join(missing)}: not written by "
                                f"`transferstudy search`; {fix}")
    metas = [results.read_json(p) for p in sorted(folder.glob("trials/*/*/*/*/*/meta.json"))]
    if "run_dir" in trials.columns:
        here = [folder / "trials" / f"{int(n):04d}" / summary["profile"] / summary["dataset"] / summary["model"]
                / summary["regime"] for n in trials["number"]]
        trials["run_dir"] = [str(d) if (d / "meta.json").is_file() else recorded
                             for d, recorded in zip(here, trials["run_dir"])]
    return summary, trials.sort_values("number", ignore_index=True), metas


def search_pretrained(summary: dict[str, Any], metas: list[dict[str, Any]]) -> bool | None:
    """Whether the trials started from ImageNet weights: their run records, else the profile with the best overrides."""
    values = {m["pretrained"] for m in metas if "pretrained" in m}
    if values:
        return values.pop() if len(values) == 1 else None
    if "best_overrides" in summary:
        return config.resolve(summary["regime"], summary["model"], summary["dataset"], summary["profile"],
                              summary["best_overrides"]).get("pretrained")
    return None


def search_text(folder: Path, summary: dict[str, Any], trials: pd.DataFrame,
                metas: list[dict[str, Any]]) -> tuple[str, str]:
    """(title, MyST text) of one search: where its numbers came from, its best trial and how to re-run it."""
    from .store import DATASET_LABELS, MODEL_LABELS, REGIME_LABELS, init_label
    from .tables import pct

    pretrained = search_pretrained(summary, metas)
    title = (f"{MODEL_LABELS.get(summary['model'], summary['model'])} on "
             f"{DATASET_LABELS.get(summary['dataset'], summary['dataset'])}, "
             f"{REGIME_LABELS.get(summary['regime'], summary['regime']).lower()}")
    days = sorted(str(d)[:10] for d in trials["completed"].dropna())
    when = "no trial finished" if not days else days[0] if days[0] == days[-1] else f"{days[0]} to {days[-1]}"
    devices = sorted({str(m["device"]) for m in metas if m.get("device")})
    source = " · ".join([f"search `{summary['study']}`", f"profile `{summary['profile']}`", init_label(pretrained),
                         *(f"device `{d}`" for d in devices), when])
    storage = ("a SQLite file, `study.db` in the search folder" if (folder / "study.db").is_file()
               else "a shared database (`--storage`) outside the search folder")
    counts = ", ".join(f"{n} {'failed' if s == 'fail' else s}" for s, n in summary["states"].items() if n)
    text = ""
    if pretrained is False:
        text += ("```{warning}\nThis search ran from **randomly initialised** backbones (`pretrained: false`), not "
                 "from ImageNet weights: its numbers show that the search runs, not which settings transfer "
                 "best.\n```\n\n")
    text += f"**Where these numbers come from:** {source} · storage: {storage} · trials: {counts}.\n\n"
    if "best_trial" in summary:
        best = trials[trials["number"] == summary["best_trial"]]
        test = best["test_accuracy"].iloc[0] if len(best) else None
        text += (f"**Best: trial {summary['best_trial']}**, validation accuracy **{pct(summary['best_value'], 2)}** "
                 f"(the score the search maximised). Its test accuracy, {pct(test, 2)}, is shown for reference "
                 f"only: it was never used to choose. Its settings: "
                 + ", ".join(f"`{k}` = `{v}`" for k, v in summary["best_params"].items())
                 + f". Re-run the best trial (with every setting it overrode, pinned ones included):\n\n"
                   f"```bash\n{summary['run_command']}\n```\n")
    else:
        text += "No trial of this search completed, so it has no best settings: the table shows what became of each.\n"
    return title, text


def trial_state(row: pd.Series) -> str:
    if row.get("surplus") in (True, "True"):
        return "not run (surplus)"
    if row["state"] == "fail":
        error = row.get("error")
        return "failed" + (f": {str(error).strip().splitlines()[0]}" if isinstance(error, str) else "")
    return str(row["state"])


def _trial_test(row: pd.Series) -> str:
    """A trial's test accuracy with its interval, from its run folder's predictions where this machine has them."""
    from .store import read_run
    from .tables import intervals, pct, pct_ci

    if pd.isna(row.get("test_accuracy")):
        return "—"
    run_dir = row.get("run_dir")
    try:
        iv = intervals(read_run(Path(run_dir)))["accuracy"] if isinstance(run_dir, str) else None
    except (StoreError, ValueError):
        iv = None  # the run folder is elsewhere (a shared search) or lacks predictions
    return pct_ci(iv.value, iv.low, iv.high) if iv else f"{pct(row['test_accuracy'])} (no interval: no run folder here)"


def trials_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """Every trial: its settings, what became of it, its validation accuracy, pruning epoch and test accuracy."""
    params = [c for c in trials.columns if c.startswith("param_")]
    return pd.DataFrame({"trial": trials["number"], "state": trials.apply(trial_state, axis=1),
                         **{c.removeprefix("param_"): trials[c] for c in params},
                         "val accuracy": trials["val_accuracy"],
                         "pruned after epoch": trials["pruned_epoch"].astype("Int64"),
                         "test accuracy [95% CI] (not used)": trials.apply(_trial_test, axis=1)})


def has_curves(trials: pd.DataFrame) -> bool:
    return bool(trials["reported"].map(lambda s: bool(json.loads(s)) if isinstance(s, str) else False).any())


def importances_or_reason(folder: Path, trials: pd.DataFrame) -> tuple[pd.DataFrame | None, str]:
    """The study's parameter importances, or (None, why there are none)."""
    importances = pd.read_csv(folder / "importances.csv") if (folder / "importances.csv").is_file() else None
    scores = trials.loc[trials["state"] == "complete", "val_accuracy"]
    if importances is not None and len(importances) and scores.nunique() > 1:
        return importances, ""
    if len(scores) < 2:
        return None, f"{len(scores)} complete trial{'s' if len(scores) != 1 else ''}; Optuna needs at least 2"
    if scores.nunique() == 1:
        return None, f"its {len(scores)} complete trials all reached the same validation accuracy: nothing to explain"
    return None, f"its {len(scores)} complete trials do not differ in any searched setting"
