"""The results store as the book reads it (``report.store``), and the tables, sentences and projections on top.

Every run folder here is synthetic but consistent: ``write_run`` computes each recorded metric with
``evaluation.classification_metrics`` from the very labels it saves in ``predictions.npz``, so a test can
check every number the reader derives against one computed by hand from the predictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from transferstudy import config, evaluation, report, results
from transferstudy.data import CLASSES
from transferstudy.report import projections, stats, tables
from transferstudy.report.store import (CONTEXT_ENV, CONTEXT_FILE, TABLE_COLUMNS, Store, StoreError, collect, load,
                                        read_run, write_context, write_table)

T0 = 1_700_000_000  # a fixed mtime base: which attempt of a cell is newer is set explicitly, never by timing

# --- helpers --------------------------------------------------------------------------------------------


def labels(n: int, dataset: str = "cifar10") -> np.ndarray:
    """``n`` test labels cycling through the dataset's classes."""
    return np.arange(n) % len(CLASSES[dataset])


def predict(y_true: np.ndarray, correct, dataset: str = "cifar10") -> np.ndarray:
    """Predictions that are right exactly where ``correct`` (a bool mask or index array) says, wrong elsewhere."""
    mask = np.zeros(len(y_true), dtype=bool)
    mask[correct] = True
    return np.where(mask, y_true, (y_true + 1) % len(CLASSES[dataset])).astype(np.int64)


def acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def default_files(n: int) -> np.ndarray:
    return np.array([f"test/{i:05d}.png" for i in range(n)])


def touch(path: Path, t: float) -> None:
    os.utime(path, (t, t))


def write_run(profile_dir: Path, dataset: str, model: str, regime: str, y_true: np.ndarray,
              classifiers: dict[str, np.ndarray] | np.ndarray, *, best: str | None = None,
              val: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, files=None, pretrained: bool = True,
              mtime: float = T0, embeddings: bool = False, trainable: int = 1000, total: int = 5000) -> Path:
    """A finished run folder whose metrics.json is computed from the predictions it keeps.

    ``classifiers`` maps a classifier name to its test predictions (a bare array is the network's ``head``,
    or ``linear_svm`` for frozen_svm); ``val`` maps a name to (val y_true, val y_pred), by default its test
    predictions; ``best`` defaults to the classifier with the highest validation accuracy.
    """
    if not isinstance(classifiers, dict):
        classifiers = {"linear_svm" if regime == "frozen_svm" else "head": classifiers}
    classes = list(CLASSES[dataset])
    y_true = np.asarray(y_true, dtype=np.int64)
    val = val or {name: (y_true, pred) for name, pred in classifiers.items()}
    scores = {name: {"val": evaluation.classification_metrics(*val[name], classes),
                     "test": evaluation.classification_metrics(y_true, pred, classes)}
              for name, pred in classifiers.items()}
    best = best or max(scores, key=lambda n: scores[n]["val"]["accuracy"])
    run_dir = Path(profile_dir) / dataset / model / regime
    params = {"model": model, "dataset": dataset, "regime": regime, "profile": Path(profile_dir).name,
              "pretrained": pretrained, "label_rule": "majority" if dataset == "ferplus" else None,
              "val_source": "split", "n_train": 100}
    rec = results.RunRecorder(run_dir, params)
    rec.save_split("abc123", {"train": [], "val": [], "test": list(range(len(y_true)))},
                   {"layout": "microsoft" if dataset == "ferplus" else "imagefolder",
                    "label_rule": params["label_rule"], "val_source": "split", "n_train": 100})
    rec.save_metrics({"classifiers": scores, "best": best})
    rec.save_predictions(y_true, classifiers[best], None, list(default_files(len(y_true)) if files is None
                                                                 else files))
    if embeddings:
        rec.save_embeddings("svm", np.random.default_rng(0).normal(size=(len(y_true), 6)), y_true)
    rec.finish(pretrained=pretrained, device="cpu", date="2024-05-01T12:00:00+00:00", trainable=trainable,
               total=total, classes=classes, split_hash="abc123")
    touch(run_dir / "meta.json", mtime)
    return run_dir


def write_failed(profile_dir: Path, dataset: str, model: str, regime: str, error: str = "RuntimeError: boom",
                 mtime: float = T0) -> Path:
    """A failed attempt: ``<regime>.failed/`` with meta ``{"status": "failed", "error": ...}``."""
    run_dir = Path(profile_dir) / dataset / model / f"{regime}.failed"
    results.write_json(run_dir / "params.json", {"model": model, "dataset": dataset, "regime": regime,
                                                 "profile": Path(profile_dir).name, "pretrained": True})
    results.write_json(run_dir / "meta.json", {"status": "failed", "error": error, "profile": Path(profile_dir).name,
                                               "device": "cpu", "date": "2024-05-02T08:00:00+00:00",
                                               "pretrained": True, "wall_s": 3.5})
    touch(run_dir / "meta.json", mtime)
    return run_dir


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. Store.load, counts, banner, table, collect, write_table ----------------------------------------------

N = 60
Y = labels(N)
CLASSICAL = {"linear_svm": predict(Y, slice(0, 40)), "knn": predict(Y, slice(0, 45)),
             "random_forest": predict(Y, slice(0, 30))}
CLASSICAL_VAL = {"linear_svm": (Y, predict(Y, slice(0, 50))),   # the best on validation, not on test
                 "knn": (Y, predict(Y, slice(0, 44))), "random_forest": (Y, predict(Y, slice(0, 20)))}


@pytest.fixture
def mixed(tmp_path: Path) -> dict:
    """A `quick` profile with 4 finished, 2 failed, 1 damaged and 13 missing cells (plus stray folders)."""
    profile = tmp_path / "runs" / "quick"
    dirs = {
        "svm": write_run(profile, "cifar10", "alexnet", "frozen_svm", Y, predict(Y, slice(0, 36)),
                         pretrained=False, embeddings=True),
        "classical": write_run(profile, "cifar10", "alexnet", "classical", Y, CLASSICAL, val=CLASSICAL_VAL),
        "probe": write_run(profile, "cifar10", "deit_base", "linear_probe", Y, predict(Y, slice(0, 50))),
        # a success newer than an old failure: the success counts
        "full": write_run(profile, "cifar10", "alexnet", "full", Y, predict(Y, slice(0, 55)), mtime=T0 + 100),
        "full_old_failure": write_failed(profile, "cifar10", "alexnet", "full", mtime=T0),
        # never succeeded
        "fer_failed": write_failed(profile, "ferplus", "alexnet", "full",
                                   error="ValueError: label_rule='bogus'\nTraceback ...", mtime=T0),
        # an earlier success, then a newer failure: the cell is failed, the success stays on disk
        "fer_success": write_run(profile, "ferplus", "deit_base", "full", labels(40, "ferplus"),
                                 predict(labels(40, "ferplus"), slice(0, 30), "ferplus"), mtime=T0),
        "fer_newer_failure": write_failed(profile, "ferplus", "deit_base", "full", mtime=T0 + 50),
    }
    damaged = profile / "cifar10" / "deit_base" / "full"
    damaged.mkdir(parents=True)
    (damaged / "meta.json").write_text('{"status": "ok", "pretrained": tru')
    dirs["damaged"] = damaged
    # folders the matrix does not have are not runs of it
    results.write_json(profile / "cifar10" / "alexnet" / "bogus" / "meta.json", {"status": "ok"})
    return {"profile": profile, "dirs": dirs,
            "digest": tree_digest(dirs["fer_success"])}


