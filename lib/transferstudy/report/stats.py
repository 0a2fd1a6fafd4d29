"""The uncertainty of every number in the book: bootstrap intervals, exact tests and the sentences they choose.

Every interval is a percentile bootstrap over test images: resample ``i`` is row ``i`` of
``numpy.random.default_rng(seed).integers(0, n, size=(n_boot, n))`` (drawn in chunks so memory stays
bounded; chunking does not change the draws), the statistic is computed on each resample, and the
interval is ``np.quantile(stats, [(1 - c) / 2, 1 - (1 - c) / 2])``. The point value is the statistic
on the original sample. Everything is deterministic for a given ``seed``.

Pure numpy/scipy: no pandas, no torch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats

__all__ = [
    "ALPHA", "N_BOOT", "SEED", "Comparison", "Interval", "accuracy_ci", "compare_paired",
    "comparison_sentence", "direction", "format_p", "macro_f1_ci", "mcnemar_exact",
    "paired_difference_ci", "relative_difference_ci", "significant", "unpaired_difference_ci", "unpaired_p",
]

N_BOOT = 2000
"""Default number of bootstrap resamples (the issue asks for at least 1,000)."""
SEED = 42
"""Default seed; every function takes ``seed=`` and is deterministic for a given seed."""
ALPHA = 0.05
"""Significance threshold used by the sentence chooser."""

# Resampled indices drawn at once, at most (int64: 32 MB). CIFAR-10's 10,000 test images x 2,000
# resamples would otherwise be 160 MB of indices in one array.
_CHUNK_ENTRIES = 4_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval (95% unless asked otherwise)."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, Any]:
        """``{"value": value, "ci": [low, high]}`` as plain Python floats (JSON-ready)."""
        return {"value": float(self.value), "ci": [float(self.low), float(self.high)]}


@dataclass(frozen=True)
class Comparison:
    """Two classifiers A and B scored on the same ``n`` images: accuracies, B - A, discordant counts, McNemar p."""

    n: int
    a: Interval
    b: Interval
    difference: Interval
    a_only: int
    """Images A got right and B got wrong."""
    b_only: int
    """Images B got right and A got wrong."""
    p: float
    """Two-sided exact McNemar p for B vs A."""

    def as_dict(self) -> dict[str, Any]:
        """The comparison as plain Python floats/ints (``json.dumps`` works on it)."""
        return {
            "a": {"accuracy": float(self.a.value), "ci": [float(self.a.low), float(self.a.high)]},
            "b": {"accuracy": float(self.b.value), "ci": [float(self.b.low), float(self.b.high)]},
            "difference": float(self.difference.value),
            "difference_ci": [float(self.difference.low), float(self.difference.high)],
            "n": int(self.n),
            "b_only": int(self.b_only),
            "a_only": int(self.a_only),
            "mcnemar_p": float(self.p),
        }


# --------------------------------------------------------------------------------------------- validation


def _check_bootstrap(n_boot: Any, seed: Any, confidence: Any) -> None:
    """Reject a resample count, seed or confidence level the bootstrap cannot use."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1 (default {N_BOOT}); got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (default {SEED}); got {seed!r}")
    if (isinstance(confidence, bool) or not isinstance(confidence, numbers.Real)
            or not 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be a number strictly between 0 and 1, e.g. 0.95; got {confidence!r}")


def _correctness(name: str, correct: Any) -> np.ndarray:
    """``correct`` as a 1-d boolean array, one entry per test image; ValueError unless it is non-empty bool/0-1."""
    arr = np.asarray(correct)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array with one entry per test image; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: pass one correct/incorrect entry per test image")
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be boolean or 0/1 (True where the prediction is right); got dtype {arr.dtype}")
    bad = ~((arr == 0) | (arr == 1))
    if bad.any():
        raise ValueError(f"{name} must hold only 0/1 or True/False (True where the prediction is right); "
                         f"got {np.asarray(arr[bad]).ravel()[0]!r} at index {int(np.flatnonzero(bad)[0])}")
    return arr == 1


def _labels(name: str, y: Any, n_classes: int) -> np.ndarray:
    """``y`` as a 1-d integer label array in ``[0, n_classes)``."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array of integer labels; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: pass one label per test image")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels in [0, {n_classes}); got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= n_classes:
        raise ValueError(f"{name} must hold integer labels in [0, {n_classes}) for n_classes={n_classes}; "
                         f"got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64, copy=False)


def _same_length(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    """ValueError unless ``a`` and ``b`` describe the same images (equal lengths)."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have one entry per image of the same test set; "
                         f"got lengths {len(a)} and {len(b)}")


