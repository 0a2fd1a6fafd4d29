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


# --- the analyses' figures (Feature reuse, Data scarcity: report.analyses computes what they draw) ---------------

NETWORK_STYLES = {"backbone": ("-", "o"), "partial": ("--", "^"), "full": (":", "D")}  # line style, marker
REGIME_COLOURS = {"frozen_svm": "#8c6bb1", "linear_probe": "#4878a8", "partial": "#e8a33d", "full": "#c8553d",
                  "classical": "#6aa56a"}


def _panel_grid(rows: int, cols: int, width: float = 4.6, height: float = 3.8, **kwargs):
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kwargs)
    return fig, axes


def _band(ax, x, low, high, color) -> None:
    """A shaded interval where the points have one (NaN ends leave gaps)."""
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    if np.isfinite(low).any() and np.isfinite(high).any():
        ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)


def _model_network_legend(fig, models: dict[str, str], networks: dict[str, str]) -> None:
    handles = [plt.Line2D([], [], color=MODEL_COLOURS.get(m), linewidth=2.5, label=lab) for m, lab in models.items()]
    handles += [plt.Line2D([], [], color="grey", linestyle=NETWORK_STYLES.get(n, ("-", "o"))[0],
                           marker=NETWORK_STYLES.get(n, ("-", "o"))[1], label=lab) for n, lab in networks.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)


def _by_depth(points: pd.DataFrame, datasets: dict[str, str], models: dict[str, str], networks: dict[str, str],
              title: str, ylabel: str, ylim: tuple[float, float] | None, threshold: float | None):
    if points.empty:
        raise ValueError(f"{title}: nothing to draw; show figures.no_data(...) when no run has finished")
    fig, axes = _panel_grid(1, len(datasets), sharey=True)
    for ax, (dataset, label) in zip(axes[0], datasets.items()):
        shown = points[points["dataset"] == dataset]
        for model in models:
            for network in networks:
                line = shown[(shown["model"] == model) & (shown["network"] == network)].sort_values("depth")
                if line.empty:
                    continue
                style, marker = NETWORK_STYLES.get(network, ("-", "o"))
                colour = MODEL_COLOURS.get(model)
                ax.plot(line["depth"], line["value"], linestyle=style, marker=marker, markersize=4, color=colour)
                _band(ax, line["depth"], line["ci_low"], line["ci_high"], colour)
        if threshold is not None:
            ax.axhline(threshold, color="grey", linewidth=0.8, linestyle="-.")
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("relative depth (0: first probe point, 1: last)")
        ax.set_ylabel(ylabel)
        ax.set_title(label if len(shown) else f"{label}: no finished run")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _model_network_legend(fig, {m: lab for m, lab in models.items() if m in set(points["model"])}, networks)
    return fig


def knn_by_depth(points: pd.DataFrame, datasets: dict[str, str], models: dict[str, str], networks: dict[str, str],
                 title: str):
    """k-NN test accuracy at each probe point against relative depth, so AlexNet and DeiT-Base share an axis: one
    panel per dataset, colour per model, line style per network (backbone, fine-tunes), bands where a point has an
    interval. ``points``: dataset, model, network, depth, value, ci_low, ci_high (``analyses.probes``)."""
    return _by_depth(points, datasets, models, networks, title, "k-NN test accuracy", (0, 1), None)


def cka_by_depth(points: pd.DataFrame, datasets: dict[str, str], models: dict[str, str], networks: dict[str, str],
                 title: str, threshold: float = 0.5):
    """Each fine-tuned network's CKA with the backbone at each probe point against relative depth, with its
    bootstrap band and the ``threshold`` line: one panel per dataset, colour per model, line style per network."""
    return _by_depth(points, datasets, models, networks, title, "CKA with the backbone (95% bootstrap band)",
                     (0, 1.02), threshold)


def _unit_panels(frame: pd.DataFrame, datasets: dict[str, str], models: dict[str, str], title: str):
    if frame.empty:
        raise ValueError(f"{title}: nothing to draw; show figures.no_data(...) when no run has finished")
    shown_models = {m: lab for m, lab in models.items() if m in set(frame["model"])}
    shown_datasets = {d: lab for d, lab in datasets.items() if d in set(frame["dataset"])}
    widths = [max(3.0, 0.42 * frame[frame["model"] == m]["unit"].nunique() + 1.2) for m in shown_models]
    fig, axes = plt.subplots(len(shown_datasets), len(shown_models), squeeze=False,
                             figsize=(sum(widths) + 0.6, 3.4 * len(shown_datasets)),
                             gridspec_kw={"width_ratios": widths})
    return fig, axes, shown_datasets, shown_models


