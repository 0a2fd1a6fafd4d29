"""The book's tables, computed from the results store, each number with its interval.

Every function takes a ``Store`` and returns a tidy pandas DataFrame (fractions, not percentages);
``show`` formats one for a page. Comparisons on the same test images are paired (bootstrap interval of
the difference, McNemar's exact test); comparisons across datasets are unpaired (independent bootstrap,
Fisher's exact test). A pair whose runs have not both finished is left out.
"""

from __future__ import annotations

from importlib import resources
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd

from .. import config
from . import stats
from .store import DATASET_LABELS, LADDER, MODEL_LABELS, REGIME_LABELS, REGIME_SHORT, Run, Store, StoreError


def pct(value: float | None, digits: int = 1) -> str:
    """0.7195 -> '72.0%' (— for a missing value)."""
    return "—" if value is None or pd.isna(value) else f"{100 * float(value):.{digits}f}%"


def pct_ci(value: float, low: float, high: float, digits: int = 1) -> str:
    """'72.0% [68.1, 75.6]': a fraction with its 95% interval, in percent."""
    if value is None or pd.isna(value):
        return "—"
    return f"{100 * value:.{digits}f}% [{100 * low:.{digits}f}, {100 * high:.{digits}f}]"


def pp_ci(value: float, low: float, high: float) -> str:
    """'+11.4 pp [8.0, 14.9]': a difference of fractions in percentage points, with its interval."""
    if value is None or pd.isna(value):
        return "—"
    return f"{100 * value:+.1f} pp [{100 * low:+.1f}, {100 * high:+.1f}]"


# --- one run, one pair ------------------------------------------------------------------------


def accuracy_interval(right: int, n: int) -> stats.Interval:
    """The bootstrap interval of an accuracy of ``right`` out of ``n`` images.

    Resampling images resamples only right / wrong, so the interval depends on the two counts alone; taking
    them in one fixed order gives every page the same interval for the same run, and gives one for the
    classifiers whose predictions a run did not keep (their confusion matrix has the counts).
    """
    return stats.accuracy_ci(np.arange(n) < right)


def intervals(run: Run) -> dict[str, stats.Interval]:
    """Test accuracy and macro F1 of a finished run's kept classifier, each with its bootstrap interval."""
    if "intervals" not in run.__dict__:
        pred = run.predictions
        run.__dict__["intervals"] = {
            "accuracy": accuracy_interval(int(pred.correct.sum()), len(pred.correct)),
            "macro_f1": stats.macro_f1_ci(pred.y_true, pred.y_pred, len(run.classes))}
    return run.__dict__["intervals"]


def same_test_images(a: Run, b: Run) -> None:
    """Refuse a paired comparison of runs that scored different test images (other subsets or label rules)."""
    pa, pb = a.predictions, b.predictions
    if len(pa.files) != len(pb.files) or not (np.array_equal(pa.files, pb.files)
                                              and np.array_equal(pa.y_true, pb.y_true)):
        raise StoreError(f"{a.run_dir} and {b.run_dir} were scored on different test images ({a.test_set()} vs "
                         f"{b.test_set()}): a paired comparison needs the same test subset and label rule; rerun "
                         f"one of them with the other's n_test / label_rule")


def compare(a: Run, b: Run) -> stats.Comparison:
    """B against A on the same test images: both accuracies, the difference B − A, discordant pairs, McNemar."""
    same_test_images(a, b)
    return stats.compare_paired(a.predictions.y_true, a.predictions.y_pred, b.predictions.y_pred)


# --- tables -------------------------------------------------------------------------------------


def accuracy(store: Store) -> pd.DataFrame:
    """Every finished run's kept classifier: test accuracy and macro F1 with 95% intervals, trainable parameters."""
    rows = []
    for run in store.finished():
        iv = intervals(run)
        rows.append({"dataset": run.dataset, "model": run.model, "regime": run.regime, "classifier": run.best,
                     "trainable": run.meta.get("trainable"), "n_test": len(run.predictions.y_true),
                     "val_accuracy": run.val.get("accuracy"),
                     "test_accuracy": iv["accuracy"].value, "ci_low": iv["accuracy"].low,
                     "ci_high": iv["accuracy"].high, "macro_f1": iv["macro_f1"].value,
                     "f1_low": iv["macro_f1"].low, "f1_high": iv["macro_f1"].high})
    return pd.DataFrame(rows, columns=["dataset", "model", "regime", "classifier", "trainable", "n_test",
                                       "val_accuracy", "test_accuracy", "ci_low", "ci_high", "macro_f1", "f1_low",
                                       "f1_high"])


