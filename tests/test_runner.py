"""The study runner end to end: every notebook at the smoke profile through papermill, on synthetic data.

Marked slow: these execute real notebooks (AlexNet, random initialisation) in Jupyter kernels.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill as pm
import pytest
from synthetic import clear_votes, write_cifar_imagefolder, write_ferplus_microsoft

from transferstudy import bundle, cli, config, results, reuse, runner
from transferstudy.runner import NOTEBOOKS, NOTEBOOK_DIR

pytestmark = pytest.mark.slow
ALEXNET_RUNS = "cifar10/alexnet/*,ferplus/alexnet/linear_probe"
EMOTIONS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """A data root with cifar10/ and ferplus/ big enough for the smoke profile's subsets (20/10/10)."""
    root = tmp_path_factory.mktemp("data_root")
    write_cifar_imagefolder(root / "cifar10", 5, 1)
    rows = {"train": [clear_votes(e) for e in EMOTIONS for _ in range(7)],
            "valid": [clear_votes(e) for e in EMOTIONS for _ in range(2)],
            "test": [clear_votes(e) for e in EMOTIONS for _ in range(2)]}
    # a row with split votes, so the votes rule has a soft target that is not one-hot
    rows["train"][0] = [4, 3, 0, 0, 3, 0, 0, 0, 0, 0]
    write_ferplus_microsoft(root / "ferplus", rows)
    return root


def run_cli(*args: str) -> int:
    return cli.main(["run", "--profile", "smoke", "-p", "pretrained", "false", *args])


@pytest.fixture(scope="module")
def smoke_runs(synthetic_root, tmp_path_factory) -> Iterator[Path]:
    runs = tmp_path_factory.mktemp("runs")
    assert run_cli("--data-root", str(synthetic_root), "--runs-dir", str(runs), "--only", ALEXNET_RUNS) == 0
    yield runs
    shutil.rmtree(runs, ignore_errors=True)  # ~1 GB of bundles; CI disks are small