def test_load_reads_every_cell_of_the_matrix_with_its_latest_status(mixed):
    store = Store.load(mixed["profile"], "data")
    assert store.profile == "quick" and store.data_root == Path("data")
    assert len(store.runs) == len(config.DATASETS) * len(config.MODELS) * len(config.NOTEBOOK_REGIMES) == 20
    assert store.counts() == {"ok": 4, "failed": 2, "damaged": 1, "missing": 13 + 12}  # and the 12 analysis runs
    status = {key: run.status for key, run in store.runs.items() if run.status != "missing"}
    assert status == {("cifar10", "alexnet", "frozen_svm"): "ok", ("cifar10", "alexnet", "classical"): "ok",
                      ("cifar10", "deit_base", "linear_probe"): "ok", ("cifar10", "alexnet", "full"): "ok",
                      ("ferplus", "alexnet", "full"): "failed", ("ferplus", "deit_base", "full"): "failed",
                      ("cifar10", "deit_base", "full"): "damaged"}
    # the success newer than its old failure is read from the success folder
    assert store.run("cifar10", "alexnet", "full").run_dir == mixed["dirs"]["full"]
    # the newer failure wins over the earlier success, which is left exactly as it was
    newer = store.run("ferplus", "deit_base", "full")
    assert newer.run_dir == mixed["dirs"]["fer_newer_failure"] and newer.error == "RuntimeError: boom"
    assert newer.scores == {} and newer.best is None and newer.test == {}
    assert tree_digest(mixed["dirs"]["fer_success"]) == mixed["digest"]
    failed = store.run("ferplus", "alexnet", "full")
    assert failed.status == "failed" and failed.error.startswith("ValueError: label_rule='bogus'")
    with pytest.raises(StoreError, match=r"status 'failed'.*--only ferplus/alexnet/full"):
        failed.predictions
    missing = store.run("ferplus", "alexnet", "classical")
    assert missing.status == "missing" and missing.run_dir is None and missing.provenance() == "not run yet"
    with pytest.raises(StoreError, match="status 'missing'"):
        missing.predictions
    assert [r.key for r in store.finished()] == ["cifar10/alexnet/frozen_svm", "cifar10/alexnet/full",
                                                "cifar10/alexnet/classical", "cifar10/deit_base/linear_probe"]


def test_ok_runs_expose_scores_best_test_val_predictions_and_embeddings(mixed):
    store = Store.load(mixed["profile"])
    classical = store.run("cifar10", "alexnet", "classical")
    assert set(classical.scores) == set(CLASSICAL)
    assert classical.best == "linear_svm"  # best on validation (50/60), though knn is better on test
    for name, pred in CLASSICAL.items():
        assert classical.scores[name]["test"]["accuracy"] == pytest.approx(acc(Y, pred))
        assert classical.scores[name]["val"]["accuracy"] == pytest.approx(acc(*CLASSICAL_VAL[name]))
    assert classical.test["accuracy"] == pytest.approx(40 / 60) and classical.val["accuracy"] == pytest.approx(50 / 60)
    pred = classical.predictions
    np.testing.assert_array_equal(pred.y_true, Y)
    np.testing.assert_array_equal(pred.y_pred, CLASSICAL["linear_svm"])
    np.testing.assert_array_equal(pred.files, default_files(N))
    assert pred.probs is None and pred.correct.mean() == pytest.approx(classical.test["accuracy"])
    svm = store.run("cifar10", "alexnet", "frozen_svm")
    assert svm.best == "linear_svm" and svm.pretrained is False and svm.classes == list(CLASSES["cifar10"])
    X, y = svm.embeddings("svm")
    assert X.shape == (N, 6) and X.dtype == np.float32
    np.testing.assert_array_equal(y, Y)
    assert svm.embeddings("head") is None
    assert "random initialisation" in svm.provenance() and "device `cpu`" in svm.provenance()
    assert "2024-05-01" in svm.provenance() and svm.test_set() == "60 test images"
    probe = store.run("cifar10", "deit_base", "linear_probe")
    assert probe.best == "head" and probe.pretrained is True and probe.label == "DeiT-Base, linear probe"


def test_corrupt_meta_gives_a_damaged_run_and_the_others_still_load(mixed):
    store = Store.load(mixed["profile"])
    run = store.run("cifar10", "deit_base", "full")
    assert run.status == "damaged" and run.run_dir == mixed["dirs"]["damaged"]
    assert "--only cifar10/deit_base/full --force" in run.error
    assert sum(r.ok for r in store.runs.values()) == 4
    with pytest.raises(StoreError, match="damaged"):
        run.predictions


def test_damaged_run_error_names_the_unreadable_file(mixed):
    """The docstring's promise: 'a record that cannot be read: the file is named'."""
    run = read_run(mixed["dirs"]["damaged"])
    assert run.status == "damaged"
    assert str(mixed["dirs"]["damaged"] / "meta.json") in run.error


def test_metrics_without_classifiers_is_damaged_and_named(tmp_path):
    run_dir = write_run(tmp_path / "quick", "cifar10", "alexnet", "full", Y, predict(Y, slice(0, 30)))
    results.write_json(run_dir / "metrics.json", {"accuracy": 0.5})  # an older schema
    run = read_run(run_dir)
    assert run.status == "damaged" and str(run_dir / "metrics.json") in run.error
    with pytest.raises(StoreError, match="not a run folder"):
        read_run(tmp_path / "quick" / "cifar10" / "alexnet")


def test_banner_warns_of_random_init_and_counts_the_runs(mixed, tmp_path):
    text = Store.load(mixed["profile"]).banner()
    assert "```{warning}" in text and "randomly initialised" in text
    assert "in 1 of the 4 finished runs" in text
    assert "4 of 32 runs finished, 2 failed, 25 not run yet, 1 damaged." in text
    assert "profile `quick`" in text and "**random initialisation** and ImageNet-pretrained" in text
    assert "smoke profile" not in text

    # every run random: "in every run"; no damaged run: the count ends with "not run yet."
    smoke = tmp_path / "smoke"
    write_run(smoke, "cifar10", "alexnet", "full", Y, predict(Y, slice(0, 30)), pretrained=False)
    write_failed(smoke, "ferplus", "alexnet", "full")
    text = Store.load(smoke).banner()
    assert "(`pretrained: false`) in every run" in text
    assert "1 of 32 runs finished, 1 failed, 30 not run yet." in text and "damaged" not in text
    assert "its numbers mean nothing" in text

    # all pretrained: no warning
    full = tmp_path / "full"
    write_run(full, "cifar10", "alexnet", "full", Y, predict(Y, slice(0, 30)))
    store = Store.load(full)
    assert "{warning}" not in store.banner() and store.pretrained is True
    assert "1 of 32 runs finished, 0 failed, 31 not run yet." in store.banner()

    # nothing finished
    empty = tmp_path / "empty" / "quick"
    empty.mkdir(parents=True)
    text = Store.load(empty).banner()
    assert text.startswith("```{note}") and "No finished runs in profile `quick`" in text


