"""scikit-learn classifiers on embeddings: the frozen-feature SVM and the study's classical suite."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from .evaluation import classification_metrics

KERNELS = ("linear", "rbf")


class ClippedPCA(TransformerMixin, BaseEstimator):
    """PCA whose ``n_components`` is clipped to ``min(n_samples, n_features)`` at fit time.

    Lets a PCA-256 pipeline run on tiny smoke subsets; the fitted PCA is ``pca_``.
    """

    def __init__(self, n_components: int = 256, random_state: int = 42) -> None:
        self.n_components = n_components
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any = None) -> ClippedPCA:
        k = min(self.n_components, *np.shape(X))
        self.pca_ = PCA(n_components=k, random_state=self.random_state).fit(X)
        self.n_features_in_ = self.pca_.n_features_in_
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return self.pca_.transform(X)


def _pipeline(clf: BaseEstimator, pca: int | None = None) -> Pipeline:
    steps = [("scale", StandardScaler())]
    if pca is not None:
        steps.append(("pca", ClippedPCA(pca)))
    return Pipeline([*steps, ("clf", clf)])


def svm_pipeline(C: float = 1.0, class_weight: str | dict | None = None, max_iter: int = 10000,
                 pca: int | None = None, kernel: str = "linear") -> Pipeline:
    """StandardScaler -> [PCA(pca)] -> LinearSVC (``kernel="linear"``) or RBF SVC: the frozen-feature SVM.

    ``max_iter`` bounds LinearSVC; the RBF SVC runs to convergence (no probability calibration).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r} is unknown; choose one of {KERNELS}")
    if kernel == "linear":
        clf = LinearSVC(C=C, class_weight=class_weight, max_iter=max_iter, random_state=42)
    else:
        clf = SVC(C=C, kernel="rbf", class_weight=class_weight)
    return _pipeline(clf, pca)


def _factory(make_clf: Callable[[], BaseEstimator], pca: int | None = None) -> Callable[..., Pipeline]:
    """A builder ``(**overrides) -> Pipeline``; plain keys set the classifier (``C=10``),
    ``step__param`` keys any step (``pca__n_components=64``)."""
    def build(**overrides: Any) -> Pipeline:
        pipe = _pipeline(make_clf(), pca)
        return pipe.set_params(**{k if "__" in k else f"clf__{k}": v for k, v in overrides.items()})
    return build


CLASSIFIERS: dict[str, Callable[..., Pipeline]] = {
    "linear_svm": _factory(lambda: LinearSVC(C=1.0, max_iter=10000, random_state=42)),
    # lbfgs fits the multinomial (softmax) model for multiclass targets.
    "logistic_regression": _factory(lambda: LogisticRegression(solver="lbfgs", max_iter=2000)),
    "rbf_svm_pca256": _factory(lambda: SVC(kernel="rbf"), pca=256),
    "sgd_hinge": _factory(lambda: SGDClassifier(loss="hinge", random_state=42)),
    "knn_pca128": _factory(lambda: KNeighborsClassifier(n_neighbors=7), pca=128),
    "random_forest": _factory(lambda: RandomForestClassifier(n_estimators=400, n_jobs=-1, random_state=42)),
    "mlp": _factory(lambda: MLPClassifier(hidden_layer_sizes=(512,), early_stopping=True, random_state=42)),
}


def fit_evaluate(pipeline: Pipeline, X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray,
                 y_val: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, classes: Sequence[str],
                 refit_on_trainval: bool = False) -> dict[str, Any]:
    """Fit ``pipeline`` on train (in place), score val and test; optionally refit a clone on train+val.

    Returns ``{"val": metrics, "test": metrics, "fit_seconds": s}`` plus ``"test_refit"`` (test
    metrics of the train+val refit) when ``refit_on_trainval``; metrics as
    :func:`~transferstudy.evaluation.classification_metrics`.
    """
    data = {"train": (X_train, y_train), "val": (X_val, y_val), "test": (X_test, y_test)}
    for name, (X, y) in data.items():
        if np.ndim(X) != 2 or len(X) != len(y) or len(X) == 0:
            raise ValueError(f"X_{name} must be a non-empty 2-D array [n, features] with one label per row in "
                             f"y_{name}; got shapes {np.shape(X)} and {np.shape(y)}")
    tick = time.perf_counter()
    pipeline.fit(X_train, y_train)
    result: dict[str, Any] = {"fit_seconds": time.perf_counter() - tick}
    for name in ("val", "test"):
        X, y = data[name]
        result[name] = classification_metrics(y, pipeline.predict(X), classes)
    if refit_on_trainval:
        refit = clone(pipeline).fit(np.concatenate([X_train, X_val]), np.concatenate([y_train, y_val]))
        result["test_refit"] = classification_metrics(y_test, refit.predict(X_test), classes)
    return result


def n_parameters(pipeline: Pipeline) -> int:
    """Learned numbers of a fitted pipeline's final classifier (weights and biases; kernel SVMs: dual coefficients)."""
    clf = pipeline[-1]
    for attrs in (("coef_", "intercept_"), ("dual_coef_", "intercept_")):
        if all(hasattr(clf, a) for a in attrs):
            return int(sum(np.size(getattr(clf, a)) for a in attrs))
    raise ValueError(f"cannot count the parameters of {type(clf).__name__}; n_parameters supports linear "
                     f"models and SVMs")


def _margins(pipeline: Pipeline, X: np.ndarray) -> np.ndarray:
    margins = np.asarray(pipeline.decision_function(X), dtype=np.float64)
    return margins if margins.ndim == 2 else np.stack([-margins, margins], axis=1)  # binary: one margin


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def margin_probabilities(pipeline: Pipeline, X: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities of an SVM as the softmax of its decision margins divided by ``temperature``.

    The argmax is the SVM's own prediction for any temperature (ovr margins, as LinearSVC and SVC give).
    """
    return np.exp(_log_softmax(_margins(pipeline, X) / temperature))


def margin_temperature(pipeline: Pipeline, X_val: np.ndarray, y_val: np.ndarray) -> float:
    """The temperature that makes :func:`margin_probabilities` fit held-out labels best (least log loss).

    Temperature scaling (Guo et al., 2017) on SVM margins: one number, fitted on the validation split,
    so predictions stay the SVM's and only their stated confidence is calibrated.
    """
    from scipy.optimize import minimize_scalar

    y = np.asarray(y_val)
    if len(y) == 0 or np.ndim(y) != 1:
        raise ValueError(f"y_val must be a non-empty 1-D array of class indices, got shape {np.shape(y)}")
    seen = np.isin(y, pipeline.classes_)
    if not seen.all():
        raise ValueError(f"y_val holds classes the SVM was not fitted on: {sorted(set(y[~seen].tolist()))}")
    margins = _margins(pipeline, X_val)
    cols = np.searchsorted(pipeline.classes_, y)  # the label's column among the classes the SVM saw

    def log_loss(log_t: float) -> float:
        return float(-np.mean(_log_softmax(margins / np.exp(log_t))[np.arange(len(y)), cols]))

    return float(np.exp(minimize_scalar(log_loss, bounds=(np.log(1e-3), np.log(1e3)), method="bounded").x))

