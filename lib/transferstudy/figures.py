"""The study's figures. White background (readable in dark mode), labelled axes, class names.

Each function draws one message and returns the matplotlib Figure.
"""

from __future__ import annotations

import json
from typing import Sequence

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd

plt.rcParams.update({"figure.facecolor": "white", "axes.facecolor": "white", "savefig.facecolor": "white",
                     "figure.dpi": 100, "axes.spines.top": False, "axes.spines.right": False})


def confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str,
                     normalize: bool = True, ax=None):
    """Rows are true classes; with ``normalize`` each row shows recall (fractions of that class)."""
    import seaborn as sns

    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(0.55 * len(classes) + 2.5,) * 2)
    sns.heatmap(pd.DataFrame(shown, index=list(classes), columns=list(classes)), ax=ax, cmap="Blues", vmin=0,
                vmax=1 if normalize else None, annot=True, fmt=".2f" if normalize else ".0f",
                annot_kws={"fontsize": 7}, square=True, linewidths=0.5, linecolor="white",
                cbar_kws={"label": "fraction of true class" if normalize else "count", "shrink": 0.8})
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes, rotation=0)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def per_class_f1(per_class: dict[str, dict[str, float]], title: str, ax=None):
    """Horizontal bars of per-class F1, weakest class at the bottom."""
    frame = pd.DataFrame(per_class).T.sort_values("f1")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 0.35 * len(frame) + 1.2))
    ax.barh(frame.index, frame["f1"], color="#4878a8")
    for y, value in enumerate(frame["f1"]):
        ax.text(value + 0.01, y, f"{value:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("F1 score (test)")
    ax.set_ylabel("class")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def training_curves(curves: pd.DataFrame, title: str, best_epoch: int | None = None):
    """Loss and accuracy per epoch, train vs validation, with the kept (best-on-val) epoch marked."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, label in ((ax_loss, "loss", "cross-entropy loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(curves["epoch"], curves[f"train_{metric}"], marker="o", label="train")
        ax.plot(curves["epoch"], curves[f"val_{metric}"], marker="s", label="validation")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"kept: epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.legend(frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def metrics_table(metrics: dict, classes: Sequence[str]) -> pd.DataFrame:
    """Per-class precision / recall / F1 / support on the test set, in class order."""
    frame = pd.DataFrame(metrics["test"]["per_class"]).T.loc[list(classes)]
    frame["support"] = frame["support"].astype(int)
    return frame.round(3)


# --- the book's figures ------------------------------------------------------------------

SPLIT_COLOURS = {"train": "#4878a8", "val": "#e8a33d", "test": "#6aa56a"}
MODEL_COLOURS = {"alexnet": "#c8553d", "deit_base": "#4878a8"}
REGIME_MARKERS = {"frozen_svm": "o", "linear_probe": "s", "partial": "^", "full": "D", "classical": "P"}


def class_balance(per_split: dict[str, dict[str, int]], title: str):
    """Grouped bars: images per class in each split (``{split: {class: count}}``)."""
    splits = list(per_split)
    classes = list(next(iter(per_split.values())))
    x = np.arange(len(classes))
    width = 0.8 / len(splits)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(classes) + 2), 3.6))
    for k, split in enumerate(splits):
        counts = [per_split[split][c] for c in classes]
        ax.bar(x + (k - (len(splits) - 1) / 2) * width, counts, width, label=split,
               color=SPLIT_COLOURS.get(split))
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_xlabel("class")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(title="split", frameon=False)
    fig.tight_layout()
    return fig


def sample_grid(images: dict[str, list[np.ndarray]], title: str):
    """One row of example images (uint8 HxWx3 or HxW) per class, the class name at the row's left."""
    rows = [c for c in images if images[c]]
    if not rows:
        raise ValueError("sample_grid: no images given; pass at least one image for one class")
    ncols = max(len(images[c]) for c in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.1 * ncols + 1.2, 1.1 * len(rows) + 0.6), squeeze=False)
    for r, cls in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if c < len(images[cls]):
                ax.imshow(images[cls][c], cmap="gray" if images[cls][c].ndim == 2 else None)
        axes[r, 0].set_ylabel(cls, rotation=0, ha="right", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def captioned_grid(images: Sequence[np.ndarray], captions: Sequence[str], title: str, ncols: int = 6):
    """Images in a grid, each with its caption (e.g. "true: cat / predicted: dog") above it."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"captioned_grid: got {len(images)} images and {len(captions)} captions; "
                         f"pass one caption per image, at least one image")
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.9 * ncols, 2.0 * nrows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def accuracy_vs_params(points: pd.DataFrame, datasets: dict[str, str], models: dict[str, str],
                       regimes: dict[str, str], title: str, ladder: Sequence[str] = ()):
    """Test accuracy against trainable parameters (log x): one panel per dataset, one marker per model x regime.

    ``points`` has columns dataset, model, regime, trainable, test_accuracy (and optionally ci_low, ci_high: the
    95% interval, drawn as error bars); the dicts map names to labels. A line joins each model's ``ladder``
    regimes in that order.
    """
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 4.6), squeeze=False, sharey=True)
    for ax, (dataset, label) in zip(axes[0], datasets.items()):
        shown = points[points["dataset"] == dataset]
        for row in shown.itertuples():
            if "ci_low" in shown:  # the 95% interval of the test accuracy
                ax.errorbar(row.trainable, row.test_accuracy, yerr=[[row.test_accuracy - row.ci_low],
                                                                    [row.ci_high - row.test_accuracy]],
                            color=MODEL_COLOURS.get(row.model), capsize=3, linewidth=1, zorder=2.5)
            ax.scatter(row.trainable, row.test_accuracy, s=70, marker=REGIME_MARKERS.get(row.regime, "o"),
                       color=MODEL_COLOURS.get(row.model), edgecolor="black", linewidth=0.5, zorder=3)
        for model in models:
            line = shown[shown["model"] == model].set_index("regime").reindex(list(ladder)).dropna(subset=["trainable"])
            ax.plot(line["trainable"], line["test_accuracy"], color=MODEL_COLOURS.get(model), alpha=0.35, zorder=2)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("test accuracy (95% interval)" if "ci_low" in shown else "test accuracy")
        ax.set_title(label if len(shown) else f"{label}: no finished runs")
        ax.grid(True, which="major", alpha=0.3)
    handles = [plt.Line2D([], [], color=MODEL_COLOURS.get(m), marker="o", linestyle="", label=lab)
               for m, lab in models.items()]
    handles += [plt.Line2D([], [], color="grey", marker=REGIME_MARKERS.get(r, "o"), linestyle="", label=lab)
                for r, lab in regimes.items()]
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False, fontsize=9)
    return fig


def embedding_scatter(panels: dict[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str], method: str,
                      title: str):
    """2-D embeddings side by side (``{panel title: (points [N, 2], labels [N])}``), coloured by class."""
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.6, 4.2), squeeze=False)
    for ax, (name, (xy, y)) in zip(axes[0], panels.items()):
        for k, cls in enumerate(classes):
            mask = y == k
            ax.scatter(xy[mask, 0], xy[mask, 1], s=max(6.0, min(30.0, 6000 / len(y))), color=cmap(k % 10),
                       label=cls, alpha=0.8)
        ax.set_title(name)
        ax.set_xlabel(f"{method} 1")
        ax.set_ylabel(f"{method} 2")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], color=cmap(k % 10), marker="o", linestyle="", label=c) for k, c in enumerate(classes)]
    fig.legend(handles=handles, title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def per_class_f1_compare(f1: pd.DataFrame, title: str):
    """Grouped horizontal bars of per-class test F1, weakest class at the bottom.

    ``f1`` is tidy: one row per run and class, columns ``class``, ``f1`` and ``run`` (the run's label).
    """
    import seaborn as sns

    order = f1.groupby("class", sort=False)["f1"].mean().sort_values(ascending=False).index.tolist()
    runs = f1["run"].nunique()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(order) * max(1, runs / 2) + 1.4))
    sns.barplot(f1, y="class", x="f1", hue="run", order=order, orient="h", ax=ax, errorbar=None)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("F1 score (test)")
    ax.set_ylabel("class (weakest at the bottom)")
    ax.set_title(title)
    ax.legend(frameon=False, loc="lower right", fontsize=8, title=None)
    fig.tight_layout()
    return fig


def no_data(message: str):
    """A small figure that says why there is nothing to draw (so a page's figure slot is never empty)."""
    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11)
    ax.set_axis_off()
    return fig


def difference_intervals(frame: pd.DataFrame, label: str, title: str, xlabel: str):
    """Paired differences with their 95% intervals, one row each, and the line of no difference.

    ``frame`` has columns ``label`` (the row's name), difference, diff_low, diff_high and p; a row whose
    interval excludes 0 (p < 0.05) is drawn filled, the others hollow.
    """
    frame = frame.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7, 0.42 * len(frame) + 1.5))
    y = np.arange(len(frame))[::-1]
    for yi, row in zip(y, frame.itertuples()):
        significant = row.p < 0.05
        ax.errorbar(100 * row.difference, yi, xerr=[[100 * (row.difference - row.diff_low)],
                                                    [100 * (row.diff_high - row.difference)]],
                    fmt="o", color="#4878a8", mfc="#4878a8" if significant else "white", capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, frame[label])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("comparison")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