def test_load_refuses_a_folder_that_is_not_a_profile(tmp_path):
    with pytest.raises(StoreError, match=r"must be <runs dir>/<profile>.*smoke"):
        Store.load(tmp_path / "runs")


def _key_rows(frame: pd.DataFrame) -> set[tuple]:
    return {(r.dataset, r.model, r.regime, None if pd.isna(r.classifier) else r.classifier, r.status)
            for r in frame.itertuples()}


EXPECTED_ROWS = {
    ("cifar10", "alexnet", "frozen_svm", "linear_svm", "ok"),
    ("cifar10", "alexnet", "classical", "linear_svm", "ok"),
    ("cifar10", "alexnet", "classical", "knn", "ok"),
    ("cifar10", "alexnet", "classical", "random_forest", "ok"),
    ("cifar10", "alexnet", "full", "head", "ok"),
    ("cifar10", "deit_base", "linear_probe", "head", "ok"),
    ("cifar10", "deit_base", "full", None, "damaged"),
    ("ferplus", "alexnet", "full", None, "failed"),
    ("ferplus", "deit_base", "full", None, "failed"),
}


def _check_rows(frame: pd.DataFrame) -> None:
    assert list(frame.columns) == TABLE_COLUMNS
    assert len(frame) == len(EXPECTED_ROWS) and _key_rows(frame) == EXPECTED_ROWS
    classical = frame[frame["regime"] == "classical"].set_index("classifier")
    assert len(classical) == 3
    assert classical["best"].map(bool).to_dict() == {"linear_svm": True, "knn": False, "random_forest": False}
    for name, pred in CLASSICAL.items():
        assert classical.loc[name, "test_accuracy"] == pytest.approx(acc(Y, pred))
        assert classical.loc[name, "val_accuracy"] == pytest.approx(acc(*CLASSICAL_VAL[name]))
        assert classical.loc[name, "n_test"] == N
    ok = frame[frame["status"] == "ok"]
    assert (ok.groupby(["dataset", "model", "regime"])["best"].apply(lambda s: int(s.map(bool).sum())) == 1).all()
    failed = frame[(frame["status"] == "failed") & (frame["model"] == "alexnet")].iloc[0]
    assert failed["error"].startswith("ValueError: label_rule='bogus'") and pd.isna(failed["test_accuracy"])
    svm = frame[frame["regime"] == "frozen_svm"].iloc[0]
    assert svm["test_accuracy"] == pytest.approx(36 / 60) and svm["trainable"] == 1000 and svm["total"] == 5000
    assert svm["split_hash"] == "abc123" and svm["profile"] == "quick" and svm["device"] == "cpu"


def test_table_and_collect_have_one_row_per_classifier(mixed):
    store = Store.load(mixed["profile"])
    _check_rows(store.table())
    frame = collect(mixed["profile"])
    _check_rows(frame)
    # collect reads the same latest attempt as Store.load
    assert frame.loc[(frame["dataset"] == "ferplus") & (frame["model"] == "deit_base"), "run_dir"].tolist() == [
        str(mixed["dirs"]["fer_newer_failure"])]
    assert str(mixed["dirs"]["full"]) in set(frame["run_dir"])


def test_write_table_writes_results_csv_with_those_rows(mixed):
    frame = write_table(mixed["profile"])
    path = mixed["profile"] / "results.csv"
    assert path.is_file()
    back = pd.read_csv(path)
    _check_rows(back)
    pd.testing.assert_frame_equal(back[["test_accuracy", "val_accuracy", "n_test"]].astype(float),
                                  frame[["test_accuracy", "val_accuracy", "n_test"]].astype(float))
    assert not list(mixed["profile"].glob(".results.csv.*.tmp"))


# --- 2. accuracy ------------------------------------------------------------------------------------------


def test_accuracy_table_is_the_predictions_accuracy_inside_its_interval(mixed):
    store = Store.load(mixed["profile"])
    frame = tables.accuracy(store)
    assert len(frame) == 4
    for row in frame.itertuples():
        run = store.run(row.dataset, row.model, row.regime)
        p = run.predictions
        assert row.classifier == run.best and row.n_test == len(p.y_true) == N
        assert row.test_accuracy == pytest.approx(acc(p.y_true, p.y_pred))
        assert row.test_accuracy == pytest.approx(run.test["accuracy"])
        assert row.val_accuracy == pytest.approx(run.val["accuracy"])
        assert row.ci_low <= row.test_accuracy <= row.ci_high and row.ci_low < row.ci_high
        assert row.macro_f1 == pytest.approx(run.test["macro_f1"])
        assert row.f1_low <= row.macro_f1 <= row.f1_high
    full = frame[frame["regime"] == "full"].iloc[0]
    assert full.test_accuracy == pytest.approx(55 / 60)


# --- 3. compare / cnn_vs_vit ------------------------------------------------------------------------------

N_PAIR = 400
Y_PAIR = labels(N_PAIR)


@pytest.fixture
def pairs(tmp_path: Path) -> dict:
    """AlexNet vs DeiT on the same 400 test images: a clear win, a clear loss, and a tiny difference."""
    profile = tmp_path / "quick"
    cases = {
        # DeiT right on 20..339 (80%), AlexNet on 0..239 (60%): 20 AlexNet-only, 100 DeiT-only
        "full": (np.arange(0, 240), np.arange(20, 340)),
        # DeiT right on 0..199 (50%), AlexNet on 0..279 (70%): DeiT trails by 20 points
        "partial": (np.arange(0, 280), np.arange(0, 200)),
        # AlexNet right on 0..199, DeiT on 0..198 and 200..201: 1 vs 2 discordant images
        "linear_probe": (np.arange(0, 200), np.r_[0:199, 200:202]),
    }
    expected = {}
    for regime, (a_right, b_right) in cases.items():
        pa, pb = predict(Y_PAIR, a_right), predict(Y_PAIR, b_right)
        write_run(profile, "cifar10", "alexnet", regime, Y_PAIR, pa)
        write_run(profile, "cifar10", "deit_base", regime, Y_PAIR, pb)
        a, b = pa == Y_PAIR, pb == Y_PAIR
        expected[regime] = {"difference": b.mean() - a.mean(), "a_only": int(np.sum(a & ~b)),
                            "b_only": int(np.sum(b & ~a)), "a": a.mean(), "b": b.mean()}
    # only AlexNet finished: no pair
    write_run(profile, "cifar10", "alexnet", "frozen_svm", Y_PAIR, predict(Y_PAIR, np.arange(100)))
    return {"profile": profile, "expected": expected}