_PAIR_COLUMNS = ["a", "b", "a_accuracy", "b_accuracy", "difference", "diff_low", "diff_high", "a_only", "b_only",
                 "p", "verdict"]


def _paired_row(a: Run, b: Run, a_name: str, b_name: str) -> dict[str, Any]:
    c = compare(a, b)
    return {"a": a_name, "b": b_name, "a_accuracy": c.a.value, "b_accuracy": c.b.value,
            "difference": c.difference.value, "diff_low": c.difference.low, "diff_high": c.difference.high,
            "a_only": c.a_only, "b_only": c.b_only, "p": c.p,
            "verdict": stats.comparison_sentence(b_name, a_name, c.difference.value, c.p)}


def cnn_vs_vit(store: Store) -> pd.DataFrame:
    """DeiT-Base against AlexNet, per dataset and regime, on the same test images (paired)."""
    rows = []
    for dataset in config.DATASETS:
        for regime in config.NOTEBOOK_REGIMES:
            a, b = store.run(dataset, "alexnet", regime), store.run(dataset, "deit_base", regime)
            if a.ok and b.ok:
                rows.append({"dataset": dataset, "regime": regime,
                             **_paired_row(a, b, MODEL_LABELS["alexnet"], MODEL_LABELS["deit_base"])})
    return pd.DataFrame(rows, columns=["dataset", "regime", *_PAIR_COLUMNS])


def ladder(store: Store) -> pd.DataFrame:
    """What each step of training adds: frozen SVM → linear probe → partial → full, per dataset and model (paired)."""
    rows = []
    for dataset in config.DATASETS:
        for model in config.MODELS:
            for lower, upper in pairwise(LADDER):
                a, b = store.run(dataset, model, lower), store.run(dataset, model, upper)
                if a.ok and b.ok:
                    rows.append({"dataset": dataset, "model": model, "step": f"{lower} → {upper}",
                                 **_paired_row(a, b, REGIME_LABELS[lower].lower(), REGIME_LABELS[upper].lower())})
    return pd.DataFrame(rows, columns=["dataset", "model", "step", *_PAIR_COLUMNS])


def near_vs_far(store: Store) -> pd.DataFrame:
    """The same model and regime on CIFAR-10 (near) and FERPlus (far): an unpaired difference, far − near."""
    near_name, far_name = config.DATASETS
    rows = []
    for model in config.MODELS:
        for regime in config.NOTEBOOK_REGIMES:
            near, far = store.run(near_name, model, regime), store.run(far_name, model, regime)
            if not (near.ok and far.ok):
                continue
            cn, cf = near.predictions.correct, far.predictions.correct
            diff, p = stats.unpaired_difference_ci(cn, cf), stats.unpaired_p(cn, cf)
            rows.append({"model": model, "regime": regime, "near": cn.mean(), "far": cf.mean(),
                         "difference": diff.value, "diff_low": diff.low, "diff_high": diff.high, "p": p,
                         "verdict": stats.comparison_sentence(DATASET_LABELS[far_name], DATASET_LABELS[near_name],
                                                              diff.value, p)})
    return pd.DataFrame(rows, columns=["model", "regime", "near", "far", "difference", "diff_low", "diff_high", "p",
                                       "verdict"])


TRANSFER_COLUMNS = ["dataset", "model", "wt", "wt_low", "wt_high", "st", "st_low", "st_high", "difference", "diff_low",
                    "diff_high", "wt_only", "st_only", "p", "share", "share_low", "share_high", "verdict"]


def weight_vs_statistics(store: Store) -> pd.DataFrame:
    """Weight transfer (the full fine-tune) against statistics transfer (the stats_transfer analysis's fine-tune,
    trained as that run was but for its start) per dataset and model, on the same test images: a
    :func:`transfer_row` each."""
    rows = []
    for dataset in config.DATASETS:
        for model in config.MODELS:
            wt, st = store.run(dataset, model, "full"), store.analysis(dataset, model, "stats_transfer")
            if not (wt.ok and st.ok):
                continue
            same_test_images(st, wt)
            rows.append({"dataset": dataset, "model": model,
                         **transfer_row(wt.predictions.y_true, wt.predictions.y_pred, st.predictions.y_pred)})
    return pd.DataFrame(rows, columns=TRANSFER_COLUMNS)


