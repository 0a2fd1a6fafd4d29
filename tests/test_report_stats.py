"""transferstudy.report.stats: bootstrap intervals cover the truth, exact tests match scipy, sentences follow p."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import f1_score

from transferstudy.report import stats
from transferstudy.report.stats import (
    ALPHA,
    N_BOOT,
    SEED,
    Comparison,
    Interval,
    accuracy_ci,
    compare_paired,
    comparison_sentence,
    direction,
    format_p,
    macro_f1_ci,
    mcnemar_exact,
    paired_difference_ci,
    significant,
    unpaired_difference_ci,
    unpaired_p,
)


def test_defaults() -> None:
    assert N_BOOT >= 1000 and SEED == 42 and ALPHA == 0.05


# ----------------------------------------------------------------------------------------------- coverage


def test_accuracy_ci_covers_true_accuracy() -> None:
    """A classifier with true accuracy 0.7 on 200 images: the 95% interval covers 0.7 in >= 90% of test sets."""
    rng = np.random.default_rng(2024)
    draws, covered, widths = 200, 0, []
    for i in range(draws):
        correct = rng.random(200) < 0.7
        ci = accuracy_ci(correct, n_boot=1000, seed=i)
        assert ci.low <= ci.value <= ci.high
        covered += ci.low <= 0.7 <= ci.high
        widths.append(ci.high - ci.low)
    assert covered / draws >= 0.90, f"coverage {covered / draws:.3f}"
    # Not trivially wide either: the normal-theory 95% width is 2 * 1.96 * sqrt(.7 * .3 / 200) = 0.127.
    assert 0.10 < np.mean(widths) < 0.16


def test_paired_difference_ci_covers_true_difference() -> None:
    """Two correlated classifiers (A 0.70, B 0.80 on the same images): the interval covers +0.10 in >= 90%."""
    # Joint cells (A right, B right), (A right, B wrong), (A wrong, B right), (A wrong, B wrong).
    cells = np.array([0.60, 0.10, 0.20, 0.10])
    a_right, b_right = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)
    true_diff = (cells * b_right).sum() - (cells * a_right).sum()
    rng = np.random.default_rng(7)
    draws, covered, widths = 200, 0, []
    for i in range(draws):
        cell = rng.choice(4, size=200, p=cells)
        ci = paired_difference_ci(a_right[cell], b_right[cell], n_boot=1000, seed=i)
        covered += ci.low <= true_diff <= ci.high
        widths.append(ci.high - ci.low)
    assert covered / draws >= 0.90, f"coverage {covered / draws:.3f}"
    # Pairing matters: var(B - A) per image is 0.3 - 0.1**2 = 0.29, width ~ 2 * 1.96 * sqrt(.29 / 200) = 0.149,
    # well under the unpaired width 2 * 1.96 * sqrt((.21 + .16) / 200) = 0.169.
    assert 0.12 < np.mean(widths) < 0.16


# -------------------------------------------------------------------------------------------- exact tests


@pytest.mark.parametrize("a_only, b_only", [(0, 1), (1, 0), (3, 10), (10, 3), (7, 7), (0, 25), (120, 95)])
def test_mcnemar_exact_is_binomial_test_on_discordant_pairs(a_only: int, b_only: int) -> None:
    expected = scipy_stats.binomtest(b_only, a_only + b_only, 0.5).pvalue
    assert mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(a_only, b_only) == pytest.approx(mcnemar_exact(b_only, a_only), rel=1e-12)


def test_mcnemar_exact_without_discordant_pairs_is_one() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    # An exact combinatorial fact: all 5 discordant pairs one way -> 2 * (1/2)**5.
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32, rel=1e-12)


def test_compare_paired_counts_discordant_images() -> None:
    y_true = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    pred_a = np.array([0, 1, 2, 0, 0, 0, 1, 1, 2, 0])  # right: 0 1 2 3 7 8 9
    pred_b = np.array([0, 1, 0, 1, 1, 2, 0, 1, 2, 2])  # right: 0 1 4 5 6 7 8
    cmp = compare_paired(y_true, pred_a, pred_b, n_boot=500)
    assert isinstance(cmp, Comparison)
    assert cmp.n == 10
    assert cmp.a_only == 3  # images 2, 3, 9: A right, B wrong
    assert cmp.b_only == 3  # images 4, 5, 6: B right, A wrong
    assert cmp.p == pytest.approx(scipy_stats.binomtest(3, 6, 0.5).pvalue, rel=1e-12)

    pred_b2 = pred_a.copy()
    pred_b2[[4, 5, 6]] = y_true[[4, 5, 6]]  # B fixes three of A's errors and breaks nothing
    pred_b2[0] = 2  # ... but one that A had right
    cmp2 = compare_paired(y_true, pred_a, pred_b2, n_boot=500)
    assert (cmp2.a_only, cmp2.b_only) == (1, 3)
    assert cmp2.p == pytest.approx(scipy_stats.binomtest(3, 4, 0.5).pvalue, rel=1e-12)


def test_compare_paired_as_dict_is_exact_and_json_ready() -> None:
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 7, 300)
    pred_a = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 7, 300))
    pred_b = np.where(rng.random(300) < 0.8, y_true, rng.integers(0, 7, 300))
    cmp = compare_paired(y_true, pred_a, pred_b, n_boot=1000)
    d = cmp.as_dict()
    assert set(d) == {"a", "b", "difference", "difference_ci", "n", "b_only", "a_only", "mcnemar_p"}
    assert set(d["a"]) == set(d["b"]) == {"accuracy", "ci"}
    json.loads(json.dumps(d))
    acc_a, acc_b = np.mean(pred_a == y_true), np.mean(pred_b == y_true)
    assert d["a"]["accuracy"] == pytest.approx(acc_a) and d["b"]["accuracy"] == pytest.approx(acc_b)
    assert d["difference"] == pytest.approx(acc_b - acc_a)
    lo, hi = d["difference_ci"]
    assert lo <= d["difference"] <= hi
    assert d["n"] == 300 and type(d["n"]) is int and type(d["a_only"]) is int and type(d["mcnemar_p"]) is float
    assert d["b_only"] - d["a_only"] == round((acc_b - acc_a) * 300)


def test_compare_paired_shares_resamples_with_the_single_functions() -> None:
    rng = np.random.default_rng(11)
    y_true = rng.integers(0, 3, 150)
    pred_a = np.where(rng.random(150) < 0.5, y_true, (y_true + 1) % 3)
    pred_b = np.where(rng.random(150) < 0.7, y_true, (y_true + 2) % 3)
    cmp = compare_paired(y_true, pred_a, pred_b, n_boot=800, seed=5)
    assert cmp.a == accuracy_ci(pred_a == y_true, n_boot=800, seed=5)
    assert cmp.b == accuracy_ci(pred_b == y_true, n_boot=800, seed=5)
    assert cmp.difference == paired_difference_ci(pred_a == y_true, pred_b == y_true, n_boot=800, seed=5)


def test_unpaired_difference_ci_and_fisher_p() -> None:
    rng = np.random.default_rng(5)
    a = rng.random(400) < 0.9  # e.g. CIFAR-10
    b = rng.random(250) < 0.6  # e.g. FERPlus: a different test set, another size
    ci = unpaired_difference_ci(a, b, n_boot=1000)
    assert ci.value == pytest.approx(b.mean() - a.mean())
    assert ci.low <= ci.value <= ci.high
    # Independent resamples: A's bootstrap distribution is accuracy_ci's, so the width exceeds A's alone.
    only_a = accuracy_ci(a, n_boot=1000)
    assert ci.high - ci.low > only_a.high - only_a.low
    table = [[a.sum(), len(a) - a.sum()], [b.sum(), len(b) - b.sum()]]
    assert unpaired_p(a, b) == pytest.approx(scipy_stats.fisher_exact(table).pvalue, rel=1e-12)
    same = rng.random(300) < 0.5
    assert unpaired_p(same, same) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- macro F1


def _f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    return f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0)


def _rare_class_sample(n: int = 60, n_classes: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Labels where class 4 is rare (absent from many resamples) and class 5 never occurs at all."""
    rng = np.random.default_rng(8)
    y_true = rng.choice(n_classes, size=n, p=[0.35, 0.3, 0.2, 0.12, 0.03, 0.0])
    y_pred = np.where(rng.random(n) < 0.65, y_true, rng.integers(0, n_classes - 1, n))
    return y_true, y_pred