def test_cnn_vs_vit_is_paired_mcnemar_on_the_same_images(pairs):
    store = Store.load(pairs["profile"])
    frame = tables.cnn_vs_vit(store)
    assert sorted(frame["regime"]) == ["full", "linear_probe", "partial"]
    assert set(frame["dataset"]) == {"cifar10"} and set(frame["a"]) == {"AlexNet"} and set(frame["b"]) == {"DeiT-Base"}
    rows = frame.set_index("regime")
    hand = {"full": (20, 100), "partial": (80, 0), "linear_probe": (1, 2)}
    for regime, exp in pairs["expected"].items():
        row = rows.loc[regime]
        assert (row["a_only"], row["b_only"]) == (exp["a_only"], exp["b_only"]) == hand[regime]
        assert row["difference"] == pytest.approx(exp["difference"])
        assert row["a_accuracy"] == pytest.approx(exp["a"]) and row["b_accuracy"] == pytest.approx(exp["b"])
        assert row["diff_low"] <= row["difference"] <= row["diff_high"]
        n = exp["a_only"] + exp["b_only"]
        assert row["p"] == pytest.approx(scipy_stats.binomtest(exp["b_only"], n, 0.5).pvalue)
    assert rows.loc["full", "difference"] == pytest.approx(0.20) and rows.loc["full", "p"] < 1e-6
    assert rows.loc["full", "verdict"] == "DeiT-Base beats AlexNet by 20.0 pp (p < 0.001)"
    assert rows.loc["partial", "verdict"] == "DeiT-Base trails AlexNet by 20.0 pp (p < 0.001)"
    assert rows.loc["linear_probe", "p"] >= 0.05
    assert rows.loc["linear_probe", "verdict"].startswith("DeiT-Base is indistinguishable from AlexNet (difference +")
    for row in frame.itertuples():
        word = ("indistinguishable" if row.p >= 0.05 else "beats" if row.difference > 0 else "trails")
        assert word in row.verdict


def test_compare_is_b_minus_a(pairs):
    store = Store.load(pairs["profile"])
    a, b = store.run("cifar10", "alexnet", "full"), store.run("cifar10", "deit_base", "full")
    c = tables.compare(a, b)
    assert c.n == N_PAIR and (c.a_only, c.b_only) == (20, 100)
    assert c.difference.value == pytest.approx(0.2) and c.b.value == pytest.approx(0.8)
    assert c.p == pytest.approx(scipy_stats.binomtest(100, 120, 0.5).pvalue)
    back = tables.compare(b, a)
    assert back.difference.value == pytest.approx(-0.2) and (back.a_only, back.b_only) == (100, 20)
    assert back.p == pytest.approx(c.p)


def test_weight_vs_statistics_pairs_each_full_fine_tune_with_its_statistics_transfer_run(tmp_path):
    from transferstudy.report import analyses

    profile = tmp_path / "quick"
    # CIFAR-10: AlexNet WT right on 0..299 (75%), ST on 0..149 (37.5%); DeiT WT on 0..319 (80%), ST on 0..39 (10%)
    for model, (wt, st) in {"alexnet": (300, 150), "deit_base": (320, 40)}.items():
        write_run(profile, "cifar10", model, "full", Y_PAIR, predict(Y_PAIR, np.arange(wt)))
        write_run(profile, "cifar10", model, "stats_transfer", Y_PAIR, predict(Y_PAIR, np.arange(st)))
    write_run(profile, "ferplus", "alexnet", "full", labels(40, "ferplus"),
              predict(labels(40, "ferplus"), np.arange(20), "ferplus"))  # no statistics transfer beside it: left out
    frame = tables.weight_vs_statistics(Store.load(profile))
    assert list(frame["model"]) == ["alexnet", "deit_base"] and set(frame["dataset"]) == {"cifar10"}
    row = frame.set_index("model").loc["alexnet"]
    assert (row["wt"], row["st"], row["difference"]) == pytest.approx((0.75, 0.375, 0.375))
    assert row["wt_low"] <= 0.75 <= row["wt_high"] and row["st_low"] <= 0.375 <= row["st_high"]
    assert (row["wt_only"], row["st_only"]) == (150, 0)
    assert row["p"] == pytest.approx(scipy_stats.binomtest(150, 150, 0.5).pvalue)
    assert row["share"] == pytest.approx(0.5) and row["share_low"] < 0.5 < row["share_high"]
    assert row["verdict"] == "weight transfer beats statistics transfer by 37.5 pp (p < 0.001)"
    assert frame.set_index("model").loc["deit_base", "share"] == pytest.approx(0.875)
    sentence = analyses.transfer_sentence(frame)
    assert sentence.startswith("Of the 2 model-dataset pairs with both runs (McNemar's exact test, p < 0.05), weight "
                               "transfer beats statistics transfer beyond chance in 2 (AlexNet on CIFAR-10 and "
                               "DeiT-Base on CIFAR-10).")
    one = analyses.transfer_sentence(frame.iloc[:1].assign(p=0.5))
    assert one.startswith("Of the one model-dataset pair with both runs (McNemar's exact test, p < 0.05), weight "
                          "transfer beats statistics transfer beyond chance in 0 and the difference is within chance "
                          "in 1.")
    assert sentence.endswith("On CIFAR-10, (WT − ST) / WT is larger for DeiT-Base (0.88 against 0.50 for AlexNet) and "
                             "the intervals are apart: DeiT-Base relies more on the pretrained features, as Matsoukas "
                             "et al. found for ViTs against CNNs.")
    flipped = frame.assign(share=[0.875, 0.5], share_low=[0.85, 0.45], share_high=[0.9, 0.55])
    assert ("larger for AlexNet (0.88 against 0.50 for DeiT-Base) and the intervals are apart: AlexNet relies more on "
            "the pretrained features, unlike what Matsoukas et al. found" in analyses.transfer_sentence(flipped))
    # the same shares with overlapping intervals: no claim either way
    close = frame.assign(share_low=[0.4, 0.45], share_high=[0.9, 0.95])
    assert "but the two intervals overlap, so this build does not show" in analyses.transfer_sentence(close)
    shown = analyses.transfer_table(frame)
    assert shown.iloc[0]["(WT − ST) / WT [95% CI]"].startswith("0.50 [")
    assert shown.iloc[0]["weight transfer [95% CI]"].startswith("75.0% [")
    assert "No statistics-transfer run has finished" in analyses.transfer_sentence(frame.iloc[:0])


def test_relative_difference_is_b_minus_a_over_b_on_the_paired_resamples():
    a, b = np.arange(50) < 10, np.arange(50) < 40
    share = stats.relative_difference_ci(a, b, n_boot=500, seed=3)
    idx = np.random.default_rng(3).integers(0, 50, size=(500, 50))  # the documented resamples
    boot = (b[idx].mean(axis=1) - a[idx].mean(axis=1)) / b[idx].mean(axis=1)
    assert share.value == pytest.approx(0.75)
    assert (share.low, share.high) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])))
    assert np.isnan(stats.relative_difference_ci(a, np.zeros(50, dtype=bool)).value)  # B gets nothing right


