"""The analysis runs of the matrix (feature reuse, data scarcity): their settings, the session pieces their
notebooks use, their records in the results store, and how the runner ties them to the fine-tunes they read.
The notebooks themselves run end to end in test_runner.py (and in the shared smoke study)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torchvision.models import alexnet

from transferstudy import config, features, preflight, results, reuse, runner, session, training
from transferstudy.report.store import Store, StoreError

# --- settings ------------------------------------------------------------------------------------------


def test_the_analyses_are_runs_of_the_matrix_after_the_regimes():
    keys = [s.key for s in runner.matrix("cifar10/alexnet/*")]
    assert keys == [f"cifar10/alexnet/{r}" for r in (*config.NOTEBOOK_REGIMES, "feature_reuse", "data_scarcity",
                                                     "stats_transfer")]
    assert runner.sources(runner.RunSpec("cifar10", "alexnet", "feature_reuse"), {}) == {
        "partial_dir": "partial", "full_dir": "full"}
    assert runner.sources(runner.RunSpec("cifar10", "alexnet", "stats_transfer"), {}) == {"full_dir": "full"}


@pytest.mark.parametrize(("value", "why"), [
    ([0, 0.5, 1.0], "each item must be a number > 0 and <= 1"),
    ([0.5, 1.5], "each item must be a number > 0 and <= 1"),
    ([0.1, 0.1, 1.0], "a value given twice"),
    (["ten"], "each item must be"),
    ([], "not a non-empty list"),
])
def test_fractions_are_distinct_numbers_in_0_1(value, why):
    with pytest.raises(config.ConfigError, match=rf"fractions=.*{why}"):
        config.check_value("fractions", value)
    assert config.check_value("fractions", "[0.01, 0.5, 1]") == [0.01, 0.5, 1.0]


def test_settings_that_contradict_each_other_are_refused_up_front_for_the_matrix():
    runs = [("data_scarcity", "alexnet", d) for d in config.DATASETS]
    with pytest.raises(config.ConfigError) as err:
        config.check_overrides({"subset_seeds": 2, "finetune_seeds": 3}, runs, "quick")
    text = str(err.value)
    assert "2 problems" in text and "cifar10/alexnet/data_scarcity: finetune_seeds=3 is more than subset_seeds=2" in text
    assert config.check_overrides({"subset_seeds": 3, "finetune_seeds": 3}, runs, "quick")[runs[0]] == {
        "subset_seeds": 3, "finetune_seeds": 3}


def test_no_fine_tune_is_a_word_for_data_scarcity_and_the_quick_deit_run_trains_none():
    assert config.resolve("data_scarcity", "deit_base", "ferplus", "quick")["finetunes"] is None
    assert config.resolve("data_scarcity", "alexnet", "ferplus", "quick", {"finetunes": "none"})["finetunes"] is None
    with pytest.raises(config.ConfigError, match="'classical' is not a choice"):
        config.resolve("data_scarcity", "alexnet", "ferplus", "quick", {"finetunes": "[classical]"})


# --- the session pieces --------------------------------------------------------------------------------


def start(regime: str, cifar_dir: Path, tmp_path: Path, profile: str = "smoke", **overrides) -> session.Session:
    settings = {"pretrained": False, "n_train": 8, "n_val": 4, "n_test": 6, **overrides}
    return session.start(regime, model="alexnet", dataset="cifar10", profile=profile, data_dir=cifar_dir,
                          output_dir=tmp_path / regime, cache_dir=tmp_path / "cache", overrides=settings,
                          log=lambda line: None)


def test_as_regime_gives_that_regimes_profile_settings_with_this_runs_changes(cifar_dir, tmp_path):
    run = start("data_scarcity", cifar_dir, tmp_path, profile="quick", batch_size=4)
    probe, tune = run.as_regime("linear_probe"), run.as_regime("full")
    assert probe.regime == "linear_probe" and probe.data is run.data and probe.recorder is run.recorder
    # the regimes' own quick values (the probe's 10 epochs, the fine-tune's 5) with this run's batch and subsets
    assert probe.cfg == config.resolve("linear_probe", "alexnet", "cifar10", "quick",
                                       {"pretrained": False, "n_train": 8, "n_val": 4, "n_test": 6, "batch_size": 4})
    assert (probe.cfg["epochs"], tune.cfg["epochs"], tune.cfg["batch_size"]) == (10, 5, 4)
    # a setting left at the profile's value keeps each regime's own (eval_batch_size is common to all)
    assert run.as_regime("frozen_svm").cfg["eval_batch_size"] == config.resolve(
        "frozen_svm", "alexnet", "cifar10", "quick")["eval_batch_size"]


def test_finetuned_refuses_a_run_that_started_from_other_weights(cifar_dir, tmp_path):
    run = start("feature_reuse", cifar_dir, tmp_path)
    source = tmp_path / "full"
    with pytest.raises(ValueError, match=r"holds no finished run.*--only cifar10/alexnet/full"):
        run.finetuned(source)
    results.write_json(source / "params.json", {"seed": 42})
    results.write_json(source / "meta.json", {"status": "ok", "model": "alexnet", "dataset": "cifar10",
                                              "init": "imagenet"})
    with pytest.raises(ValueError, match=r"init 'imagenet' but this run has init 'random'"):
        run.finetuned(source)
    results.write_json(source / "meta.json", {"status": "failed", "error": "boom"})
    with pytest.raises(ValueError, match=r"did not finish \(boom\)"):
        run.finetuned(source)


def test_probes_run_one_forward_pass_per_image_and_are_cached(tmp_path):
    torch.manual_seed(0)
    net = alexnet(num_classes=3).eval()
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    split = type("S", (), {"images": images, "labels": torch.tensor([0, 1, 2, 0, 1]), "files": [f"{i}" for i in range(5)]})
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    lines: list[str] = []
    kwargs = dict(weights_id="w", cache_dir=tmp_path, preprocess=lambda x, train: x.float() / 255, batch_size=2,
                  device="cpu", log=lines.append)
    first = features.probes(net, "alexnet", {"test": split}, **kwargs)["test"]
    assert len(calls) == 3  # 5 images in batches of 2: one pass per image for every probe point
    expected = reuse.collect(net, "alexnet", [images.float() / 255])
    assert list(first) == list(reuse.probe_points("alexnet"))
    for layer, x in expected.items():  # float16 on disk (what a later cache hit returns): 3 significant digits
        assert first[layer].shape == x.shape and np.allclose(first[layer], x, rtol=2e-3, atol=1e-4)
    calls.clear()
    again = features.probes(net, "alexnet", {"test": split}, **kwargs)["test"]
    assert len(calls) == 1 and any("feature cache hit" in line for line in lines)  # one image: the widths
    assert all(np.array_equal(again[layer], first[layer]) for layer in first)


def test_eval_batches_and_take_keep_the_split_order():
    images = torch.arange(6 * 3 * 2 * 2, dtype=torch.uint8).reshape(6, 3, 2, 2)
    split = training_split = type("S", (), {"images": images, "labels": torch.arange(6)})
    got = list(training.eval_batches(split, preprocess=lambda x, train: x.float(), batch_size=4, device="cpu",
                                     limit=5))
    assert [labels.tolist() for _, labels in got] == [[0, 1, 2, 3], [4]]
    assert torch.equal(torch.cat([x for x, _ in got]), images[:5].float())
    from transferstudy.data import Split

    part = Split(images, torch.arange(6), None, [f"f{i}" for i in range(6)]).take(np.array([4, 1]))
    assert part.labels.tolist() == [4, 1] and part.files == ["f4", "f1"] and torch.equal(part.images[0], images[4])
    del training_split


# --- resumable states: one run folder's abandoned attempts go when it finishes -------------------------


def _state_file(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.r0.e0001.0123456789abcdef.pt"
    path.write_bytes(b"x")
    return path


def test_clear_family_deletes_one_run_folders_states_only(tmp_path):
    mine = [_state_file(tmp_path, "cifar10-alexnet-full-aaaa1111-111111111111"),
            _state_file(tmp_path, "cifar10-alexnet-full-aaaa1111-222222222222")]
    (tmp_path / ".cifar10-alexnet-full-aaaa1111-333.x.tmp").write_bytes(b"")
    other = _state_file(tmp_path, "cifar10-alexnet-full-bbbb2222-111111111111")
    gone = training.TrainState.clear_family(tmp_path, "cifar10-alexnet-full-aaaa1111-")
    assert set(gone) >= set(mine) and len(gone) == 3
    assert other.exists() and not any(p.exists() for p in mine)


def test_a_finished_run_deletes_the_states_its_earlier_settings_left(cifar_dir, tmp_path):
    run = start("full", cifar_dir, tmp_path)
    state = run.train_state()
    abandoned = _state_file(state.folder, f"{run._resume_family()}full-feedfeedfeed")
    elsewhere = _state_file(state.folder, "quick-cifar10-alexnet-full-full-feedfeedfeed")  # another profile's run
    assert state.name.startswith("smoke-cifar10-alexnet-full-full-")
    run.finish(trainable=1, total=2)
    assert not abandoned.exists() and elsewhere.exists()


def test_a_data_scarcity_runs_subset_states_are_its_own(cifar_dir, tmp_path):
    run = start("data_scarcity", cifar_dir, tmp_path)
    probe = run.as_regime("linear_probe")
    subset = probe.train_state("fraction0.5-seed42")
    assert probe.owner == "data_scarcity" and subset.key != probe.train_state("fraction0.25-seed42").key
    mine = _state_file(subset.folder, subset.name)
    the_probe_runs = _state_file(subset.folder, "smoke-cifar10-alexnet-linear_probe-linear_probe-feedfeedfeed")
    assert subset.name.startswith("smoke-cifar10-alexnet-data_scarcity-linear_probe-")
    run.finish(trainable=0, total=1)
    assert not mine.exists() and the_probe_runs.exists()  # the linear probe's own run is another run


def test_a_kept_result_is_read_back_only_when_sound_and_of_the_same_training(tmp_path):
    said = []
    state = training.TrainState(tmp_path, "smoke-cifar10-alexnet-data_scarcity-full-0123456789ab", key="k1")
    assert state.load_result(said.append) is None
    path = state.save_result([3, 1, 2])
    assert state.load_result(said.append) == [3, 1, 2] and "not trained again" in said[-1]
    assert state.save_result([4]) != path and not path.exists()  # one kept result per training: the newest
    assert training.TrainState(tmp_path, state.name, key="k2").load_result(said.append) is None  # other settings
    assert "written for other settings" in said[-1] and not list(tmp_path.glob("*.done.*"))  # deleted
    path = state.save_result([5, 6])
    path.write_bytes(path.read_bytes().replace(b"5", b"7"))  # altered on disk
    assert state.load_result(said.append) is None and "do not match the checksum" in said[-1] and not path.exists()
    state.save_result([1])
    gone = training.TrainState.clear_family(tmp_path, "smoke-cifar10-alexnet-data_scarcity-")
    assert [p.name.split(".")[1] for p in gone] == ["done"] and not list(tmp_path.iterdir())


def test_a_restarted_data_scarcity_run_does_not_train_a_finished_subset_again(cifar_dir, tmp_path):
    trained = []

    def train_and_score(run, idx):
        tuned = run.build_model()
        run.fit(tuned, run.data.train.take(idx), subset=f"n{len(idx)}")
        trained.append(len(idx))
        return run.predict(tuned, "test")[1]

    first = start("data_scarcity", cifar_dir, tmp_path).as_regime("full")
    predicted = first.subset_result("n4", lambda: train_and_score(first, np.arange(4)))
    assert trained == [4] and predicted.shape == (6,)
    # the run killed here, then started again: the finished subset is read back, the next one is trained
    again = start("data_scarcity", cifar_dir, tmp_path).as_regime("full")
    assert np.array_equal(again.subset_result("n4", lambda: train_and_score(again, np.arange(4))), predicted)
    again.subset_result("n6", lambda: train_and_score(again, np.arange(6)))
    assert trained == [4, 6]
    # another setting is another training (its own key, so nothing kept is read for it); finish keeps nothing
    other = start("data_scarcity", cifar_dir, tmp_path, batch_size=2).as_regime("full")
    assert other.train_state("n4").load_result(print) is None
    assert other.train_state("n4").key != again.train_state("n4").key
    again.finish(trainable=0, total=1)
    assert not list((tmp_path / "cache" / "resume").glob("*.done.*.json"))


def test_statistics_transfer_has_the_full_fine_tunes_settings_but_init():
    for profile in ("full", "quick", "smoke"):
        for model in config.MODELS:
            for dataset in config.DATASETS:
                full = config.resolve("full", model, dataset, profile)
                st = config.resolve("stats_transfer", model, dataset, profile)
                assert st == {k: v for k, v in full.items() if k != "init"} | {"regime": "stats_transfer"}
    assert config.resolve("stats_transfer", "deit_base", "cifar10", "quick")["micro_batch_size"] == 16  # full/deit_base
    # it starts from statistics transfer, so its own record and log line say so, with or without ImageNet weights
    for pretrained in (True, False):
        cfg = config.resolve("stats_transfer", "alexnet", "cifar10", "smoke", {"pretrained": pretrained})
        assert "init" not in cfg and config.start_weights(cfg) == "stats"
    with pytest.raises(config.ConfigError, match="parameter 'init' is not a setting of the stats_transfer regime"):
        config.resolve("stats_transfer", "alexnet", "cifar10", "smoke", {"init": "random"})
    # a -p for the whole matrix reaches the full fine-tune and the statistics transfer alike; init only the former
    runs = [("full", "alexnet", "cifar10"), ("stats_transfer", "alexnet", "cifar10")]
    per_run = config.check_overrides({"lr_backbone": 0.5, "init": "stats"}, runs, "smoke")
    assert per_run[runs[0]] == {"lr_backbone": 0.5, "init": "stats"} and per_run[runs[1]] == {"lr_backbone": 0.5}


def test_statistics_transfer_trains_as_the_full_fine_tune_did_or_is_refused_before_training(cifar_dir, tmp_path):
    tuning = start("stats_transfer", cifar_dir, tmp_path).as_regime("full", {"init": "stats"})
    assert tuning.cfg == config.resolve("full", "alexnet", "cifar10", "smoke",
                                        {"pretrained": False, "n_train": 8, "n_val": 4, "n_test": 6, "init": "stats"})
    assert config.start_weights(tuning.cfg) == "stats" and tuning.owner == "stats_transfer"
    own = start("stats_transfer", cifar_dir, tmp_path).provenance_line()
    assert "statistics transfer" in own and "randomly initialised" in own and "random initialisation" not in own
    changed = start("stats_transfer", cifar_dir, tmp_path, lr_backbone=0.5).as_regime("full", {"init": "stats"})
    assert changed.cfg["lr_backbone"] == 0.5  # this run's change to a setting of the full fine-tune reaches it
    full = tmp_path / "runs" / "full"

    def finished(meta: dict | None = None, **changed) -> None:  # the full fine-tune's record, as its run writes it
        results.write_json(full / "params.json", {**tuning.cfg, "init": "imagenet", "data_dir": str(cifar_dir),
                                                  "output_dir": str(full), **changed})
        results.write_json(full / "meta.json", meta or {"status": "ok", "split_hash": tuning.data.split_hash,
                                                        "init": "random"})

    finished()
    wt = {"init": "imagenet"}
    shared = tuning.trained_as(full, wt)
    assert "init" not in shared and shared["lr_backbone"] == tuning.cfg["lr_backbone"] == 0.01
    finished(lr_backbone=0.5)
    with pytest.raises(ValueError, match=r"is a run with lr_backbone 0.5 but it needs lr_backbone 0.01; this "
                                         r"stats_transfer run must train as it did but for init 'imagenet'"):
        tuning.trained_as(full, wt)
    finished(init="stats")  # a store run with -p init stats: its full fine-tune is no weight transfer
    with pytest.raises(ValueError, match=r"is a run with init 'stats' but it needs init 'imagenet'"):
        tuning.trained_as(full, wt)
    finished({"status": "ok", "split_hash": "0" * 16})
    with pytest.raises(ValueError, match="split_hash '0000000000000000' but it needs split_hash"):
        tuning.trained_as(full, wt)
    finished({"status": "failed", "error": "RuntimeError: boom"})
    with pytest.raises(ValueError, match=r"last run did not finish \(RuntimeError: boom\); rerun it first"):
        tuning.trained_as(full, wt)


# --- the results store ---------------------------------------------------------------------------------


def write_analysis(profile_dir: Path, dataset: str, model: str, name: str, table: pd.DataFrame) -> Path:
    folder = profile_dir / dataset / model / name
    results.write_json(folder / "params.json", {"model": model, "dataset": dataset, "pretrained": False})
    results.atomic_write_bytes(folder / f"{name}.csv", table.to_csv(index=False).encode())
    results.write_json(folder / "meta.json", {"status": "ok", "model": model, "dataset": dataset, "regime": name,
                                              "pretrained": False, "profile": profile_dir.name})
    return folder


REUSE = pd.DataFrame({"network": ["full", "full"], "layer": ["pool1", "fc7"], "measure": ["cka", "cka"],
                      "value": [0.9, 0.4], "ci_low": [0.85, 0.3], "ci_high": [0.95, 0.5]})


def test_the_store_reads_the_analysis_runs_beside_the_regimes(tmp_path):
    profile_dir = tmp_path / "smoke"
    write_analysis(profile_dir, "cifar10", "alexnet", "feature_reuse", REUSE)
    write_analysis(profile_dir, "ferplus", "deit_base", "feature_reuse", REUSE.assign(value=[0.8, 0.1]))
    store = Store.load(profile_dir, tmp_path)
    assert len(store.runs) == 20 and len(store.analyses) == 12
    assert store.analysis("cifar10", "alexnet", "feature_reuse").ok
    assert store.analysis("cifar10", "deit_base", "feature_reuse").status == "missing"
    assert store.analysis("cifar10", "alexnet", "feature_reuse").title == "Feature reuse: AlexNet on CIFAR-10"
    frame = store.analysis_frame("feature_reuse")
    assert list(frame.columns) == ["model", "dataset", *REUSE.columns]
    assert frame.groupby(["model", "dataset"])["value"].sum().round(3).to_dict() == {
        ("alexnet", "cifar10"): 1.3, ("deit_base", "ferplus"): 0.9}
    empty = store.analysis_frame("data_scarcity")
    assert empty.empty and "test_accuracy" in empty.columns
    assert {r.key for r in store.every_run()} >= {"cifar10/alexnet/feature_reuse", "cifar10/alexnet/full"}


def test_a_damaged_analysis_table_is_named_not_read(tmp_path):
    profile_dir = tmp_path / "smoke"
    folder = write_analysis(profile_dir, "cifar10", "alexnet", "feature_reuse", REUSE.drop(columns="ci_low"))
    with pytest.raises(StoreError, match=rf"{folder / 'feature_reuse.csv'} lacks the columns \['ci_low'\]"):
        Store.load(profile_dir, tmp_path).analysis_frame("feature_reuse")
    (folder / "cka_matrices.npz").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(StoreError, match=r"cka_matrices.npz is unreadable.*--force"):
        Store.load(profile_dir, tmp_path).analysis("cifar10", "alexnet", "feature_reuse").cka_matrices()


# --- the runner ties an analysis to the fine-tunes it reads --------------------------------------------


def test_a_changed_fine_tune_changes_the_feature_reuse_fingerprint(tmp_path):
    spec = runner.RunSpec("cifar10", "alexnet", "feature_reuse")
    final = runner.run_dir_for(tmp_path, "smoke", spec)
    params = runner.notebook_parameters(spec, "smoke", tmp_path, final, tmp_path, {})
    assert params["full_dir"] == str((tmp_path / "smoke" / "cifar10" / "alexnet" / "full").resolve())
    before = runner.fingerprint(spec, "smoke", params, "code")
    results.write_json(Path(params["full_dir"]) / "meta.json", {"status": "ok", "fingerprint": "one"})
    after = runner.fingerprint(spec, "smoke", params, "code")
    results.write_json(Path(params["full_dir"]) / "meta.json", {"status": "ok", "fingerprint": "two"})
    assert len({before, after, runner.fingerprint(spec, "smoke", params, "code")}) == 3
    json.dumps(params)  # papermill's parameters are plain JSON


def test_the_runner_locks_the_fine_tunes_an_analysis_reads(tmp_path, monkeypatch):
    held: list[Path] = []

    class Hold:
        def __init__(self, folders, wait=0.0):
            held.extend(Path(f) for f in folders)

        def __enter__(self):
            return []

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(runner, "hold", Hold)
    monkeypatch.setattr(runner, "execute", lambda spec, *a, **k: runner.Outcome(spec, "skipped", 0.0, tmp_path))
    monkeypatch.setattr(runner, "write_table", lambda root: None)
    monkeypatch.setattr(preflight, "check_runs", lambda runs, data_root: None)
    runner.run_matrix("smoke", tmp_path, tmp_path, only="ferplus/deit_base/feature_reuse", report=lambda line: None)
    assert sorted(p.name for p in held) == ["feature_reuse", "full", "partial"]