def table(runs: Path, capsys) -> list[dict]:
    capsys.readouterr()
    assert cli.main(["results", "--profile", "smoke", "--runs-dir", str(runs), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_notebook_runs_and_lands_in_the_results_table(smoke_runs, capsys):
    rows = table(smoke_runs, capsys)
    keys = {"model", "dataset", "regime", "classifier", "status", "val_accuracy", "test_accuracy",
            "test_macro_f1", "trainable", "total", "pretrained", "profile", "device", "wall_s", "run_dir"}
    assert rows and all(keys <= set(row) for row in rows)
    ran = {(r["dataset"], r["regime"]) for r in rows}
    assert ran == {("cifar10", regime) for regime in config.NOTEBOOK_REGIMES} | {("ferplus", "linear_probe")}
    for row in rows:
        assert row["status"] == "ok" and row["pretrained"] is False and row["profile"] == "smoke"
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0
        assert 0 < row["trainable"] <= row["total"]
    classifiers = {r["classifier"] for r in rows if r["regime"] == "classical"}
    assert classifiers == {"linear_svm", "logistic_regression", "rbf_svm_pca256", "sgd_hinge", "knn_pca128",
                           "random_forest", "mlp"}
    probe = next(r for r in rows if r["regime"] == "linear_probe" and r["dataset"] == "cifar10")
    assert probe["trainable"] == 4096 * 10 + 10


def test_run_folder_holds_every_record(smoke_runs):
    run = smoke_runs / "smoke" / "cifar10" / "alexnet" / "full"
    for name in ("params.json", "split.json", "metrics.json", "curves.csv", "predictions.npz",
                 "embeddings-finetuned.npz", "notebook.ipynb", "meta.json", "bundle/checkpoint.pt",
                 "bundle/model.torchscript.pt", "bundle/classes.json", "bundle/meta.json"):
        assert (run / name).is_file(), name
    meta = results.read_json(run / "meta.json")
    assert meta["pretrained"] is False and meta["device"] == "cpu" and len(meta["split_hash"]) == 16
    assert {"torch", "timm", "date", "wall_s", "fingerprint"} <= set(meta)
    # the kernel held AlexNet (57M fp32 parameters, 218 MiB) and its gradients: its peak is above that
    assert 2 * 218 < meta["peak_rss_mb"] < 24 * 1024
    # the split is the same in every regime of a dataset
    hashes = {results.read_json(p)["split_hash"] for p in (smoke_runs / "smoke" / "cifar10").glob("*/*/split.json")}
    assert len(hashes) == 1
    nb = json.loads((run / "notebook.ipynb").read_text())
    errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    # the page a reader sees has no warning about Jupyter widgets (timm's import of tqdm.auto, hidden by the library)
    for page in sorted((smoke_runs / "smoke").glob("*/*/*/notebook.ipynb")):
        said = [o.get("text", "") for c in json.loads(page.read_text())["cells"] for o in c.get("outputs", [])]
        assert not [t for t in said if "IProgress not found" in t], page


def test_the_statistics_transfer_run_is_paired_with_the_full_fine_tune_it_trained_as(smoke_runs):
    from transferstudy.report import Store, tables

    folder = smoke_runs / "smoke" / "cifar10" / "alexnet"
    st, wt = (results.read_json(folder / r / "params.json") for r in ("stats_transfer", "full"))
    meta = results.read_json(folder / "stats_transfer" / "meta.json")
    assert meta["init"] == "stats" and meta["pretrained"] is False  # drawn from the random initialisation's statistics
    assert meta["weight_transfer_run"] == str((folder / "full").resolve()) and st["full_dir"] == meta["weight_transfer_run"]
    assert meta["trainable"] == meta["total"] == results.read_json(folder / "full" / "meta.json")["total"]
    # the same test images in the same order as the full fine-tune's, so the book pairs them image by image
    with np.load(folder / "full" / "predictions.npz") as a, np.load(folder / "stats_transfer" / "predictions.npz") as b:
        assert np.array_equal(a["files"], b["files"]) and np.array_equal(a["y_true"], b["y_true"])
    frame = tables.weight_vs_statistics(Store.load(smoke_runs / "smoke"))
    assert [(r.dataset, r.model) for r in frame.itertuples()] == [("cifar10", "alexnet")]
    row = frame.iloc[0]
    assert 0 <= row["st"] <= 1 and row["difference"] == pytest.approx(row["wt"] - row["st"])
    assert wt["init"] == "imagenet" and wt["lr_backbone"] == 0.01  # the settings the fine-tune took (not -p'd here)


def test_the_feature_reuse_run_keeps_every_measure_of_every_layer(smoke_runs):
    run = smoke_runs / "smoke" / "cifar10" / "alexnet" / "feature_reuse"
    frame = pd.read_csv(run / "feature_reuse.csv")
    assert list(frame.columns) == ["network", "layer", "measure", "value", "ci_low", "ci_high"]
    layers, units = list(reuse.probe_points("alexnet")), list(reuse.units("alexnet"))
    for network in ("backbone", "partial", "full"):
        for k in ("knn_k20", "knn_k200"):
            rows = frame.query("network == @network and measure == @k")
            assert list(rows["layer"]) == layers
            assert ((rows["ci_low"] <= rows["value"]) & (rows["value"] <= rows["ci_high"])).all()
    for network in ("partial", "full"):
        cka = frame.query("network == @network and measure == 'cka'")
        assert list(cka["layer"]) == layers and cka["value"].between(-0.05, 1.05).all()
        for measure in ("weight_distance", "resilience_restore", "resilience_redraw"):
            assert list(frame.query("network == @network and measure == @measure")["layer"]) == units
    # the partial fine-tune froze conv1-conv4: they did not move, and restoring them changes nothing at all
    moved = frame.query("network == 'partial' and measure == 'weight_distance'").set_index("layer")["value"]
    assert (moved[["conv1", "conv2", "conv3", "conv4"]] == 0).all() and moved["head"] > 0
    base = frame.query("network == 'partial' and measure == 'accuracy'")["value"].item()
    restored = frame.query("network == 'partial' and measure == 'resilience_restore'").set_index("layer")["value"]
    assert (restored[["conv1", "conv2", "conv3", "conv4"]] == base).all()
    # the representations of the queries, the same images in every network's file
    meta = results.read_json(run / "meta.json")
    for network in ("backbone", "partial", "full"):
        with np.load(run / f"representations-{network}.npz") as npz:
            assert sorted(npz.files) == sorted(layers)
            assert {npz[layer].shape[0] for layer in layers} == {meta["queries"]}
            assert npz["fc7"].dtype == np.float16 and npz["pool1"].shape[1] == 64
    with np.load(run / "cka_matrices.npz") as npz:
        matrix = npz["cka_backbone"]
        assert matrix.shape == (len(layers),) * 2 and np.allclose(np.diag(matrix), 1.0)


def test_the_data_scarcity_run_trains_each_regime_on_nested_subsets(smoke_runs):
    run = smoke_runs / "smoke" / "cifar10" / "alexnet" / "data_scarcity"
    frame = pd.read_csv(run / "data_scarcity.csv")
    cfg = config.resolve("data_scarcity", "alexnet", "cifar10", "smoke")
    assert set(frame["regime"]) == {"frozen_svm", "linear_probe", *cfg["finetunes"]}
    assert frame["n_test"].nunique() == 1  # the test split never shrinks
    for regime, rows in frame.groupby("regime"):
        seeds = cfg["subset_seeds"] if regime in ("frozen_svm", "linear_probe") else cfg["finetune_seeds"]
        assert len(rows) == (len(cfg["fractions"]) - 1) * seeds + 1, regime  # 100% is trained once
        assert rows.groupby("seed")["n_train"].apply(lambda n: n.is_monotonic_increasing).all()
    assert frame.query("fraction == 1.0")["n_train"].nunique() == 1


def test_rerun_skips_finished_work_and_force_redoes_it(smoke_runs, synthetic_root, capsys):
    meta = smoke_runs / "smoke" / "cifar10" / "alexnet" / "frozen_svm" / "meta.json"
    before = meta.read_text()
    capsys.readouterr()
    assert run_cli("--data-root", str(synthetic_root), "--runs-dir", str(smoke_runs), "--only", ALEXNET_RUNS) == 0
    assert "0 ran, 9 unchanged (skipped), 0 failed" in capsys.readouterr().out
    assert meta.read_text() == before
    assert run_cli("--data-root", str(synthetic_root), "--runs-dir", str(smoke_runs), "--force",
                   "--only", "cifar10/alexnet/frozen_svm") == 0
    assert "1 ran, 0 unchanged" in capsys.readouterr().out
    assert results.read_json(meta)["date"] >= json.loads(before)["date"] and meta.read_text() != before


def test_overrides_reach_the_notebook_and_count_as_a_change(smoke_runs, synthetic_root, capsys):
    capsys.readouterr()
    assert run_cli("--data-root", str(synthetic_root), "--runs-dir", str(smoke_runs),
                   "--only", "cifar10/alexnet/frozen_svm", "-p", "C", "0.25") == 0
    assert "1 ran" in capsys.readouterr().out
    run = smoke_runs / "smoke" / "cifar10" / "alexnet" / "frozen_svm"
    assert results.read_json(run / "params.json")["C"] == 0.25
    nb = json.loads((run / "notebook.ipynb").read_text())
    injected = next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert "C = 0.25" in "".join(injected["source"])


def test_unknown_override_is_rejected_before_anything_runs(smoke_runs, synthetic_root, capsys):
    assert run_cli("--data-root", str(synthetic_root), "--runs-dir", str(smoke_runs), "-p", "lr_hed", "1") == 2
    assert "-p lr_hed: no notebook has this parameter" in capsys.readouterr().err


def test_a_failing_run_keeps_the_last_result_and_the_others_still_run(smoke_runs, synthetic_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(smoke_runs, runs)
    damaged = tmp_path / "root"
    shutil.copytree(synthetic_root / "cifar10", damaged / "cifar10")
    cut = sorted((damaged / "cifar10" / "test").rglob("*.jpg"))[0]
    cut.write_bytes(cut.read_bytes()[:200])  # an image that lists fine and fails to decode: inside the notebook
    ok_run = runs / "smoke" / "cifar10" / "alexnet" / "full"
    metrics_before = (ok_run / "metrics.json").read_text()
    code = cli.main(["run", "--profile", "smoke", "--data-root", str(damaged), "--runs-dir", str(runs), "--force",
                     "--only", "cifar10/alexnet/full,cifar10/alexnet/frozen_svm", "-p", "pretrained", "false"])
    assert code == 1
    out = capsys.readouterr().out
    assert "cifar10/alexnet/frozen_svm: failed" in out and "cifar10/alexnet/full: failed" in out  # both tried
    # the earlier result is untouched; the failed attempt is kept beside it
    assert (ok_run / "metrics.json").read_text() == metrics_before
    assert (ok_run.with_name("full.failed") / "notebook.ipynb").is_file()
    rows = table(runs, capsys)
    status = {(r["dataset"], r["regime"]): r for r in rows if r["best"] is not False}  # one row per run
    assert status[("cifar10", "full")]["status"] == "failed"
    assert f"cannot decode image {cut}" in status[("cifar10", "full")]["error"]
    # a run not asked for keeps its success
    assert status[("cifar10", "partial")]["status"] == "ok"


def test_inputs_that_cannot_work_are_refused_before_any_run(smoke_runs, synthetic_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(smoke_runs, runs)
    cifar_only = tmp_path / "root"
    shutil.copytree(synthetic_root / "cifar10", cifar_only / "cifar10")
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    # ferplus is missing from this data root, and the weights file holds no weights
    code = cli.main(["run", "--profile", "smoke", "--data-root", str(cifar_only), "--runs-dir", str(runs), "--force",
                     "--only", "*/alexnet/full", "-p", "weights_path", __file__, "-p", "n_test", "9"])
    assert code == 2
    err = capsys.readouterr().err
    assert "2 problems with the inputs, nothing was run" in err
    assert f"data folder {cifar_only / 'ferplus'} does not exist" in err
    assert f"weights_path {__file__!r} is not a readable state dict" in err
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before  # no folder made, no run touched


@pytest.mark.parametrize("regime", ["full", "frozen_svm"])
def test_predict_gives_the_in_memory_models_class(smoke_runs, synthetic_root, regime, capsys):
    run = smoke_runs / "smoke" / "cifar10" / "alexnet" / regime
    saved = np.load(run / "predictions.npz")
    files = [str(synthetic_root / "cifar10" / f) for f in saved["files"]]
    classes = results.read_json(run / "bundle" / "classes.json")
    rows = bundle.predict_files(run / "bundle", files)
    predicted = [row["class"] for row in rows]
    assert predicted == [classes[i] for i in saved["y_pred"]]
    assert all(1 / len(classes) <= row["probability"] <= 1 for row in rows)  # the top class's probability
    capsys.readouterr()
    assert cli.main(["predict", "--bundle", str(run / "bundle"), files[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["class"] == predicted[0]


@pytest.mark.skipif(os.name != "posix", reason="Unix sockets")
def test_kernels_talk_over_unix_sockets_not_plain_tcp(tmp_path, capfd):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("out = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import json, pathlib\nfrom ipykernel.connect import get_connection_info\n"
                                  "pathlib.Path(out).write_text(get_connection_info())")],
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    nbformat.write(nb, tmp_path / "probe.ipynb")
    runner.execute_notebook(tmp_path / "probe.ipynb", tmp_path / "done.ipynb", {"out": str(tmp_path / "conn.json")},
                            tmp_path)
    assert json.loads((tmp_path / "conn.json").read_text())["transport"] == "ipc"
    assert "without encryption" not in capfd.readouterr().err


def test_plain_papermill_runs_a_notebook_with_soft_targets(synthetic_root, tmp_path):
    out = tmp_path / "probe"
    pm.execute_notebook(str(NOTEBOOK_DIR / NOTEBOOKS["linear_probe"]), str(tmp_path / "probe.ipynb"),
                        parameters={"dataset": "ferplus", "data_dir": str(synthetic_root / "ferplus"),
                                    "profile": "smoke", "pretrained": False, "label_rule": "votes",
                                    "output_dir": str(out), "cache_dir": str(tmp_path / "cache")},
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    assert results.read_json(out / "params.json")["label_rule"] == "votes"
    assert results.read_json(out / "meta.json")["status"] == "ok"