def transfer_row(y_true: np.ndarray, wt_pred: np.ndarray, st_pred: np.ndarray) -> dict[str, Any]:
    """Weight against statistics transfer on the same test images (paired): both accuracies, WT − ST with McNemar's
    p, and ``share`` = (WT − ST) / WT, Matsoukas et al. (2022)'s measure of how much of the fine-tune's accuracy the
    reused features bring; each with its bootstrap interval. The statistics-transfer run's page shows its own."""
    c = stats.compare_paired(y_true, st_pred, wt_pred)  # A: statistics transfer, B: weight transfer
    share = stats.relative_difference_ci(np.asarray(st_pred) == y_true, np.asarray(wt_pred) == y_true)
    return {"wt": c.b.value, "wt_low": c.b.low, "wt_high": c.b.high, "st": c.a.value, "st_low": c.a.low,
            "st_high": c.a.high, "difference": c.difference.value, "diff_low": c.difference.low,
            "diff_high": c.difference.high, "wt_only": c.b_only, "st_only": c.a_only, "p": c.p, "share": share.value,
            "share_low": share.low, "share_high": share.high,
            "verdict": stats.comparison_sentence("weight transfer", "statistics transfer", c.difference.value, c.p)}


def tally(frame: pd.DataFrame) -> dict[str, int]:
    """How many comparisons favour B, favour A, or are indistinguishable at ``stats.ALPHA``."""
    sig = frame["p"] < stats.ALPHA
    return {"b_ahead": int((sig & (frame["difference"] > 0)).sum()),
            "a_ahead": int((sig & (frame["difference"] < 0)).sum()), "same": int((~sig).sum()),
            "n": len(frame)}


def regime_runs(store: Store, regime: str) -> pd.DataFrame:
    """The four runs of one regime: status, validation and test accuracy (with interval), provenance."""
    rows = []
    for dataset in config.DATASETS:
        for model in config.MODELS:
            run = store.run(dataset, model, regime)
            row = {"dataset": DATASET_LABELS[dataset], "model": MODEL_LABELS[model],
                   "status": run.status if run.status != "missing" else "not run yet",
                   "classifier": run.best, "val accuracy": pct(run.val.get("accuracy")),
                   "test accuracy [95% CI]": "—", "trainable": run.meta.get("trainable"),
                   "provenance": run.provenance().replace("*", "").replace("`", "")}
            if run.ok:
                iv = intervals(run)["accuracy"]
                row["test accuracy [95% CI]"] = pct_ci(iv.value, iv.low, iv.high)
            elif run.error:
                row["status"] += ": " + str(run.error).strip().splitlines()[0][:160]
            rows.append(row)
    return pd.DataFrame(rows)


def per_class_f1(run: Run) -> pd.DataFrame:
    """Per-class test F1 of a run's kept classifier, tidy: class, f1, support."""
    per_class = run.test["per_class"]
    return pd.DataFrame([{"class": c, "f1": per_class[c]["f1"], "support": per_class[c]["support"],
                          "run": run.label} for c in run.classes])


def reported(store: Store) -> pd.DataFrame:
    """The original study's numbers beside this build's, per model, dataset, regime and classifier."""
    with resources.files("transferstudy").joinpath("reported.csv").open() as fh:
        study = pd.read_csv(fh)
    keys = ["model", "dataset", "regime", "classifier"]
    ours = store.table()
    ours = ours[ours["status"] == "ok"][[*keys, "val_accuracy", "test_accuracy"]]
    bounds = []
    for row in ours.itertuples():  # each classifier's interval, from its own confusion matrix
        cm = np.asarray(store.run(row.dataset, row.model, row.regime).scores[row.classifier]["test"]["confusion_matrix"])
        iv = accuracy_interval(int(np.trace(cm)), int(cm.sum()))
        bounds.append((iv.low, iv.high))
    ours = ours.assign(ci_low=[b[0] for b in bounds], ci_high=[b[1] for b in bounds])
    merged = study[[*keys, "val_accuracy", "test_accuracy", "note"]].merge(
        ours, on=keys, how="outer", suffixes=("_reported", "_here"))
    status = {(r.dataset, r.model, r.regime): r.status for r in store.runs.values()}
    merged["status"] = [status[(d, m, r)] for d, m, r in zip(merged["dataset"], merged["model"], merged["regime"])]
    merged = merged[[c for c in merged.columns if c != "note"] + ["note"]]
    order = {name: i for i, name in enumerate(config.NOTEBOOK_REGIMES)}
    return merged.sort_values(["dataset", "model", "regime", "classifier"],
                              key=lambda s: s.map(order) if s.name == "regime" else s, ignore_index=True)