def weight_distance_bars(frame: pd.DataFrame, datasets: dict[str, str], models: dict[str, str],
                         networks: dict[str, str], title: str, skip: Sequence[str] = ("head",)):
    """How far each unit moved in fine-tuning (each tensor's ||w − w0|| / ||w0||, summed per unit), grouped bars, one
    bar per fine-tuned network; one panel per dataset (rows) and model (columns). ``frame``: dataset, model, network,
    unit, value (``analyses.units(frame, "weight_distance")``). The ``skip`` units (the new head, trained from a
    random start) are left out."""
    frame = frame[~frame["unit"].isin(skip)]
    fig, axes, shown_datasets, shown_models = _unit_panels(frame, datasets, models, title)
    width = 0.8 / max(len(networks), 1)
    for r, (dataset, dlabel) in enumerate(shown_datasets.items()):
        for c, (model, mlabel) in enumerate(shown_models.items()):
            ax = axes[r, c]
            shown = frame[(frame["dataset"] == dataset) & (frame["model"] == model)]
            order = list(pd.unique(shown["unit"]))
            x = np.arange(len(order))
            for k, network in enumerate(networks):
                bars = shown[shown["network"] == network].set_index("unit").reindex(order)["value"]
                ax.bar(x + (k - (len(networks) - 1) / 2) * width, bars.to_numpy(dtype=float), width,
                       color=MODEL_COLOURS.get(model), alpha=0.45 if network == "partial" else 0.95,
                       hatch="//" if network == "partial" else None, edgecolor="white", linewidth=0.5)
            ax.set_xticks(x, order, rotation=60, ha="right", fontsize=8)
            ax.set_xlabel("unit (input side first)")
            ax.set_ylabel("Σ over its tensors of ‖w − w₀‖ / ‖w₀‖")
            ax.set_title(f"{mlabel} on {dlabel}" if len(shown) else f"{mlabel} on {dlabel}: no finished run")
            ax.grid(True, axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor="grey", alpha=0.45 if n == "partial" else 0.95,
                             hatch="//" if n == "partial" else None, label=lab) for n, lab in networks.items()]
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    return fig


def resilience_points(frame: pd.DataFrame, datasets: dict[str, str], models: dict[str, str], title: str):
    """Test accuracy of one fine-tuned network with each unit restored to its start (filled) or re-drawn at random
    (crosses), with their intervals, against the network's own accuracy (line, and its interval as a band): a point
    below the band marks a unit the network needs. One panel per dataset (rows) and model (columns). ``frame``:
    ``analyses.resilience_table``'s rows of one network."""
    fig, axes, shown_datasets, shown_models = _unit_panels(frame, datasets, models, title)
    for r, (dataset, dlabel) in enumerate(shown_datasets.items()):
        for c, (model, mlabel) in enumerate(shown_models.items()):
            ax = axes[r, c]
            shown = frame[(frame["dataset"] == dataset) & (frame["model"] == model)].reset_index(drop=True)
            colour = MODEL_COLOURS.get(model)
            x = np.arange(len(shown))
            if len(shown) and pd.notna(shown["baseline"].iloc[0]):
                base = shown.iloc[0]
                ax.axhline(base["baseline"], color="black", linewidth=0.9)
                if pd.notna(base["baseline_low"]) and pd.notna(base["baseline_high"]):
                    ax.axhspan(base["baseline_low"], base["baseline_high"], color="grey", alpha=0.2, linewidth=0)
            for what, marker, face, shift in (("restore", "o", colour, -0.12), ("redraw", "x", "grey", 0.12)):
                value = shown[what].to_numpy(dtype=float)
                low, high = shown[f"{what}_low"].to_numpy(dtype=float), shown[f"{what}_high"].to_numpy(dtype=float)
                err = np.vstack([np.where(np.isfinite(low), value - low, 0), np.where(np.isfinite(high), high - value, 0)])
                ax.errorbar(x + shift, value, yerr=np.clip(err, 0, None), fmt=marker, color=face, mec=face,
                            capsize=2, linewidth=0.8, markersize=5)
            ax.set_xticks(x, shown["unit"], rotation=60, ha="right", fontsize=8)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("unit restored or re-drawn")
            ax.set_ylabel("test accuracy (95% interval)")
            ax.set_title(f"{mlabel} on {dlabel}" if len(shown) else f"{mlabel} on {dlabel}: no finished run")
            ax.grid(True, axis="y", alpha=0.3)
    handles = [plt.Line2D([], [], color="dimgrey", marker="o", linestyle="", label="unit restored to its start"),
               plt.Line2D([], [], color="grey", marker="x", linestyle="", label="unit re-drawn at random"),
               plt.Line2D([], [], color="black", linewidth=0.9, label="the network as trained (band: 95% interval)")]
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9)
    return fig