def test_macro_f1_value_matches_sklearn() -> None:
    y_true, y_pred = _rare_class_sample()
    ci = macro_f1_ci(y_true, y_pred, n_classes=6, n_boot=1000)
    assert ci.value == pytest.approx(_f1(y_true, y_pred, 6), rel=1e-12)
    assert ci.low <= ci.value <= ci.high
    # Missing labels count as zeros: averaging over 10 labels instead of 6 scales the value by 6/10.
    assert macro_f1_ci(y_true, y_pred, n_classes=10, n_boot=10).value == pytest.approx(ci.value * 6 / 10)


@pytest.mark.parametrize("seed", [0, 1, 42, 12345])
def test_macro_f1_single_resample_matches_sklearn(seed: int) -> None:
    y_true, y_pred = _rare_class_sample(n=25)
    idx = np.random.default_rng(seed).integers(0, len(y_true), size=(1, len(y_true)))[0]
    ci = macro_f1_ci(y_true, y_pred, n_classes=6, n_boot=1, seed=seed)
    assert ci.low == ci.high == pytest.approx(_f1(y_true[idx], y_pred[idx], 6), rel=1e-12)


def test_macro_f1_every_resample_matches_sklearn() -> None:
    """All resamples, rebuilt with the same rng call, scored by sklearn, give the same percentile interval."""
    y_true, y_pred = _rare_class_sample(n=30)
    idx = np.random.default_rng(9).integers(0, 30, size=(60, 30))
    assert any(4 not in y_true[row] for row in idx)  # some resamples lack the rare class entirely
    scores = [_f1(y_true[row], y_pred[row], 6) for row in idx]
    low, high = np.quantile(scores, [0.05, 0.95])
    ci = macro_f1_ci(y_true, y_pred, n_classes=6, n_boot=60, seed=9, confidence=0.90)
    assert (ci.low, ci.high) == pytest.approx((low, high), rel=1e-12)


