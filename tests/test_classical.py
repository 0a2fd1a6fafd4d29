"""The classical classifier suite and the frozen-feature SVM on separable blobs."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from transferstudy.classical import (
    CLASSIFIERS,
    ClippedPCA,
    fit_evaluate,
    margin_probabilities,
    margin_temperature,
    svm_pipeline,
)

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=400, n_features=20, centers=4, cluster_std=3.0, random_state=0)
    return X[:240], y[:240], X[240:320], y[240:320], X[320:], y[320:]


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_each_classifier_beats_chance_on_blobs(name, blobs):
    pipe = CLASSIFIERS[name]()
    assert isinstance(pipe, Pipeline) and isinstance(pipe.steps[0][1], StandardScaler)
    result = fit_evaluate(pipe, *blobs, CLASSES)
    assert result["val"]["accuracy"] >= 0.9 and result["test"]["accuracy"] >= 0.9  # chance is 0.25
    assert result["fit_seconds"] > 0 and "test_refit" not in result
    clone(pipe)  # stays an ordinary, clonable sklearn estimator


def test_factories_take_overrides():
    pipe = CLASSIFIERS["linear_svm"](C=10.0, class_weight="balanced")
    assert pipe.named_steps["clf"].C == 10.0 and pipe.named_steps["clf"].class_weight == "balanced"
    assert CLASSIFIERS["knn_pca128"](pca__n_components=32).named_steps["pca"].n_components == 32
    assert CLASSIFIERS["random_forest"]().named_steps["clf"].n_estimators == 400
    with pytest.raises(ValueError, match="bogus"):
        CLASSIFIERS["mlp"](bogus=1)


@pytest.mark.parametrize("name", ["rbf_svm_pca256", "knn_pca128"])
def test_pca_is_clipped_on_tiny_data(name):
    X, y = make_blobs(n_samples=20, n_features=50, centers=2, random_state=1)
    pipe = CLASSIFIERS[name]().fit(X, y)
    assert pipe.named_steps["pca"].pca_.n_components_ == 20
    assert pipe.score(X, y) >= 0.9


def test_clipped_pca_matches_pca_when_not_clipped():
    X, _ = make_blobs(n_samples=60, n_features=10, random_state=2)
    np.testing.assert_allclose(ClippedPCA(5).fit(X).transform(X), PCA(5, random_state=42).fit_transform(X))
    assert ClippedPCA(64).fit(X).transform(X).shape == (60, 10)


@pytest.mark.parametrize("kernel, estimator", [("linear", LinearSVC), ("rbf", SVC)])
def test_svm_pipeline(kernel, estimator, blobs):
    pipe = svm_pipeline(C=0.5, class_weight="balanced", pca=8, kernel=kernel)
    assert [s for s, _ in pipe.steps] == ["scale", "pca", "clf"]
    clf = pipe.named_steps["clf"]
    assert isinstance(clf, estimator) and clf.C == 0.5 and clf.class_weight == "balanced"
    assert fit_evaluate(pipe, *blobs, CLASSES)["test"]["accuracy"] >= 0.9
    assert [s for s, _ in svm_pipeline().steps] == ["scale", "clf"]
    with pytest.raises(ValueError, match="kernel 'poly'"):
        svm_pipeline(kernel="poly")


def test_refit_on_train_plus_val(blobs):
    X_tr, y_tr, X_va, y_va, X_te, y_te = blobs
    pipe = CLASSIFIERS["logistic_regression"]()
    result = fit_evaluate(pipe, *blobs, CLASSES, refit_on_trainval=True)
    # The pipeline passed in keeps its train-only fit; the refit saw train + val.
    assert pipe.named_steps["scale"].n_samples_seen_ == len(X_tr)
    trainval = CLASSIFIERS["logistic_regression"]().fit(np.concatenate([X_tr, X_va]), np.concatenate([y_tr, y_va]))
    expected = (trainval.predict(X_te) == y_te).mean()
    assert result["test_refit"]["accuracy"] == pytest.approx(expected)
    assert set(result["test_refit"]) == {"accuracy", "macro_f1", "per_class", "confusion_matrix"}


def test_fit_evaluate_rejects_mismatched_arrays(blobs):
    X_tr, y_tr, X_va, y_va, X_te, y_te = blobs
    with pytest.raises(ValueError, match="X_val"):
        fit_evaluate(svm_pipeline(), X_tr, y_tr, X_va, y_va[:3], X_te, y_te, CLASSES)
    with pytest.raises(ValueError, match="X_train"):
        fit_evaluate(svm_pipeline(), X_tr[:, 0], y_tr, X_va, y_va, X_te, y_te, CLASSES)


def _log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(probs[np.arange(len(y)), y])))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_margin_temperature_calibrates_without_changing_a_prediction(kernel, blobs):
    X_train, y_train, X_val, y_val, X_test, y_test = blobs
    svm = svm_pipeline(kernel=kernel).fit(X_train, y_train)
    t = margin_temperature(svm, X_val, y_val)
    assert 1e-3 < t < 1e3
    probs = margin_probabilities(svm, X_test, t)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_array_equal(svm.classes_[probs.argmax(axis=1)], svm.predict(X_test))
    # the fitted temperature beats nearby and far ones on the split it was fitted on
    val_loss = _log_loss(margin_probabilities(svm, X_val, t), y_val)
    for other in (t / 3, t * 3, 1.0):
        assert val_loss <= _log_loss(margin_probabilities(svm, X_val, other), y_val) + 1e-9


def test_margin_temperature_names_labels_the_svm_never_saw(blobs):
    X_train, y_train, X_val, y_val, *_ = blobs
    svm = svm_pipeline().fit(X_train[y_train < 3], y_train[y_train < 3])
    with pytest.raises(ValueError, match=r"y_val holds classes the SVM was not fitted on: \[3\]"):
        margin_temperature(svm, X_val, y_val)

