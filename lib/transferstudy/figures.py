"""The study's figures. White background (readable in dark mode), labelled axes, class names.

Each function draws one message and returns the matplotlib Figure.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

plt.rcParams.update({"figure.facecolor": "white", "axes.facecolor": "white", "savefig.facecolor": "white",
                     "figure.dpi": 100, "axes.spines.top": False, "axes.spines.right": False})


def confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str,
                     normalize: bool = True, ax=None):
    """Rows are true classes; with ``normalize`` each row shows recall (fractions of that class)."""
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(0.55 * len(classes) + 2.5,) * 2)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i].sum() == 0:
                continue
            text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > 0.6 * (shown.max() or 1) else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
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