def test_accuracy_ci_is_the_percentile_interval_of_the_documented_resamples() -> None:
    correct = np.random.default_rng(1).random(80) < 0.55
    idx = np.random.default_rng(3).integers(0, 80, size=(300, 80))
    low, high = np.quantile(correct[idx].mean(axis=1), [0.025, 0.975])
    ci = accuracy_ci(correct.astype(int), n_boot=300, seed=3)
    assert ci == Interval(pytest.approx(correct.mean()), pytest.approx(low), pytest.approx(high))
    assert ci.as_dict() == {"value": ci.value, "ci": [ci.low, ci.high]}
    json.dumps(ci.as_dict())


def test_chunking_does_not_change_the_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    y_true = rng.integers(0, 5, 101)
    y_pred = np.where(rng.random(101) < 0.6, y_true, rng.integers(0, 5, 101))
    a, b = rng.random(101) < 0.6, rng.random(101) < 0.7
    calls = [lambda: accuracy_ci(a, n_boot=333), lambda: macro_f1_ci(y_true, y_pred, 5, n_boot=333),
             lambda: paired_difference_ci(a, b, n_boot=333), lambda: unpaired_difference_ci(a, b[:77], n_boot=333)]
    whole = [call() for call in calls]
    monkeypatch.setattr(stats, "_CHUNK_ENTRIES", 101 * 7)  # 7 resamples per chunk: 48 chunks, the last short
    assert [call() for call in calls] == whole


def test_large_test_set_is_fast_and_bounded() -> None:
    """CIFAR-10's 10,000 test images x 2,000 resamples runs in chunks (would be 160 MB of indices at once)."""
    correct = np.random.default_rng(0).random(10_000) < 0.9
    ci = accuracy_ci(correct)
    assert ci.low < ci.value < ci.high and ci.high - ci.low < 0.015


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_interval_different_seed_different() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.random(500) < 0.7, rng.random(500) < 0.75
    y_true = rng.integers(0, 4, 500)
    y_pred = np.where(a, y_true, (y_true + 1) % 4)
    for fn in (lambda s: accuracy_ci(a, seed=s), lambda s: paired_difference_ci(a, b, seed=s),
               lambda s: unpaired_difference_ci(a, b, seed=s), lambda s: macro_f1_ci(y_true, y_pred, 4, seed=s)):
        first, again, other = fn(1), fn(1), fn(2)
        assert first == again
        assert (first.low, first.high) != (other.low, other.high)
        assert first.value == other.value  # the point estimate never depends on the seed


# ------------------------------------------------------------------------------------------------ prose


def test_direction_follows_p_then_sign() -> None:
    assert direction(0.30, 0.20) == "is indistinguishable from"  # a large difference, not significant
    assert direction(-0.30, 0.05) == "is indistinguishable from"  # p == alpha is not significant
    assert direction(0.01, 0.049) == "beats"
    assert direction(-0.01, 0.001) == "trails"
    assert direction(0.02, 0.03, better="improves on", worse="falls behind", same="matches") == "improves on"
    assert direction(0.02, 0.03, alpha=0.01) == "is indistinguishable from"
    assert significant(0.049) and not significant(0.05) and significant(0.009, alpha=0.01)


@pytest.mark.parametrize("p, text", [(0.41, "p = 0.41"), (0.003, "p = 0.003"), (0.012, "p = 0.012"),
                                     (0.0004, "p < 0.001"), (0.0, "p < 0.001"), (0.001, "p = 0.001"),
                                     (1.0, "p = 1.00"), (0.0496, "p = 0.0496"), (0.05, "p = 0.050")])