def _check_p(p: Any) -> float:
    """``p`` as a float in [0, 1]."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1]; got {p!r}")
    return float(p)


def _check_alpha(alpha: Any) -> float:
    """``alpha`` as a float in (0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be a significance level strictly between 0 and 1, e.g. {ALPHA}; got {alpha!r}")
    return float(alpha)


def _check_difference(difference: Any) -> float:
    """``difference`` as a finite float."""
    if isinstance(difference, bool) or not isinstance(difference, numbers.Real) or not math.isfinite(difference):
        raise ValueError(f"difference must be a finite number (B - A as a fraction, e.g. 0.114); got {difference!r}")
    return float(difference)


# ---------------------------------------------------------------------------------------------- bootstrap


def _resamples(rng: np.random.Generator, n: int, n_boot: int) -> Iterator[np.ndarray]:
    """Row blocks of ``rng.integers(0, n, size=(n_boot, n))``, at most ``_CHUNK_ENTRIES`` indices each."""
    rows = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def _bootstrap(rng: np.random.Generator, n: int, n_boot: int,
               statistic: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``statistic`` (indices of shape (k, n) -> k values) over ``n_boot`` resamples of ``n`` images."""
    return np.concatenate([statistic(idx) for idx in _resamples(rng, n, n_boot)])


def _interval(value: float, boot: np.ndarray, confidence: float) -> Interval:
    """The percentile interval of ``boot`` around the point ``value``."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return Interval(float(value), float(low), float(high))


def _mean_rows(correct: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Accuracy of each resample: the fraction of resampled images that are correct."""
    return lambda idx: correct[idx].mean(axis=1)


def accuracy_ci(correct: Any, n_boot: int = N_BOOT, seed: int = SEED, confidence: float = 0.95) -> Interval:
    """Accuracy (fraction of ``correct`` images) with its percentile-bootstrap interval over test images."""
    _check_bootstrap(n_boot, seed, confidence)
    c = _correctness("correct", correct)
    boot = _bootstrap(np.random.default_rng(seed), len(c), n_boot, _mean_rows(c))
    return _interval(c.mean(), boot, confidence)


def _macro_f1_rows(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Macro F1 of each resample, from per-class bincounts (no per-resample Python loop)."""

    def statistic(idx: np.ndarray) -> np.ndarray:
        k = idx.shape[0]
        offset = (np.arange(k, dtype=np.int64) * n_classes)[:, None]
        t, p = y_true[idx], y_pred[idx]
        size = k * n_classes
        true_count = np.bincount((t + offset).ravel(), minlength=size)
        pred_count = np.bincount((p + offset).ravel(), minlength=size)
        tp = np.bincount((t + offset)[t == p], minlength=size)
        return _macro_f1_from_counts(tp, true_count, pred_count).reshape(k, n_classes).mean(axis=1)

    return statistic


def _macro_f1_from_counts(tp: np.ndarray, true_count: np.ndarray, pred_count: np.ndarray) -> np.ndarray:
    """Per-class F1 = 2 TP / (support + predicted), 0 where a class is neither present nor predicted."""
    denom = true_count + pred_count
    return np.divide(2.0 * tp, denom, out=np.zeros(tp.shape, dtype=float), where=denom > 0)


def macro_f1_ci(y_true: Any, y_pred: Any, n_classes: int, n_boot: int = N_BOOT, seed: int = SEED,
                confidence: float = 0.95) -> Interval:
    """Macro F1 over all ``n_classes`` labels with its percentile-bootstrap interval over test images.

    A class absent from a resample (neither true nor predicted) scores 0, as sklearn's
    ``f1_score(average="macro", labels=range(n_classes), zero_division=0)``.
    """
    _check_bootstrap(n_boot, seed, confidence)
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer (the number of labels); got {n_classes!r}")
    n_classes = int(n_classes)
    t, p = _labels("y_true", y_true, n_classes), _labels("y_pred", y_pred, n_classes)
    _same_length("y_true", t, "y_pred", p)
    value = _macro_f1_from_counts(np.bincount(t[t == p], minlength=n_classes),
                                  np.bincount(t, minlength=n_classes),
                                  np.bincount(p, minlength=n_classes)).mean()
    boot = _bootstrap(np.random.default_rng(seed), len(t), n_boot, _macro_f1_rows(t, p, n_classes))
    return _interval(value, boot, confidence)


def _paired_boot(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap accuracies of A and B, each resample of image indices applied to both."""
    parts = [(a[idx].mean(axis=1), b[idx].mean(axis=1))
             for idx in _resamples(np.random.default_rng(seed), len(a), n_boot)]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def paired_difference_ci(correct_a: Any, correct_b: Any, n_boot: int = N_BOOT, seed: int = SEED,
                         confidence: float = 0.95) -> Interval:
    """accuracy(B) - accuracy(A) on the same images, with a paired bootstrap interval (one resample, both models)."""
    _check_bootstrap(n_boot, seed, confidence)
    a, b = _correctness("correct_a", correct_a), _correctness("correct_b", correct_b)
    _same_length("correct_a", a, "correct_b", b)
    boot_a, boot_b = _paired_boot(a, b, n_boot, seed)
    return _interval(b.mean() - a.mean(), boot_b - boot_a, confidence)


def relative_difference_ci(correct_a: Any, correct_b: Any, n_boot: int = N_BOOT, seed: int = SEED,
                           confidence: float = 0.95) -> Interval:
    """(accuracy(B) - accuracy(A)) / accuracy(B) on the same images, with a paired bootstrap interval (the resamples
    of :func:`paired_difference_ci`): the share of B's accuracy that A does not reach. With A statistics transfer and
    B weight transfer it is Matsoukas et al. (2022)'s (WT - ST) / WT. Undefined (NaN, NaN, NaN) when B gets no image
    right; resamples in which B gets none right are left out of the interval."""
    _check_bootstrap(n_boot, seed, confidence)
    a, b = _correctness("correct_a", correct_a), _correctness("correct_b", correct_b)
    _same_length("correct_a", a, "correct_b", b)
    if not b.any():
        return Interval(math.nan, math.nan, math.nan)
    boot_a, boot_b = _paired_boot(a, b, n_boot, seed)
    kept = boot_b > 0
    return _interval((b.mean() - a.mean()) / b.mean(), (boot_b[kept] - boot_a[kept]) / boot_b[kept], confidence)


def unpaired_difference_ci(correct_a: Any, correct_b: Any, n_boot: int = N_BOOT, seed: int = SEED,
                           confidence: float = 0.95) -> Interval:
    """accuracy(B) - accuracy(A) on different test sets, with independent bootstrap resamples of each.

    A's resamples come first from the seeded generator, then B's, so A's bootstrap distribution is
    exactly ``accuracy_ci(correct_a, seed=seed)``'s.
    """
    _check_bootstrap(n_boot, seed, confidence)
    a, b = _correctness("correct_a", correct_a), _correctness("correct_b", correct_b)
    rng = np.random.default_rng(seed)
    boot_a = _bootstrap(rng, len(a), n_boot, _mean_rows(a))
    boot_b = _bootstrap(rng, len(b), n_boot, _mean_rows(b))
    return _interval(b.mean() - a.mean(), boot_b - boot_a, confidence)


# ------------------------------------------------------------------------------------------------- tests


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p: a binomial test (p = 1/2) on the discordant pairs; 1.0 when there are none."""
    for name, count in (("a_only", a_only), ("b_only", b_only)):
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"{name} must be a non-negative integer count of discordant images; got {count!r}")
    n = int(a_only) + int(b_only)
    if n == 0:
        return 1.0
    return float(_scipy_stats.binomtest(int(b_only), n, 0.5).pvalue)


def unpaired_p(correct_a: Any, correct_b: Any) -> float:
    """Two-sided p for a difference of two independent proportions (Fisher's exact test on the 2x2 table)."""
    a, b = _correctness("correct_a", correct_a), _correctness("correct_b", correct_b)
    table = [[int(a.sum()), int(len(a) - a.sum())], [int(b.sum()), int(len(b) - b.sum())]]
    return float(_scipy_stats.fisher_exact(table, alternative="two-sided").pvalue)


def compare_paired(y_true: Any, pred_a: Any, pred_b: Any, n_boot: int = N_BOOT, seed: int = SEED,
                   confidence: float = 0.95) -> Comparison:
    """Compare classifiers A and B on the same images: both accuracies, B - A (paired), discordant counts, McNemar p.

    The three intervals share one set of resamples (those of ``accuracy_ci(..., seed=seed)``).
    """
    _check_bootstrap(n_boot, seed, confidence)
    t, pa, pb = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    for name, arr in (("y_true", t), ("pred_a", pa), ("pred_b", pb)):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-d array with one label per test image; got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{name} is empty: pass one label per test image")
    _same_length("y_true", t, "pred_a", pa)
    _same_length("y_true", t, "pred_b", pb)
    a, b = pa == t, pb == t
    boot_a, boot_b = _paired_boot(a, b, n_boot, seed)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    return Comparison(
        n=len(t),
        a=_interval(a.mean(), boot_a, confidence),
        b=_interval(b.mean(), boot_b, confidence),
        difference=_interval(b.mean() - a.mean(), boot_b - boot_a, confidence),
        a_only=a_only,
        b_only=b_only,
        p=mcnemar_exact(a_only, b_only),
    )


# --------------------------------------------------------------------------------------------- sentences


def significant(p: float, alpha: float = ALPHA) -> bool:
    """Whether ``p`` is below the significance threshold ``alpha``."""
    return _check_p(p) < _check_alpha(alpha)


def direction(difference: float, p: float, *, better: str = "beats", worse: str = "trails",
              same: str = "is indistinguishable from", alpha: float = ALPHA) -> str:
    """The verb of a comparison sentence, chosen by the data.

    ``same`` when ``p >= alpha`` (whatever the sign of ``difference``), otherwise ``better`` when
    ``difference > 0`` and ``worse`` when ``difference < 0`` (``same`` for an exact zero).
    """
    d = _check_difference(difference)
    if not significant(p, alpha) or d == 0.0:
        return same
    return better if d > 0 else worse


def format_p(p: float) -> str:
    """``p`` for prose: "p = 0.41" (>= 0.1), "p = 0.003" / "p = 0.012" (>= 0.001), "p < 0.001".

    The printed value never lands on the other side of ``ALPHA`` from ``p`` itself
    (0.0496 prints as "p = 0.0496", not "p = 0.050").
    """
    p = _check_p(p)
    if p < 0.001:
        return "p < 0.001"
    decimals = 2 if p >= 0.1 else 3
    text = f"{p:.{decimals}f}"
    while (float(text) < ALPHA) != (p < ALPHA) and decimals < 8:
        decimals += 1
        text = f"{p:.{decimals}f}"
    return f"p = {text}"


def comparison_sentence(subject: str, other: str, difference: float, p: float, unit_scale: float = 100.0,
                        *, unit: str = "pp") -> str:
    """A sentence comparing ``subject`` (B) with ``other`` (A); ``difference`` is B - A as a fraction.

    "DeiT-Base beats AlexNet by 11.4 pp (p = 0.003)", "DeiT-Base trails AlexNet by 2.0 pp (p = 0.012)",
    "DeiT-Base is indistinguishable from AlexNet (difference +1.3 pp, p = 0.41)". The difference is
    multiplied by ``unit_scale`` (percentage points by default) and printed with one decimal.
    """
    d = _check_difference(difference)
    verb = direction(d, p)
    scaled = d * float(unit_scale)
    if verb == "is indistinguishable from":
        return f"{subject} {verb} {other} (difference {scaled:+.1f} {unit}, {format_p(p)})"
    return f"{subject} {verb} {other} by {abs(scaled):.1f} {unit} ({format_p(p)})"
