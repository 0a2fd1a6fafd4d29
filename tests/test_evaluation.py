"""classification_metrics on a small example worked out by hand."""

import json

import numpy as np
import pytest
import torch

from transferstudy.evaluation import classification_metrics

CLASSES = ["cat", "dog", "bird"]
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]
# By hand: cat TP 2 FP 0 FN 1 -> P 1, R 2/3, F1 0.8; dog TP 1 FP 1 FN 1 -> 0.5, 0.5, 0.5;
# bird TP 1 FP 1 FN 0 -> P 0.5, R 1, F1 2/3. Accuracy 4/6.
HAND = {"cat": (1.0, 2 / 3, 0.8, 3), "dog": (0.5, 0.5, 0.5, 2), "bird": (0.5, 1.0, 2 / 3, 1)}


@pytest.mark.parametrize("convert", [list, np.array, torch.tensor], ids=["list", "numpy", "torch"])
def test_metrics_match_the_hand_computation(convert):
    m = classification_metrics(convert(Y_TRUE), convert(Y_PRED), CLASSES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert list(m["per_class"]) == CLASSES
    for name, (precision, recall, f1, support) in HAND.items():
        row = m["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision, recall, f1))
        assert row["support"] == support
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    json.dumps(m)  # plain Python values, ready for the book's JSON results


def test_absent_class_scores_zero_and_counts_in_the_macro_average():
    m = classification_metrics(Y_TRUE, Y_PRED, [*CLASSES, "fish"])
    assert m["per_class"]["fish"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)
    assert m["confusion_matrix"][3] == [0, 0, 0, 0] and all(len(row) == 4 for row in m["confusion_matrix"])


def test_perfect_predictions():
    m = classification_metrics(Y_TRUE, Y_TRUE, CLASSES)
    assert m["accuracy"] == m["macro_f1"] == 1.0
    assert np.array_equal(np.diag(m["confusion_matrix"]), [3, 2, 1])


@pytest.mark.parametrize("y_true, y_pred, match", [
    ([0, 1], [0], "equal length"),
    ([0, 3], [0, 1], "y_true must hold integer labels in \\[0, 3\\)"),
    ([0, 1], [0, -1], "y_pred must hold"),
    ([0.0, 1.0], [0, 1], "y_true must hold integer"),
])
def test_bad_labels_are_rejected(y_true, y_pred, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y_true, y_pred, CLASSES)
