"""The Optuna search: grids, pruning from inside the notebook, SQLite by default, and two workers on PostgreSQL.

Trials are real smoke-profile runs of the AlexNet linear probe (random initialisation) on synthetic
CIFAR-10, executed by papermill like `transferstudy run`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from optuna.trial import TrialState
from synthetic import write_cifar_imagefolder

from transferstudy import cli, config, results, search, trials
from transferstudy.report import chapters, store, tables

RUN = dict(model="alexnet", dataset="cifar10", regime="linear_probe", profile="smoke")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data_root")
    write_cifar_imagefolder(root / "cifar10", 5, 1)  # the smoke profile takes 20 / 10 / 10
    return root


# --- search spaces -------------------------------------------------------------------------


@pytest.mark.parametrize("model", config.MODELS)
@pytest.mark.parametrize("dataset", config.DATASETS)
@pytest.mark.parametrize("regime", search.SEARCH_REGIMES)
def test_every_grid_names_settings_of_its_regime(regime, dataset, model):
    space = search.check_space(search.load_space(regime, model, dataset), regime, model, dataset, "quick", {})
    assert space
    trial = optuna.trial.FixedTrial({name: choices[-1] if not isinstance(choices[0], dict) else
                                     search._label(choices[-1]) for name, choices in space.items()})
    overrides = search.suggest(trial, space)
    settings = config.resolve(regime, model, dataset, "quick", overrides)  # raises on a key the regime lacks
    assert all(settings[k] == v for k, v in overrides.items())


def test_the_authors_grids_and_overrides(tmp_path):
    probe = search.load_space("linear_probe", "alexnet", "cifar10")
    assert probe == {"lr": [1e-3, 3e-4, 1e-4], "epochs": [6, 10, 15], "batch_size": [32, 64]}
    assert search.load_space("linear_probe", "deit_base", "cifar10")["lr"] == [5e-3, 1e-3, 1e-4]
    partial = search.load_space("partial", "alexnet", "cifar10")["lrs"]
    assert partial == [{"lr_head": 1e-3, "lr_backbone": 1e-4}, {"lr_head": 3e-4, "lr_backbone": 3e-5}]
    # a pinned setting leaves the space; a --space file replaces a grid
    pinned = search.check_space(probe, "linear_probe", "alexnet", "cifar10", "smoke", {"lr": 0.01})
    assert set(pinned) == {"epochs", "batch_size"}
    override = tmp_path / "space.yaml"
    override.write_text("epochs: [3, 4]\nbatch_size: null\n")
    assert search.load_space("linear_probe", "alexnet", "cifar10", override) == {"lr": [1e-3, 3e-4, 1e-4],
                                                                                  "epochs": [3, 4]}


def test_bad_grids_are_refused_with_the_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr_hed: [0.1]\n")
    space = search.load_space("linear_probe", "alexnet", "cifar10", bad)
    with pytest.raises(search.SearchError, match="'lr_hed' is not a setting of the linear_probe regime"):
        search.check_space(space, "linear_probe", "alexnet", "cifar10", "smoke", {})
    bad.write_text("frozen_svm:\n  all: {class_weight: [null, balanced]}\n")
    space = search.load_space("frozen_svm", "alexnet", "ferplus", bad)
    with pytest.raises(search.SearchError, match="class_weight: null cannot be a choice here"):
        search.check_space(space, "frozen_svm", "alexnet", "ferplus", "smoke", {})
    with pytest.raises(search.SearchError, match="--space .*missing.yaml: no such file"):
        search.load_space("linear_probe", "alexnet", "cifar10", tmp_path / "missing.yaml")
    with pytest.raises(search.SearchError, match="regime 'classical' has no search space"):
        search.load_space("classical", "alexnet", "cifar10")


# --- pruning, reported from the notebook's side ---------------------------------------------


@pytest.mark.parametrize("pruner", search.PRUNERS)
def test_reporter_prunes_a_trial_behind_the_others(pruner, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=search.open_storage(url), direction="maximize")

    def report(values: list[float]) -> trials.TrialReporter:
        trial = study.ask()
        monkeypatch.setenv(trials.TRIAL_ENV, json.dumps({"storage": url, "study": "s", "pruner": pruner,
                                                         "trial_id": trial._trial_id}))
        reporter = trials.trial_reporter()
        for epoch, value in enumerate(values, 1):
            if reporter(epoch, {"val_acc": value}):
                break
        study.tell(trial, state=TrialState.PRUNED) if reporter.pruned_epoch else study.tell(trial, values[-1])
        return reporter

    for _ in range(3):
        assert report([0.8, 0.9]).pruned_epoch is None
    behind = report([0.1, 0.2])
    assert behind.pruned_epoch == (None if pruner == "none" else 1)
    last = study.trials[-1]
    assert last.intermediate_values == ({1: 0.1, 2: 0.2} if pruner == "none" else {1: 0.1})
    assert report([0.9, 0.95]).pruned_epoch is None
    monkeypatch.delenv(trials.TRIAL_ENV)
    assert trials.trial_reporter() is None


# --- the default storage: SQLite, no server ---------------------------------------------------


@pytest.mark.slow
def test_sqlite_search_prunes_exports_and_reruns(data_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    name = search.default_study_name(**RUN)
    output = runs / "search" / name
    output.mkdir(parents=True)
    # two finished trials far ahead at epoch 1: the median pruner stops the next trial there
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{output / 'study.db'}", direction="maximize")
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(value=-1.0, intermediate_values={1: 1.0, 2: 1.0}))
    common = dict(**RUN, data_root=data_root, runs_root=runs, fixed={"pretrained": False, "epochs": 2})
    assert search.search(n_trials=3, pruner="median", report=False, **common) == output

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{output / 'study.db'}")
    pruned = study.trials[2]
    assert pruned.state == TrialState.PRUNED and pruned.user_attrs["pruned_epoch"] == 1
    assert list(pruned.intermediate_values) == [1]
    run_dir = Path(pruned.user_attrs["run_dir"])
    assert run_dir == output / "trials" / "0002" / "smoke" / "cifar10" / "alexnet" / "linear_probe"
    assert results.read_json(run_dir / "meta.json")["pruned_epoch"] == 1
    assert len((run_dir / "curves.csv").read_text().splitlines()) == 2  # header + the one epoch it ran
    assert (run_dir.parent.parent.parent.parent / ".cache").resolve() == (output / "cache").resolve()
    # the trial is in the results store like any run
    table = store.collect(output / "trials" / "0002" / "smoke")
    assert table[["regime", "status"]].values.tolist() == [["linear_probe", "ok"]]
    assert "best_trial" not in results.read_json(output / "summary.json")  # nothing complete yet

    search.search(n_trials=4, pruner="none", report=True, **common)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{output / 'study.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED, TrialState.COMPLETE]
    best = study.trials[3]
    summary = results.read_json(output / "summary.json")
    assert summary["best_trial"] == 3 and summary["best_value"] == best.value == best.user_attrs["val_accuracy"]
    assert summary["states"]["complete"] == 3 and summary["states"]["pruned"] == 1
    assert search.load_best(output) == {"pretrained": False, "epochs": 2, **best.params}
    entry = yaml.safe_load((output / "best_params.yaml").read_text())
    assert list(entry) == ["linear_probe/alexnet/cifar10"]
    trials = (output / "trials.csv").read_text().splitlines()
    assert len(trials) == 5 and trials[0].startswith("number,state,val_accuracy")
    # the search chapter gives each trial's test accuracy its interval, from the trial's own run folder
    _, frame, _ = chapters.read_search(output)
    shown = chapters.trials_frame(frame)["test accuracy [95% CI] (not used)"]
    ran = frame[frame["run_dir"].map(lambda d: isinstance(d, str))]
    assert list(ran["number"]) == [2, 3]  # trials 0 and 1 were added to the study by hand, without a run
    assert list(shown[frame["run_dir"].isna()]) == ["—", "—"]  # and no test accuracy
    for row in ran.itertuples():
        iv = tables.intervals(store.read_run(Path(row.run_dir)))["accuracy"]
        assert iv.value == pytest.approx(row.test_accuracy)
        assert shown[row.Index] == tables.pct_ci(iv.value, iv.low, iv.high)
    report = json.loads((output / "report.ipynb").read_text())
    outputs = [o for c in report["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2

    # the exported command re-runs the best trial with `transferstudy run`
    rerun = tmp_path / "rerun"
    assert summary["run_command"].startswith("transferstudy run --profile smoke")
    assert cli.main(summary["run_args"] + ["--runs-dir", str(rerun)]) == 0
    params = results.read_json(rerun / "smoke" / "cifar10" / "alexnet" / "linear_probe" / "params.json")
    assert {k: params[k] for k in search.load_best(output)} == search.load_best(output)


def test_missing_data_root_is_refused_before_any_trial(tmp_path):
    with pytest.raises(search.SearchError, match="--data-root .*: no cifar10/ folder"):
        search.search(**RUN, n_trials=1, data_root=tmp_path, runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


# --- two workers on a real PostgreSQL server ---------------------------------------------------


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed; install PostgreSQL by hand:\n{proc.stderr[-2000:]}"
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of Debian's package on a free loopback port in a temporary folder (trust auth)."""
    pg = _pg_bin()
    folder = Path(tempfile.mkdtemp(prefix="transferstudy-pg-"))
    shutil.chown(folder, "postgres", "postgres")
    port = _free_port()

    def as_postgres(*args: str) -> None:
        proc = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True)
        assert proc.returncode == 0, f"{args[0]}: {proc.stdout}{proc.stderr}"

    as_postgres(str(pg / "initdb"), "-D", str(folder / "db"), "-U", "postgres", "--auth=trust")
    as_postgres(str(pg / "pg_ctl"), "-D", str(folder / "db"), "-l", str(folder / "log"), "-w", "start",
                "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        as_postgres(str(pg / "pg_ctl"), "-D", str(folder / "db"), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def _worker(url: str, runs: Path, data_root: Path, n: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "transferstudy.search", "--model", "alexnet", "--dataset", "cifar10",
           "--regime", "linear_probe", "--profile", "smoke", "--trials", str(n), "--storage", url,
           "--study-name", "shared", "--data-root", str(data_root), "--runs-dir", str(runs),
           "-p", "pretrained", "false", "--pruner", "none", "--heartbeat", "1", "--no-report"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_two_workers_share_a_postgres_study_and_survive_a_killed_worker(postgres_url, data_root, tmp_path):
    n = 4
    runs_a, runs_b = tmp_path / "a", tmp_path / "b"  # two machines' results stores
    logs = [(tmp_path / f"{w}.log").open("w") for w in "ab"]
    a = _worker(postgres_url, runs_a, data_root, n, logs[0])
    b = _worker(postgres_url, runs_b, data_root, n, logs[1])
    b_name = f"{socket.gethostname()}:{b.pid}"
    storage = search.open_storage(postgres_url)
    leftovers: list[psutil.Process] = []
    try:
        # once worker B has finished a trial and is inside the notebook of its next one, kill it
        deadline = time.time() + 240
        killed = None
        while killed is None:
            assert time.time() < deadline and a.poll() is None, (tmp_path / "b.log").read_text()[-3000:]
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
            except KeyError:  # the study is not created yet
                continue
            mine = [t for t in trials if t.user_attrs.get("worker") == b_name]
            running = [t for t in mine if t.state == TrialState.RUNNING]
            if any(t.state == TrialState.COMPLETE for t in mine) and running:
                stage = (runs_b / "search" / "shared" / "trials" / f"{running[0].number:04d}" / "smoke" / "cifar10"
                         / "alexnet" / "linear_probe.running")
                if (stage / "params.json").is_file():  # its notebook has started
                    leftovers = psutil.Process(b.pid).children(recursive=True)
                    os.kill(b.pid, signal.SIGKILL)
                    killed = running[0].number
        b.wait(timeout=30)
        for child in leftovers:  # the killed worker's notebook kernel, orphaned
            if child.is_running():
                child.kill()
        assert a.wait(timeout=300) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
        for log in logs:
            log.close()

    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n  # exactly the requested number
    assert [t.state for t in trials].count(TrialState.FAIL) == 1  # the killed worker's trial, nothing else
    lost = trials[killed]
    assert lost.state == TrialState.FAIL and lost.user_attrs["worker"] == b_name and "error" not in lost.user_attrs
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state == TrialState.COMPLETE and retry.params == lost.params and retry.user_attrs["worker"] != b_name
    assert {t.user_attrs["worker"] for t in complete} == {b_name, f"{socket.gethostname()}:{a.pid}"}
    # each finished trial ran once, into its own run folder, which is in that machine's results store
    assert len({t.number for t in complete}) == n
    for t in complete:
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir.parts[-5] == f"{t.number:04d}"
        assert results.read_json(run_dir / "meta.json")["status"] == "ok"
        params = results.read_json(run_dir / "params.json")
        assert {k: params[k] for k in t.params} == t.params and params["pretrained"] is False
        rows = store.collect(run_dir.parents[2])  # <trial>/<profile>
        assert rows["status"].tolist() == ["ok"]
    summary = results.read_json(runs_a / "search" / "shared" / "summary.json")
    assert summary["states"]["complete"] == n and summary["states"]["fail"] == 1
    assert "shared" in (tmp_path / "a.log").read_text()