def protocol(store: Store) -> pd.DataFrame:
    """What each finished run scored, as the loader applied it: layout, label rule, validation source, test size."""
    rows = [{"dataset": r.dataset, "model": r.model, "regime": r.regime, "layout": r.split_info.get("layout"),
             "label_rule": r.split_info.get("label_rule") or "—", "val_source": r.split_info.get("val_source"),
             "n_test": len(r.predictions.y_true), "n_train": r.split_info.get("n_train")}
            for r in store.finished()]
    return pd.DataFrame(rows, columns=["dataset", "model", "regime", "layout", "label_rule", "val_source", "n_test",
                                       "n_train"])


def provenance(store: Store) -> pd.DataFrame:
    """Where each run's numbers came from: status, weights, device, date, library versions."""
    return pd.DataFrame([{"dataset": DATASET_LABELS[r.dataset], "model": MODEL_LABELS[r.model],
                          "regime": REGIME_SHORT[r.regime], "status": r.status,
                          "weights": {True: "pretrained", False: "random init"}.get(r.pretrained, "—"),
                          "device": r.meta.get("device", "—"), "date": str(r.meta.get("date", "—"))[:10],
                          "torch / timm": f"{r.meta['torch']} / {r.meta.get('timm', '?')}" if r.meta.get("torch")
                          else "—"} for r in store.runs.values()])


def times(store: Store) -> pd.DataFrame:
    """Wall time and peak resident memory of every run that was attempted."""
    return pd.DataFrame([{"dataset": DATASET_LABELS[r.dataset], "model": MODEL_LABELS[r.model],
                          "regime": REGIME_SHORT[r.regime], "status": r.status,
                          "wall_s": r.meta.get("wall_s"), "peak_gib": (r.meta["peak_rss_mb"] / 1024
                                                                       if r.meta.get("peak_rss_mb") else None),
                          "device": r.meta.get("device")}
                         for r in store.runs.values() if r.status != "missing"],
                        columns=["dataset", "model", "regime", "status", "wall_s", "peak_gib", "device"])


def labelled(frame: pd.DataFrame) -> pd.DataFrame:
    """Dataset, model and regime names as the book writes them (short regime names: they sit in table cells)."""
    frame = frame.copy()
    for column, labels in (("dataset", DATASET_LABELS), ("model", MODEL_LABELS), ("regime", REGIME_SHORT)):
        if column in frame:
            frame[column] = frame[column].map(lambda v, labels=labels: labels.get(v, v))
    return frame


def show(frame: pd.DataFrame, percent: tuple[str, ...] = (), p: tuple[str, ...] = (), hide: tuple[str, ...] = (),
         ci: dict[str, tuple[str, str, str]] | None = None, pp: dict[str, tuple[str, str, str]] | None = None,
         digits: int = 1):
    """A table for a page: labels for names, fractions as percentages, p-values as 'p = …', no index.

    ``ci`` / ``pp`` name a new column and the (value, low, high) columns it is made of: an accuracy with its
    interval ('72.0% [68.1, 75.6]'), or a difference in percentage points; the parts are dropped.
    """
    frame = frame.copy()
    for name, parts, fmt in [*((n, c, lambda *v: pct_ci(*v, digits=digits)) for n, c in (ci or {}).items()),
                             *((n, c, pp_ci) for n, c in (pp or {}).items())]:
        frame.insert(frame.columns.get_loc(parts[0]), name, [fmt(*v) for v in zip(*(frame[c] for c in parts))])
        frame = frame.drop(columns=list(parts))
    frame = labelled(frame.drop(columns=[c for c in hide if c in frame]))
    counts = {c: "{:,}" for c in frame.columns if pd.api.types.is_integer_dtype(frame[c])}
    formats = (counts | {c: (lambda v: pct(v, digits)) for c in percent if c in frame}
               | {c: stats.format_p for c in p if c in frame})
    return frame.style.hide(axis="index").format(formats, na_rep="—")