@pytest.mark.parametrize("change", ["files", "y_true", "length"])
def test_runs_on_different_test_images_are_refused(tmp_path, change):
    profile = tmp_path / "quick"
    pa = predict(Y_PAIR, np.arange(300))
    a_dir = write_run(profile, "cifar10", "alexnet", "full", Y_PAIR, pa)
    if change == "files":
        y, files = Y_PAIR, np.array([f"other/{i:05d}.png" for i in range(N_PAIR)])
    elif change == "y_true":
        y, files = np.roll(Y_PAIR, 1), None
    else:
        y, files = Y_PAIR[:-10], None
    b_dir = write_run(profile, "cifar10", "deit_base", "full", y, predict(y, np.arange(300)), files=files)
    store = Store.load(profile)
    a, b = store.run("cifar10", "alexnet", "full"), store.run("cifar10", "deit_base", "full")
    with pytest.raises(StoreError, match="different test images") as info:
        tables.compare(a, b)
    assert str(a_dir) in str(info.value) and str(b_dir) in str(info.value)
    with pytest.raises(StoreError, match="different test images"):
        tables.cnn_vs_vit(store)


# --- 4. ladder / near_vs_far ------------------------------------------------------------------------------


def test_ladder_pairs_consecutive_regimes_where_both_finished(tmp_path):
    profile = tmp_path / "quick"
    right = {"frozen_svm": 100, "linear_probe": 150, "full": 300}
    for regime, k in right.items():  # partial missing: no linear_probe -> partial, no partial -> full
        write_run(profile, "cifar10", "alexnet", regime, Y_PAIR, predict(Y_PAIR, np.arange(k)))
    write_run(profile, "cifar10", "deit_base", "partial", Y_PAIR, predict(Y_PAIR, np.arange(200)))
    write_run(profile, "cifar10", "deit_base", "full", Y_PAIR, predict(Y_PAIR, np.arange(195)))
    write_failed(profile, "cifar10", "deit_base", "linear_probe")
    write_run(profile, "cifar10", "deit_base", "frozen_svm", Y_PAIR, predict(Y_PAIR, np.arange(50)))
    write_run(profile, "cifar10", "alexnet", "classical", Y_PAIR, predict(Y_PAIR, np.arange(390)))  # not a rung
    frame = tables.ladder(Store.load(profile))
    assert [(r.model, r.step) for r in frame.itertuples()] == [("alexnet", "frozen_svm → linear_probe"),
                                                               ("deit_base", "partial → full")]
    first, second = frame.iloc[0], frame.iloc[1]
    assert first["a"] == "frozen features → svm" and first["b"] == "linear probe"
    assert first["difference"] == pytest.approx(0.125) and (first["a_only"], first["b_only"]) == (0, 50)
    assert first["p"] == pytest.approx(scipy_stats.binomtest(50, 50, 0.5).pvalue) and "beats" in first["verdict"]
    assert second["difference"] == pytest.approx(-5 / 400) and (second["a_only"], second["b_only"]) == (5, 0)
    assert second["p"] == pytest.approx(scipy_stats.binomtest(0, 5, 0.5).pvalue)
    assert "indistinguishable" in second["verdict"]


def test_near_vs_far_is_far_minus_near_with_fisher_p(tmp_path):
    profile = tmp_path / "quick"
    y_near, y_far = labels(400), labels(300, "ferplus")
    write_run(profile, "cifar10", "alexnet", "full", y_near, predict(y_near, np.arange(320)))
    write_run(profile, "ferplus", "alexnet", "full", y_far, predict(y_far, np.arange(150), "ferplus"))
    write_run(profile, "cifar10", "deit_base", "full", y_near, predict(y_near, np.arange(200)))
    write_run(profile, "ferplus", "deit_base", "full", y_far, predict(y_far, np.arange(151), "ferplus"))
    write_run(profile, "cifar10", "deit_base", "partial", y_near, predict(y_near, np.arange(200)))  # far missing
    frame = tables.near_vs_far(Store.load(profile)).set_index("model")
    assert list(frame.index) == ["alexnet", "deit_base"] and set(frame["regime"]) == {"full"}
    for model, (near, far) in {"alexnet": (320, 150), "deit_base": (200, 151)}.items():
        row = frame.loc[model]
        assert row["near"] == pytest.approx(near / 400) and row["far"] == pytest.approx(far / 300)
        assert row["difference"] == pytest.approx(far / 300 - near / 400)
        assert row["diff_low"] <= row["difference"] <= row["diff_high"]
        table = [[near, 400 - near], [far, 300 - far]]
        assert row["p"] == pytest.approx(scipy_stats.fisher_exact(table, alternative="two-sided").pvalue)
    assert frame.loc["alexnet", "verdict"].startswith("FERPlus trails CIFAR-10 by 30.0 pp")
    assert frame.loc["deit_base", "verdict"].startswith("FERPlus is indistinguishable from CIFAR-10")


# --- 5. tally and the sentences -----------------------------------------------------------------------------


def _frame(*rows: tuple[float, float]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["difference", "p"])


def test_tally_and_count_sentence():
    none = tables.tally(_frame())
    assert none == {"b_ahead": 0, "a_ahead": 0, "same": 0, "n": 0}
    assert report.count_sentence(none, "DeiT-Base", "AlexNet", "regimes") == (
        "No regimes have finished on both sides yet, so there is nothing to compare.")
    one = tables.tally(_frame((0.1, 0.001)))
    assert one == {"b_ahead": 1, "a_ahead": 0, "same": 0, "n": 1}
    assert report.count_sentence(one, "DeiT-Base", "AlexNet", "regimes") == (
        "In the one regime where both finished, DeiT-Base is ahead of AlexNet.")
    assert report.count_sentence(tables.tally(_frame((-0.1, 0.01))), "B", "A", "steps") == (
        "In the one step where both finished, B is behind A.")
    assert report.count_sentence(tables.tally(_frame((-0.1, stats.ALPHA))), "B", "A", "steps") == (
        "In the one step where both finished, B is indistinguishable from A.")  # p == ALPHA is not beyond chance
    several = tables.tally(_frame((0.1, 0.001), (0.2, 0.049), (-0.05, 0.01), (0.3, 0.2), (-0.3, 0.5)))
    assert several == {"b_ahead": 2, "a_ahead": 1, "same": 2, "n": 5}
    assert report.count_sentence(several, "DeiT-Base", "AlexNet", "regimes") == (
        "Of the 5 regimes where both finished, DeiT-Base is ahead of AlexNet beyond chance in 2, behind in 1 "
        "and indistinguishable in 2.")


def test_tally_of_a_real_table(pairs):
    frame = tables.cnn_vs_vit(Store.load(pairs["profile"]))
    t = tables.tally(frame)
    assert t == {"b_ahead": 1, "a_ahead": 1, "same": 1, "n": 3}
    assert report.count_sentence(t, "DeiT-Base", "AlexNet", "regimes").startswith("Of the 3 regimes")
    assert report.expectation_sentence(t, "b_ahead").startswith("This build's runs agree in part: 1 of 3")