def test_format_p(p: float, text: str) -> None:
    assert format_p(p) == text


def test_comparison_sentence() -> None:
    assert comparison_sentence("DeiT-Base", "AlexNet", 0.114, 0.003) == "DeiT-Base beats AlexNet by 11.4 pp (p = 0.003)"
    assert comparison_sentence("DeiT-Base", "AlexNet", -0.02, 0.012) == "DeiT-Base trails AlexNet by 2.0 pp (p = 0.012)"
    assert (comparison_sentence("DeiT-Base", "AlexNet", 0.013, 0.41)
            == "DeiT-Base is indistinguishable from AlexNet (difference +1.3 pp, p = 0.41)")
    assert (comparison_sentence("DeiT-Base", "AlexNet", -0.25, 0.2)
            == "DeiT-Base is indistinguishable from AlexNet (difference -25.0 pp, p = 0.20)")


def test_sentence_from_a_real_comparison() -> None:
    rng = np.random.default_rng(12)
    y_true = rng.integers(0, 10, 1000)
    pred_a = np.where(rng.random(1000) < 0.6, y_true, (y_true + 1) % 10)
    pred_b = np.where((pred_a == y_true) | (rng.random(1000) < 0.5), y_true, (y_true + 3) % 10)
    cmp = compare_paired(y_true, pred_a, pred_b, n_boot=1000)
    assert cmp.a_only == 0 and cmp.b_only > 100 and cmp.p < 1e-6
    assert comparison_sentence("B", "A", cmp.difference.value, cmp.p).startswith("B beats A by ")
    assert comparison_sentence("A", "B", -cmp.difference.value, cmp.p).startswith("A trails B by ")


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, argument", [
    (lambda: accuracy_ci([]), "correct"),
    (lambda: accuracy_ci(np.zeros((3, 2), bool)), "correct"),
    (lambda: accuracy_ci([0, 1, 2]), "correct"),
    (lambda: accuracy_ci([0.5, 1.0]), "correct"),
    (lambda: accuracy_ci(["yes", "no"]), "correct"),
    (lambda: accuracy_ci([1, 0], confidence=1.5), "confidence"),
    (lambda: accuracy_ci([1, 0], confidence=0.0), "confidence"),
    (lambda: accuracy_ci([1, 0], n_boot=0), "n_boot"),
    (lambda: accuracy_ci([1, 0], seed=-1), "seed"),
    (lambda: paired_difference_ci([1, 0, 1], [1, 0]), "correct_a and correct_b"),
    (lambda: paired_difference_ci([1, 0], []), "correct_b"),
    (lambda: unpaired_difference_ci([], [1, 0]), "correct_a"),
    (lambda: unpaired_difference_ci([1, 0], [1, 0], confidence=1.5), "confidence"),
    (lambda: unpaired_p([1, 0], [3]), "correct_b"),
    (lambda: macro_f1_ci([], [], 3), "y_true"),
    (lambda: macro_f1_ci([0, 1], [0, 1, 2], 3), "y_true and y_pred"),
    (lambda: macro_f1_ci([0, 1], [0, 3], 3), "y_pred"),
    (lambda: macro_f1_ci([0.0, 1.0], [0, 1], 3), "y_true"),
    (lambda: macro_f1_ci([0, 1], [0, 1], 0), "n_classes"),
    (lambda: macro_f1_ci([0, 1], [0, 1], 2, confidence=1.5), "confidence"),
    (lambda: compare_paired([0, 1, 2], [0, 1], [0, 1, 2]), "pred_a"),
    (lambda: compare_paired([0, 1, 2], [0, 1, 2], [0, 1]), "pred_b"),
    (lambda: compare_paired([], [], []), "y_true"),
    (lambda: mcnemar_exact(-1, 3), "a_only"),
    (lambda: mcnemar_exact(2, 1.5), "b_only"),
    (lambda: format_p(1.2), "p"),
    (lambda: direction(0.1, float("nan")), "p"),
    (lambda: direction(float("inf"), 0.01), "difference"),
    (lambda: significant(0.01, alpha=1.0), "alpha"),
])
def test_bad_input_names_the_argument(call, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        call()


def test_any_positive_n_boot_is_allowed() -> None:
    assert accuracy_ci([1, 0, 1, 1], n_boot=1).low == accuracy_ci([1, 0, 1, 1], n_boot=1).high
    assert isinstance(accuracy_ci([True, False], n_boot=np.int64(10)), Interval)