# --- the hyperparameter search's figures (a search folder's trials.csv and importances.csv) ---------

SEARCH_STATES = {"complete": ("o", "#4878a8"), "pruned": ("x", "#e8a33d")}


def search_history(trials: pd.DataFrame, title: str):
    """Each trial's validation accuracy by trial number (a pruned trial at its last reported value), and the
    best complete trial so far. ``trials`` is a search's ``trials.csv``."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for state, (marker, color) in SEARCH_STATES.items():
        rows = trials[trials["state"] == state]
        if len(rows):
            ax.scatter(rows["number"], rows["val_accuracy"], marker=marker, color=color, label=state, zorder=3)
    complete = trials[trials["state"] == "complete"].sort_values("number")
    if len(complete):
        ax.step(complete["number"], complete["val_accuracy"].cummax(), where="post", color="#6aa56a",
                label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial", ylabel="validation accuracy", title=title)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def search_curves(trials: pd.DataFrame, title: str):
    """The validation accuracy each trial reported after every epoch (what the pruner compared); dashed:
    pruned there. ``trials`` is a search's ``trials.csv``, whose ``reported`` column is JSON ``{epoch: value}``."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for row in trials.itertuples():
        curve = {int(k): v for k, v in json.loads(row.reported).items()} if isinstance(row.reported, str) else {}
        if curve:
            epochs = sorted(curve)
            ax.plot(epochs, [curve[e] for e in epochs], marker=".", alpha=0.8,
                    linestyle="--" if row.state == "pruned" else "-", label=f"trial {row.number}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=title)
    if ax.lines:
        ax.legend(frameon=False, fontsize="small", ncol=2)
    fig.tight_layout()
    return fig


def param_importances(importances: pd.DataFrame, title: str):
    """Horizontal bars of each searched setting's importance (columns param, importance: a search's
    ``importances.csv``), the most important at the top."""
    if importances.empty:
        raise ValueError("param_importances: importances.csv is empty; Optuna needs at least 2 complete trials "
                         "with different settings to estimate importances")
    frame = importances.sort_values("importance")
    fig, ax = plt.subplots(figsize=(6, 1.3 + 0.45 * len(frame)))
    ax.barh(frame["param"].astype(str), frame["importance"], color="#8c6bb1")
    ax.set(xlabel="importance (share of variance)", ylabel="searched setting", title=title)
    fig.tight_layout()
    return fig