def test_expectation_sentence_follows_the_counts():
    sentence = report.expectation_sentence
    assert sentence(tables.tally(_frame()), "b_ahead") == "This build has no finished pair to check that against yet."
    assert sentence(tables.tally(_frame((0.1, 0.001), (0.2, 0.01))), "b_ahead") == (
        "This build's runs agree: all 2 differences go that way beyond chance.")
    assert sentence(tables.tally(_frame((-0.1, 0.001), (-0.2, 0.01))), "a_ahead").startswith(
        "This build's runs agree: all 2")
    partial = tables.tally(_frame((0.1, 0.001), (0.2, 0.01), (-0.1, 0.01), (0.0, 0.9)))
    assert sentence(partial, "b_ahead") == (
        "This build's runs agree in part: 2 of 4 differences go the expected way beyond chance, 1 the other way, "
        "1 are indistinguishable.")
    contra = tables.tally(_frame((-0.1, 0.001), (-0.2, 0.01), (0.1, 0.01)))
    assert sentence(contra, "b_ahead") == (
        "This build's runs do not bear it out: 2 of 3 differences go the other way beyond chance, 1 the expected way.")
    neither = tables.tally(_frame((0.1, 0.3), (-0.1, 0.6)))
    assert sentence(neither, "b_ahead") == (
        "This build's runs neither confirm nor contradict it: none of the 2 differences exceeds chance in the "
        "expected direction.")


# --- 6. reported --------------------------------------------------------------------------------------------


REPORTED = pd.read_csv(Path(tables.__file__).parent.parent / "reported.csv")


def test_reported_keeps_every_row_of_the_study_and_adds_this_builds(tmp_path):
    profile = tmp_path / "quick"
    write_run(profile, "cifar10", "alexnet", "frozen_svm", Y, predict(Y, slice(0, 42)))
    write_run(profile, "cifar10", "alexnet", "full", Y, predict(Y, slice(0, 51)))
    write_run(profile, "cifar10", "alexnet", "classical", Y, CLASSICAL, val=CLASSICAL_VAL)
    write_failed(profile, "ferplus", "deit_base", "full")
    frame = tables.reported(Store.load(profile))
    keys = ["model", "dataset", "regime", "classifier", "test_accuracy"]
    study = REPORTED[keys].rename(columns={"test_accuracy": "test_accuracy_reported"})
    merged = study.merge(frame, on=[*keys[:4], "test_accuracy_reported"], how="left", indicator=True)
    assert (merged["_merge"] == "both").all() and len(merged) == len(REPORTED)
    # this build's numbers, on their rows
    svm = frame[(frame["regime"] == "frozen_svm") & (frame["model"] == "alexnet") & (frame["dataset"] == "cifar10")]
    assert len(svm) == 1 and svm["classifier"].item() == "linear_svm"
    assert svm["test_accuracy_here"].item() == pytest.approx(42 / 60)
    assert svm["test_accuracy_reported"].item() == pytest.approx(0.7195) and svm["status"].item() == "ok"
    head = frame[(frame["regime"] == "full") & (frame["classifier"] == "head") & (frame["dataset"] == "cifar10")
                 & (frame["model"] == "alexnet")]
    assert len(head) == 1 and head["test_accuracy_here"].item() == pytest.approx(51 / 60)
    assert frame["test_accuracy_here"].notna().sum() == 5  # the svm, the head and three classical classifiers
    for name, pred in CLASSICAL.items():
        row = frame[(frame["regime"] == "classical") & (frame["classifier"] == name)
                    & (frame["dataset"] == "cifar10") & (frame["model"] == "alexnet")]
        assert len(row) == 1 and row["test_accuracy_here"].item() == pytest.approx(acc(Y, pred))
    assert frame.loc[(frame["dataset"] == "cifar10") & (frame["regime"] == "classical")
                     & (frame["classifier"] == "linear_svm"), "test_accuracy_reported"].item() == pytest.approx(0.9142)
    # status of every row's cell; the failed run adds no number
    fer = frame[(frame["dataset"] == "ferplus") & (frame["model"] == "deit_base") & (frame["regime"] == "full")]
    assert set(fer["status"]) == {"failed"} and fer["test_accuracy_here"].isna().all()
    assert set(frame.loc[frame["dataset"] == "ferplus", "status"]) <= {"failed", "missing"}
    # ordered by the study's regime order within dataset and model
    order = {r: i for i, r in enumerate(config.NOTEBOOK_REGIMES)}
    for _, part in frame.groupby(["dataset", "model"], sort=False):
        ranks = part["regime"].map(order).tolist()
        assert ranks == sorted(ranks)


def test_reported_puts_a_network_head_beside_the_studys_number_for_it(tmp_path):
    """book/reported.md: 'this build's numbers for the same model, dataset, regime and classifier (`head` is the
    network's own linear head)'. The study's full fine-tune of AlexNet on CIFAR-10 (0.9178) has no classifier
    name in reported.csv, so the row for it should carry this build's `head` accuracy."""
    profile = tmp_path / "quick"
    write_run(profile, "cifar10", "alexnet", "full", Y, predict(Y, slice(0, 51)))
    frame = tables.reported(Store.load(profile))
    rows = frame[(frame["dataset"] == "cifar10") & (frame["model"] == "alexnet") & (frame["regime"] == "full")]
    assert len(rows) == 1, rows[["classifier", "test_accuracy_reported", "test_accuracy_here"]].to_string()
    assert rows["test_accuracy_reported"].item() == pytest.approx(0.9178)
    assert rows["test_accuracy_here"].item() == pytest.approx(51 / 60)
    # its interval is the one the Comparison page gives the same run (the kept classifier's predictions)
    iv = tables.intervals(Store.load(profile).run("cifar10", "alexnet", "full"))["accuracy"]
    assert (rows["ci_low"].item(), rows["ci_high"].item()) == (iv.low, iv.high) and iv.low < 51 / 60 < iv.high


def test_reported_gives_every_classifier_an_interval_from_its_own_counts(tmp_path):
    profile = tmp_path / "quick"
    knn_right, svm_right = slice(0, 30), slice(0, 55)
    write_run(profile, "cifar10", "alexnet", "classical", Y,
              {"knn_pca128": predict(Y, knn_right), "linear_svm": predict(Y, svm_right)})
    frame = tables.reported(Store.load(profile))
    frame = frame[(frame["regime"] == "classical") & (frame["dataset"] == "cifar10")].set_index("classifier")
    for name, right in (("knn_pca128", 30), ("linear_svm", 55)):
        row = frame.loc[name]
        expected = stats.accuracy_ci(np.arange(60) < right)
        assert row["test_accuracy_here"] == pytest.approx(right / 60)
        assert (row["ci_low"], row["ci_high"]) == (expected.low, expected.high)
    assert frame.loc["knn_pca128", "ci_high"] < frame.loc["linear_svm", "ci_low"]  # 50% vs 92% of 60 images


# --- regime_runs, protocol, provenance, times -----------------------------------------------------------------