def cka_heatmap(layers: Sequence[str], matrix: np.ndarray, title: str):
    """A network's layer x layer CKA with itself: bright blocks are layers that represent the images alike."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape != (len(layers), len(layers)) or not len(layers):
        raise ValueError(f"cka_heatmap: a square matrix with one row per layer is needed; got {matrix.shape} for "
                         f"{len(layers)} layers")
    side = min(11.0, 0.32 * len(layers) + 3.2)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", origin="lower")
    ticks = np.arange(len(layers))
    ax.set_xticks(ticks, layers, rotation=90, fontsize=7 if len(layers) > 12 else 9)
    ax.set_yticks(ticks, layers, fontsize=7 if len(layers) > 12 else 9)
    ax.set_xlabel("probe point (input side first)")
    ax.set_ylabel("probe point (input side first)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="CKA", shrink=0.8)
    fig.tight_layout()
    return fig


def scarcity_curves(curves: pd.DataFrame, datasets: dict[str, str], models: dict[str, str], regimes: dict[str, str],
                    title: str):
    """Test accuracy against the fraction of the training split (log x): one line per regime, the mean over the
    subset draws with its band (min to max over the draws; a 95% interval where a fraction has one draw, drawn
    with a hollow marker); one panel per model (rows) and dataset (columns). ``curves``:
    ``analyses.scarcity_curves``."""
    if curves.empty:
        raise ValueError(f"{title}: nothing to draw; show figures.no_data(...) when no run has finished")
    shown_models = {m: lab for m, lab in models.items() if m in set(curves["model"])}
    fig, axes = _panel_grid(len(shown_models), len(datasets), height=3.6, sharey=True)
    fractions = sorted(curves["fraction"].unique())
    for r, (model, mlabel) in enumerate(shown_models.items()):
        for c, (dataset, dlabel) in enumerate(datasets.items()):
            ax = axes[r, c]
            shown = curves[(curves["model"] == model) & (curves["dataset"] == dataset)]
            for regime in regimes:
                line = shown[shown["regime"] == regime].sort_values("fraction")
                if line.empty:
                    continue
                colour = REGIME_COLOURS.get(regime, "grey")
                marker = REGIME_MARKERS.get(regime, "o")
                ax.plot(line["fraction"], line["mean"], color=colour, linewidth=1.5)
                _band(ax, line["fraction"], line["low"], line["high"], colour)
                one = line["band"] == "interval"
                ax.scatter(line.loc[~one, "fraction"], line.loc[~one, "mean"], marker=marker, color=colour, s=28,
                           zorder=3)
                ax.scatter(line.loc[one, "fraction"], line.loc[one, "mean"], marker=marker, facecolor="white",
                           edgecolor=colour, s=28, zorder=3)
            ax.set_xscale("log")
            ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
            ax.minorticks_off()
            ax.set_xlabel("fraction of the training split (log scale)")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{mlabel} on {dlabel}" if len(shown) else f"{mlabel} on {dlabel}: no finished run")
            ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], color=REGIME_COLOURS.get(r, "grey"), marker=REGIME_MARKERS.get(r, "o"), label=lab)
               for r, lab in regimes.items() if r in set(curves["regime"])]
    handles += [plt.Line2D([], [], color="grey", marker="o", linestyle="", label="mean of the draws (band: min–max)"),
                plt.Line2D([], [], color="grey", marker="o", mfc="white", linestyle="",
                           label="one draw (band: 95% interval)")]
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1 if len(handles) > 4 else 0.07, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), frameon=False, fontsize=9)
    return fig


def weight_vs_statistics(frame: pd.DataFrame, datasets: dict[str, str], models: dict[str, str], title: str):
    """Test accuracy of weight transfer (filled) and statistics transfer (hollow) with their 95% intervals, per model;
    one panel per dataset, each model labelled with (WT − ST) / WT. ``frame``: ``tables.weight_vs_statistics``."""
    if frame.empty:
        raise ValueError("weight_vs_statistics needs at least one pair of finished runs; draw figures.no_data instead")
    fig, axes = _panel_grid(1, len(datasets), width=5.0, height=3.8, sharey=True)
    for ax, (dataset, dlabel) in zip(axes[0], datasets.items()):
        shown = frame[frame["dataset"] == dataset].set_index("model")
        names = [m for m in models if m in shown.index]
        for x, model in enumerate(names):
            row, colour = shown.loc[model], MODEL_COLOURS.get(model)
            for dx, (key, face) in ((-0.12, ("wt", colour)), (0.12, ("st", "white"))):
                value, low, high = (100 * row[key], 100 * row[f"{key}_low"], 100 * row[f"{key}_high"])
                ax.errorbar(x + dx, value, yerr=[[max(value - low, 0)], [max(high - value, 0)]], fmt="o",
                            color=colour, mfc=face, capsize=3, markersize=7)
        shares = [f"(WT − ST)/WT = {shown.loc[m, 'share']:.2f}" if pd.notna(shown.loc[m, "share"])
                  else "WT scored 0" for m in names]
        ax.set_xticks(range(len(names)), [f"{models[m]}\n{share}" for m, share in zip(names, shares)])
        ax.set_xlim(-0.6, max(len(names), 1) - 0.4)
        ax.set_xlabel("backbone")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(dlabel if names else f"{dlabel}: no finished pair")
        ax.grid(True, axis="y", alpha=0.3)
    handles = [plt.Line2D([], [], color="grey", marker="o", linestyle="none", mfc=face, label=label)
               for face, label in (("grey", "weight transfer (WT): the starting weights"),
                                   ("white", "statistics transfer (ST): their mean and std"))]
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=9)
    return fig