def test_per_regime_and_provenance_tables(mixed):
    store = Store.load(mixed["profile"])
    full = tables.regime_runs(store, "full").set_index(["dataset", "model"])
    assert len(full) == 4
    assert full.loc[("CIFAR-10", "AlexNet"), "status"] == "ok"
    assert full.loc[("CIFAR-10", "AlexNet"), "test accuracy [95% CI]"].startswith("91.7% [")
    assert full.loc[("CIFAR-10", "AlexNet"), "val accuracy"] == "91.7%"
    assert full.loc[("FERPlus", "AlexNet"), "status"] == "failed: ValueError: label_rule='bogus'"
    assert full.loc[("CIFAR-10", "DeiT-Base"), "status"].startswith("damaged: ")
    assert full.loc[("FERPlus", "DeiT-Base"), "test accuracy [95% CI]"] == "—"
    classical = tables.regime_runs(store, "classical").set_index(["dataset", "model"])
    assert classical.loc[("FERPlus", "AlexNet"), "status"] == "not run yet"
    used = tables.protocol(store)
    assert len(used) == 4 and set(used["n_test"]) == {N} and set(used["n_train"]) == {100}
    assert (used["label_rule"] == used["dataset"].map({"cifar10": "—", "ferplus": "majority"})).all()
    assert (used["layout"] == used["dataset"].map({"cifar10": "imagefolder", "ferplus": "microsoft"})).all()
    prov = tables.provenance(store)
    assert len(prov) == 20
    svm = prov[(prov["regime"] == "frozen SVM") & (prov["model"] == "AlexNet")
               & (prov["dataset"] == "CIFAR-10")].iloc[0]
    assert svm["weights"] == "random init" and svm["date"] == "2024-05-01" and svm["status"] == "ok"
    spent = tables.times(store)
    assert len(spent) == 7 and spent.loc[spent["status"] == "failed", "wall_s"].tolist() == [3.5, 3.5]
    assert tables.pct(0.7195) == "72.0%" and tables.pct(None) == "—"
    assert tables.pct_ci(0.72, 0.681, 0.756) == "72.0% [68.1, 75.6]"
    assert tables.pp_ci(0.114, 0.08, 0.149) == "+11.4 pp [+8.0, +14.9]"


# --- 7. report.store.load() and the book context --------------------------------------------------------------


def test_load_finds_the_context_by_walking_up(tmp_path, monkeypatch, mixed):
    monkeypatch.delenv(CONTEXT_ENV, raising=False)
    book_root = tmp_path / "repo"
    path = write_context(book_root, mixed["profile"], tmp_path / "data")
    assert path == book_root / CONTEXT_FILE
    assert json.loads(path.read_text()) == {"profile_dir": str(mixed["profile"].resolve()),
                                            "data_root": str((tmp_path / "data").resolve())}
    page_dir = book_root / "book" / "regimes" / "deep"
    page_dir.mkdir(parents=True)
    store = load(page_dir)
    assert store.profile == "quick" and store.counts()["ok"] == 4 and store.data_root == (tmp_path / "data").resolve()
    monkeypatch.chdir(page_dir)  # default start: the working directory
    assert report.load().counts() == store.counts()


def test_load_honours_the_environment_variable(tmp_path, monkeypatch, mixed):
    other = tmp_path / "elsewhere" / "smoke"
    write_run(other, "ferplus", "alexnet", "full", labels(40, "ferplus"), predict(labels(40, "ferplus"),
                                                                                 slice(0, 10), "ferplus"))
    ctx = tmp_path / "ctx.json"
    results.write_json(ctx, {"profile_dir": str(other), "data_root": str(tmp_path)})
    near = write_context(tmp_path / "repo", mixed["profile"], tmp_path / "data")  # a nearer one that must lose
    monkeypatch.setenv(CONTEXT_ENV, str(ctx))
    store = load(near.parent)
    assert store.profile == "smoke" and [r.key for r in store.finished()] == ["ferplus/alexnet/full"]
    monkeypatch.setenv(CONTEXT_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(StoreError, match=r"book context .*nope\.json is unreadable"):
        load(near.parent)
    (tmp_path / "bad.json").write_text("{")
    monkeypatch.setenv(CONTEXT_ENV, str(tmp_path / "bad.json"))
    with pytest.raises(StoreError, match="unreadable.*transferstudy book-data"):
        load()


def test_load_without_a_context_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.delenv(CONTEXT_ENV, raising=False)
    start = tmp_path / "a" / "b"
    start.mkdir(parents=True)
    if any((d / CONTEXT_FILE).is_file() for d in start.resolve().parents):
        pytest.skip("a book context exists above the temporary folder")
    with pytest.raises(StoreError) as info:
        load(start)
    message = str(info.value)
    assert f"no {CONTEXT_FILE}" in message and str(start.resolve()) in message
    assert "transferstudy book-data" in message and CONTEXT_ENV in message


# --- 8. projections ---------------------------------------------------------------------------------------


X_EMB = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)


def _counting(monkeypatch) -> list:
    calls = []
    original = projections.compute

    def compute(X, method, seed=0):
        calls.append(method)
        return original(X, method, seed)

    monkeypatch.setattr(projections, "compute", compute)
    return calls


def test_projection_is_cached_and_read_back(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    Y1 = projections.project(X_EMB, "PCA", cache)
    assert Y1.shape == (40, 2) and Y1.dtype == np.float32
    np.testing.assert_allclose(Y1, projections.compute(X_EMB, "PCA"), rtol=1e-5, atol=1e-5)
    files = list(cache.glob("pca-*.npy"))
    assert len(files) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(projections, "compute", refuse)
    np.testing.assert_array_equal(projections.project(X_EMB, "PCA", cache), Y1)
    # another input or seed is another key
    with pytest.raises(AssertionError, match="cache should"):
        projections.project(X_EMB + 1, "PCA", cache)
    with pytest.raises(AssertionError, match="cache should"):
        projections.project(X_EMB, "PCA", cache, seed=1)


@pytest.mark.parametrize("garbage", [b"\x00\x01garbage bytes", b"\x93NUMPY garbage", "truncated", "wrong shape",
                                     "nan"], ids=["garbage", "bad-header", "truncated", "wrong-shape", "nan"])
def test_a_damaged_cache_file_is_recomputed(tmp_path, monkeypatch, garbage):
    cache = tmp_path / "cache"
    Y1 = projections.project(X_EMB, "PCA", cache)
    (path,) = cache.glob("pca-*.npy")
    good = path.read_bytes()
    if garbage == "truncated":
        path.write_bytes(good[: len(good) - 40])
    elif garbage == "wrong shape":
        np.save(path, np.zeros((39, 2), dtype=np.float32))
    elif garbage == "nan":
        np.save(path, np.full((40, 2), np.nan, dtype=np.float32))
    else:
        path.write_bytes(garbage)
    calls = _counting(monkeypatch)
    Y2 = projections.project(X_EMB, "PCA", cache)
    assert calls == ["PCA"]
    np.testing.assert_array_equal(Y2, Y1)
    assert path.read_bytes() == good  # rewritten whole
    assert projections.project(X_EMB, "PCA", cache).shape == (40, 2) and calls == ["PCA"]


@pytest.mark.parametrize("garbage", [b"", b"PK\x03\x04 not really a zip"], ids=["empty", "zip-like"])
def test_an_empty_or_zip_like_cache_file_is_recomputed(tmp_path, monkeypatch, garbage):
    """An empty file (a crash mid-copy), or bytes that start like a zip so np.load tries an .npz: still damaged,
    still recomputed."""
    cache = tmp_path / "cache"
    Y1 = projections.project(X_EMB, "PCA", cache)
    (path,) = cache.glob("pca-*.npy")
    path.write_bytes(garbage)
    calls = _counting(monkeypatch)
    np.testing.assert_array_equal(projections.project(X_EMB, "PCA", cache), Y1)
    assert calls == ["PCA"]


def test_projection_refuses_unknown_methods_and_too_few_points(tmp_path):
    with pytest.raises(ValueError, match="choose one of PCA, t-SNE, UMAP"):
        projections.compute(X_EMB, "MDS")
    with pytest.raises(ValueError, match="too few"):
        projections.project(X_EMB[:4], "PCA", tmp_path)
    assert projections.project(X_EMB, "PCA", None).shape == (40, 2)


# --- 9. predictions that do not belong to their metrics ---------------------------------------------------------


def test_predictions_disagreeing_with_the_recorded_accuracy_are_refused(tmp_path):
    run_dir = write_run(tmp_path / "quick", "cifar10", "alexnet", "full", Y, predict(Y, slice(0, 30)))
    assert read_run(run_dir).predictions.correct.mean() == pytest.approx(0.5)
    results.write_npz(run_dir / "predictions.npz", y_true=Y, y_pred=predict(Y, slice(0, 31)),
                      files=default_files(N))
    run = read_run(run_dir)
    with pytest.raises(StoreError, match=r"test accuracy 0\.5167 but metrics\.json records 0\.5000 for 'head'") as info:
        run.predictions
    assert str(run_dir / "predictions.npz") in str(info.value) and "cifar10/alexnet/full" in str(info.value)
    with pytest.raises(StoreError):  # and the tables refuse it too
        tables.accuracy(Store.load(tmp_path / "quick"))


def test_unreadable_or_absent_predictions_are_a_store_error(tmp_path):
    run_dir = write_run(tmp_path / "quick", "cifar10", "alexnet", "full", Y, predict(Y, slice(0, 30)))
    (run_dir / "predictions.npz").write_bytes(b"\x00 not an npz")
    with pytest.raises(StoreError, match="unreadable.*--force"):
        read_run(run_dir).predictions
    (run_dir / "predictions.npz").unlink()
    with pytest.raises(StoreError, match="unreadable"):
        read_run(run_dir).predictions
    results.write_npz(run_dir / "predictions.npz", y_true=Y, y_pred=Y)  # no files
    with pytest.raises(StoreError, match="unreadable"):
        read_run(run_dir).predictions


@pytest.mark.parametrize("garbage", [b"", b"PK\x03\x04 truncated zip"], ids=["empty", "zip-like"])
def test_an_empty_or_broken_zip_predictions_file_is_a_store_error(tmp_path, garbage):
    run_dir = write_run(tmp_path / "quick", "cifar10", "alexnet", "full", Y, predict(Y, slice(0, 30)))
    (run_dir / "predictions.npz").write_bytes(garbage)
    with pytest.raises(StoreError, match="unreadable"):
        read_run(run_dir).predictions


def test_protocol_sentence_says_which_ferplus_runs_match_the_original_test_set():
    frame = pd.DataFrame({"dataset": ["ferplus", "ferplus", "cifar10"], "label_rule": ["argmax", "majority", "—"],
                          "n_test": [report.ORIGINAL_FERPLUS_TEST, 3137, 10000]})
    assert report.protocol_sentence(frame).startswith("1 of the 2 finished FERPlus runs did not use")
    assert "label rule argmax, majority; test sets of 3,137, 7,099 images" in report.protocol_sentence(frame)
    assert report.protocol_sentence(frame.iloc[[0, 2]]).startswith("All 1 finished FERPlus runs used")
    assert report.protocol_sentence(frame.iloc[[2]]) == "No FERPlus run has finished, so there is nothing to check."


def test_compare_command_prints_both_intervals_the_difference_and_mcnemar(tmp_path, capsys):
    from transferstudy import cli

    y = labels(200)
    rng = np.random.default_rng(3)
    right_a, right_b = rng.random(200) < 0.55, rng.random(200) < 0.8
    a = write_run(tmp_path / "smoke", "cifar10", "alexnet", "linear_probe", y, predict(y, right_a))
    b = write_run(tmp_path / "smoke", "cifar10", "deit_base", "linear_probe", y, predict(y, right_b))
    assert cli.main(["compare", str(a), str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"a", "b", "difference", "difference_ci", "n", "b_only", "a_only", "mcnemar_p"}
    assert out["a"]["accuracy"] == pytest.approx(right_a.mean()) and out["n"] == 200
    assert out["difference"] == pytest.approx(right_b.mean() - right_a.mean())
    assert out["a_only"] == int((right_a & ~right_b).sum()) and out["b_only"] == int((right_b & ~right_a).sum())
    assert out["mcnemar_p"] == pytest.approx(
        scipy_stats.binomtest(out["b_only"], out["a_only"] + out["b_only"], 0.5).pvalue)
    lo, hi = out["a"]["ci"]
    assert lo <= out["a"]["accuracy"] <= hi and out["difference_ci"][0] <= out["difference"] <= out["difference_ci"][1]
    assert cli.main(["compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "McNemar exact p" in text and ("B beats A" in text) == (out["mcnemar_p"] < 0.05 and out["difference"] > 0)
    # a run on other test images is refused, naming both folders
    c = write_run(tmp_path / "smoke", "ferplus", "alexnet", "linear_probe", labels(200, "ferplus"),
                  labels(200, "ferplus"), files=[f"other/{i}.png" for i in range(200)])
    assert cli.main(["compare", str(a), str(c)]) == 2
    err = capsys.readouterr().err
    assert "different test images" in err and str(a) in err and str(c) in err


def test_the_results_command_names_the_unreadable_file_of_a_damaged_run(mixed, capsys):
    from transferstudy import cli

    assert cli.main(["results", "--profile", mixed["profile"].name, "--runs-dir", str(mixed["profile"].parent)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("cifar10/deit_base/full damaged: "))
    assert str(mixed["dirs"]["damaged"] / "meta.json") in line and "--force" in line


def test_book_data_gives_a_cut_off_notebook_a_note_page_naming_it_and_keeps_the_old_pages_until_done(
        mixed, tmp_path, monkeypatch, capsys):
    from transferstudy import book

    root = tmp_path / "book-root"
    (root / "book").mkdir(parents=True)
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    svm = mixed["dirs"]["svm"]
    (svm / "notebook.ipynb").write_text('{"cells": [{"cell_type": "mark')  # cut off mid-write
    book.generate(mixed["profile"], tmp_path / "no-data", root)
    page = (root / book.GENERATED / "runs" / "cifar10-alexnet-frozen_svm.md").read_text()
    assert "This run **damaged**" in page and str(svm / "notebook.ipynb") in page and "--force" in page
    said = capsys.readouterr().err  # and on the console, naming the file
    line = next(line for line in said.splitlines() if line.startswith("cifar10/alexnet/frozen_svm damaged: "))
    assert str(svm / "notebook.ipynb") in line and "--force" in line
    assert (root / book.GENERATED / "runs" / "cifar10-alexnet-classical.md").is_file()  # the others are written
    # a failure while writing the pages leaves the previous pages as they were
    before = sorted(p.name for p in (root / book.GENERATED / "runs").iterdir())
    monkeypatch.setattr(book, "_write_run_page", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        book.generate(mixed["profile"], tmp_path / "no-data", root)
    assert sorted(p.name for p in (root / book.GENERATED / "runs").iterdir()) == before
