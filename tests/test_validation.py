"""One schema for every setting, checked before anything runs: by config.resolve (so a notebook's first
cell under plain papermill), once for a whole matrix by the runner, and by the search.

No notebook is executed here: the runner's notebook step is replaced by one that fails the test.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from transferstudy import cli, config, preflight, runner, session
from transferstudy.runner import NOTEBOOK_DIR, NOTEBOOKS, RunSpec

PROFILES = tuple(config.profiles())
ALL_RUNS = [(r, m, d) for r in config.NOTEBOOKS for m in config.MODELS for d in config.DATASETS]


@pytest.fixture
def no_notebooks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a notebook was started although the settings are bad")

    monkeypatch.setattr(runner, "execute_notebook", refuse)


def run_cli(tmp_path: Path, capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["run", "--profile", "smoke", "--data-root", str(tmp_path / "data"),
                     "--runs-dir", str(tmp_path / "runs"), *args])
    return code, capsys.readouterr().err


def cell_names(regime: str) -> set[str]:
    nb = nbformat.read(NOTEBOOK_DIR / NOTEBOOKS[regime], as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    namespace: dict = {}
    exec(cell.source, namespace)
    return set(namespace) - {"__builtins__"}


# --- the schema and the yaml ------------------------------------------------------------------------


def test_every_setting_has_one_schema_entry_and_every_entry_is_a_setting():
    assert set(config.SCHEMA) == config.all_keys()
    for name, s in config.SCHEMA.items():
        assert s.kind in ("int", "float", "bool", "str", "path", "list"), name
        # "none" is the word for no value: a setting that has no value cannot also have a choice "none"
        assert not (s.none is not None and config.NONE in s.choices), name


@pytest.mark.parametrize("profile", PROFILES)
def test_the_yamls_own_values_pass_the_schema(profile):
    for regime, model, dataset in ALL_RUNS:
        cfg = config.resolve(regime, model, dataset, profile)
        for name in config.settings(regime):
            assert config.check_value(name, cfg[name], model, dataset) == cfg[name], (profile, regime, model, name)


def test_a_bad_value_in_the_yaml_names_the_file_the_profile_and_the_run(monkeypatch):
    import copy

    data = copy.deepcopy(config._load())
    data["profiles"]["smoke"]["common"]["epochs"] = 0
    monkeypatch.setattr(config, "_load", lambda: data)
    with pytest.raises(config.ConfigError, match=r"profiles.yaml, profile smoke, run cifar10/alexnet/full: "
                                                 r"epochs=0: too small; epochs takes a whole number >= 1"):
        config.resolve("full", "alexnet", "cifar10", "smoke")


def test_the_schemas_choices_are_the_librarys():
    from transferstudy import classical, data, models, preprocess, training

    s = config.SCHEMA
    assert set(s["optimizer"].choices) == set(training.OPTIMIZERS)
    assert set(s["scheduler"].choices) == set(training.SCHEDULERS)
    assert set(s["monitor"].choices) == set(training.MONITORS)
    assert set(s["eval_mode"].choices) == set(preprocess.MODES)
    assert set(s["augment"].choices) == set(preprocess.POLICIES)
    assert set(s["kernel"].choices) == set(classical.KERNELS)
    assert set(s["classifiers"].choices) == set(classical.CLASSIFIERS)
    assert set(s["label_rule"].choices) == set(data.LABEL_RULES)
    assert dict(s["embedding"].per_model) == models.EMBEDDINGS
    # the regimes that read each setting are the ones whose parameters cell defines it
    for name in config.SCHEMA:
        assert set(config.readers(name)) == {r for r in config.NOTEBOOKS if name in cell_names(r)}, name


# --- bad values stop before anything runs, once for the whole matrix ----------------------------------


@pytest.mark.parametrize(("key", "value", "message"), [
    ("epochs", "ten", "-p epochs='ten': not a whole number; epochs takes a whole number >= 1"),
    ("lr", "abc", "-p lr='abc': not a number; lr takes a number > 0"),
    ("batch_size", "0", "-p batch_size=0: too small; batch_size takes a whole number >= 1"),
    ("lr", "-1", "-p lr=-1: too small; lr takes a number > 0"),
    ("n_train", "-5", "-p n_train=-5: too small; n_train takes a whole number from 1 to 40,000"),
    ("n_test", "20000", "-p n_test=20000: too large; n_test takes a whole number from 1 to 10,000"),
    ("optimizer", "sgdd", "-p optimizer='sgdd': not a choice; optimizer takes one of: adamw, adam, sgd"),
    ("pretrained", "flase", "-p pretrained='flase': not a boolean; pretrained takes true or false"),
    ("label_rule", "bogus", "-p label_rule='bogus': not a choice; label_rule takes one of: majority, argmax, "
                            "votes, or none"),
    ("classifiers", "[mlp, knn]", "-p classifiers=['mlp', 'knn']: 'knn' is not a choice"),
    ("warmup_frac", "1.5", "-p warmup_frac=1.5: too large; warmup_frac takes a number >= 0 and < 1"),
])
def test_a_bad_value_stops_the_whole_matrix_with_one_message(key, value, message, tmp_path, capsys, no_notebooks):
    code, err = run_cli(tmp_path, capsys, "-p", key, value)
    assert code == 2
    assert err.count(message) == 1, err  # once, although several runs read the setting
    assert not (tmp_path / "runs").exists()  # nothing was started, locked or written


def test_every_bad_setting_is_named_in_the_one_message(tmp_path, capsys, no_notebooks):
    code, err = run_cli(tmp_path, capsys, "-p", "epochs", "ten", "-p", "lr", "-1", "-p", "lr_hed", "1")
    assert code == 2
    assert "3 problems with the settings, nothing was run" in err
    assert "-p epochs='ten'" in err and "-p lr=-1" in err and "-p lr_hed: no notebook has this parameter" in err
    assert "did you mean lr_head?" in err


def test_a_limit_that_depends_on_the_dataset_is_named_per_dataset(no_notebooks):
    runs = [("full", "alexnet", "cifar10"), ("full", "alexnet", "ferplus")]
    with pytest.raises(config.ConfigError) as info:
        config.check_overrides({"n_test": 9000}, runs, "smoke")
    text = str(info.value)
    assert "n_test=9000: too large" in text and "7,178 (ferplus:" in text
    assert "cifar10" not in text.split("n_test takes")[1].split(")")[0]  # cifar10's test split has 10,000
    with pytest.raises(config.ConfigError, match="image_size=256: deit_base takes no other value; "
                                                 "image_size takes 224 for deit_base"):
        config.check_overrides({"image_size": 256}, [("full", "deit_base", "cifar10")], "smoke")
    assert config.check_overrides({"image_size": 256}, [("full", "alexnet", "cifar10")], "smoke")


def test_values_are_read_as_the_setting_takes_them():
    assert config.check_value("pretrained", "false") is False  # papermill -p pretrained false: a string
    assert config.check_value("pretrained", "no") is False
    assert config.check_value("epochs", 1e1) == 10 and isinstance(config.check_value("epochs", 1e1), int)
    assert config.check_value("lr", 1) == 1.0 and isinstance(config.check_value("lr", 1), float)
    assert config.check_value("classifiers", "[mlp, linear_svm]") == ["mlp", "linear_svm"]
    assert config.check_value("augment", "none") == "none"  # a choice named none stays a choice
    for name, value in (("epochs", True), ("epochs", 2.5), ("lr", float("nan")), ("seed", -1),
                        ("classifiers", []), ("classifiers", "[mlp, mlp]"), ("pretrained", 1)):
        with pytest.raises(config.ConfigError, match=re.escape(f"{name}={value!r}")):
            config.check_value(name, value)


def test_plain_papermill_values_are_checked_in_the_notebooks_first_cell_before_any_data(tmp_path):
    # what papermill -p injects into a parameters cell: strings for words, Python literals otherwise
    namespace = {**{name: None for name in cell_names("linear_probe")}, "model": "alexnet", "dataset": "cifar10",
                 "profile": "smoke", "data_dir": str(tmp_path / "no-such-data"), "output_dir": str(tmp_path / "run"),
                 "pretrained": "flase"}
    with pytest.raises(config.ConfigError, match="parameter pretrained='flase': not a boolean; "
                                                 "pretrained takes true or false"):
        session.start("linear_probe", namespace)  # a data error would come later: the folder does not exist
    assert not (tmp_path / "run").exists()
    namespace.update(pretrained="false", n_train="none", epochs="3")
    args = config.from_namespace("linear_probe", namespace)
    cfg = config.resolve("linear_probe", args["model"], args["dataset"], args["profile"], args["overrides"])
    assert (cfg["pretrained"], cfg["n_train"], cfg["epochs"]) == (False, None, 3)


# --- null, none and all ---------------------------------------------------------------------------------


def test_none_and_all_ask_for_the_whole_split_and_reach_the_notebook_as_none():
    runs = [("full", "alexnet", "cifar10"), ("frozen_svm", "deit_base", "ferplus")]
    for word in ("none", "all"):
        per_run = config.check_overrides({"n_train": word, "patience": "none"}, runs, "smoke")
        assert per_run[runs[0]] == {"n_train": config.NONE, "patience": config.NONE}
        assert per_run[runs[1]] == {"n_train": config.NONE}  # the SVM does not read patience
        assert config.resolve(*runs[0], "smoke", per_run[runs[0]])["n_train"] is None
    assert config.resolve("full", "alexnet", "cifar10", "smoke")["n_train"] == 20


def test_null_keeps_the_profiles_value_so_it_is_refused_where_that_is_not_null(tmp_path, capsys, no_notebooks):
    code, err = run_cli(tmp_path, capsys, "-p", "n_train", "null")
    assert code == 2
    assert err.count("-p n_train null") == 1, err  # once, for the 20 runs
    assert ("-p n_train null: null keeps the profile's value (20 in the smoke profile for cifar10/alexnet/"
            "frozen_svm and 31 more of the selected runs), so it would change nothing; for the whole train split "
            "write -p n_train none (or all)" in err)
    # where the profile's value is null already, null changes nothing either way and is not passed on
    assert config.check_overrides({"n_train": None}, [("full", "alexnet", "cifar10")], "full") == {
        ("full", "alexnet", "cifar10"): {}}
    # a setting that has no "no value" says what it takes
    with pytest.raises(config.ConfigError, match="-p epochs null: .*epochs takes a whole number >= 1"):
        config.check_overrides({"epochs": None}, [("full", "alexnet", "cifar10")], "smoke")
    with pytest.raises(config.ConfigError, match=r"epochs='none': not a whole number"):
        config.check_overrides({"epochs": "none"}, [("full", "alexnet", "cifar10")], "smoke")


def test_the_null_convention_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "null keeps the profile's value" in text and "-p n_train none (or all) uses the whole split" in text
    assert "n_train (stratified subset of the train split (drawn after the 80/20 split)): a whole number >= 1 " \
           "and at most 40,000 for cifar10" in text
    assert ("patience (early stopping after this many epochs without improvement): a whole number >= 1, or none "
            "(no early stopping) [linear_probe, partial, full, stats_transfer]") in text


def test_a_setting_given_twice_is_refused(tmp_path, capsys, no_notebooks):
    code, err = run_cli(tmp_path, capsys, "-p", "lr", "0.1", "-p", "lr", "0.2")
    assert code == 2 and "-p lr is given twice (0.1 and '0.2'); give it once" in err


# --- identity settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "hint"), [
    ("model", "--only"), ("dataset", "--only"), ("regime", "--only"), ("profile", "--profile"),
    ("data_dir", "--data-root"), ("output_dir", "--runs-dir"), ("source_dir", "source_regime"),
])
def test_the_names_that_say_which_run_cannot_be_set(name, hint, tmp_path, capsys, no_notebooks):
    code, err = run_cli(tmp_path, capsys, "-p", name, "deit_base")
    assert code == 2
    assert f"-p {name}: {name} says which run this is, it is not a setting, so -p cannot change it" in err
    assert hint in err
    assert name not in config.all_keys()


# --- a setting no selected run reads is refused; the others reach exactly the runs that read them -------


def test_a_setting_no_selected_run_reads_is_refused(tmp_path, capsys, no_notebooks):
    code, err = run_cli(tmp_path, capsys, "--only", "*/*/frozen_svm", "-p", "epochs", "3")
    assert code == 2
    assert ("-p epochs: no selected run reads it, so it would have no effect; epochs is read by linear_probe, "
            "partial, full, stats_transfer, the selected runs are frozen_svm") in err
    code, err = run_cli(tmp_path, capsys, "--only", "*/*/frozen_svm,*/*/classical", "-p", "batch_size", "16")
    assert code == 2
    assert "the selected runs are frozen_svm, classical (frozen_svm: the frozen SVM trains no network" in err


def _valid_value(name: str, regime: str, model: str, dataset: str, folder: Path):
    """A value of ``name`` other than the profile's, where the schema allows one (a file made in ``folder``)."""
    current = config.resolve(regime, model, dataset, "smoke")[name]
    s = config.SCHEMA[name]
    candidates = {"bool": [not current], "int": [3, 224], "float": [0.5], "path": [_touch(folder / "weights.pth")],
                  "list": [["mlp"]], "str": [c for c in config._choices(s, model) if c != current]}[s.kind]
    if s.none is not None and current is not None:
        candidates.append(config.NONE)
    for value in candidates:
        try:
            config.check_value(name, value, model, dataset)
        except config.ConfigError:
            continue
        return value
    return current


def _touch(path: Path) -> str:
    path.write_bytes(b"")
    return str(path)


def test_a_missing_weights_file_is_refused_before_anything_runs(tmp_path, capsys, no_notebooks):
    missing = tmp_path / "nowhere" / "alexnet.pth"
    code, err = run_cli(tmp_path, capsys, "--only", "cifar10/alexnet/full", "-p", "weights_path", str(missing))
    assert code == 2
    assert f"weights_path={str(missing)!r}: no such file ({missing}); check the path" in err
    assert "weights_path takes the path of an existing file" in err
    assert not list(tmp_path.rglob("*.running"))  # refused before any run folder was made


@pytest.mark.parametrize("name", sorted(config.SCHEMA))
def test_every_accepted_setting_reaches_the_notebook_of_each_run_that_reads_it(name, tmp_path):
    for regime, model, dataset in ALL_RUNS:
        spec = RunSpec(dataset, model, regime)
        value = _valid_value(name, config.readers(name)[0], model, dataset, tmp_path)
        final = runner.run_dir_for(tmp_path, "smoke", spec)
        if regime in config.readers(name) and config.not_applied(
                name, {**config.resolve(regime, model, dataset, "smoke"), name: value}) is not None:
            with pytest.raises(config.ConfigError, match=f"-p {name}: none of the selected runs would apply it"):
                runner.notebook_parameters(spec, "smoke", tmp_path, final, tmp_path, {name: value})
        elif regime in config.readers(name):
            params = runner.notebook_parameters(spec, "smoke", tmp_path, final, tmp_path, {name: value})
            assert params[name] == value
            assert name in cell_names(regime)  # papermill sets it in the cell; session.start collects it
            settings = config.resolve(regime, model, dataset, "smoke",
                                      {k: v for k, v in params.items() if k not in config.run_names(regime)})
            assert settings[name] == config.check_value(name, value, model, dataset)
        else:
            with pytest.raises(config.ConfigError, match=f"-p {name}: no selected run reads it"):
                runner.notebook_parameters(spec, "smoke", tmp_path, final, tmp_path, {name: value})


def test_the_matrix_passes_a_setting_to_the_runs_that_read_it_and_says_which_do_not(tmp_path, monkeypatch):
    passed: dict[str, dict] = {}

    def execute(spec, profile, data_root, runs_root, overrides, **kwargs):
        passed[spec.key] = dict(overrides)
        return runner.Outcome(spec, "skipped", 0.0, tmp_path)

    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(runner, "write_table", lambda root: None)
    monkeypatch.setattr(preflight, "check_runs", lambda runs, data_root: None)  # no data here: not what is tested
    lines: list[str] = []
    runner.run_matrix("smoke", tmp_path / "data", tmp_path / "runs", {"batch_size": 16, "C": 2},
                      only="cifar10/alexnet/*", report=lines.append)
    assert passed == {"cifar10/alexnet/frozen_svm": {"C": 2.0}, "cifar10/alexnet/linear_probe": {"batch_size": 16},
                      "cifar10/alexnet/partial": {"batch_size": 16}, "cifar10/alexnet/full": {"batch_size": 16},
                      "cifar10/alexnet/classical": {}, "cifar10/alexnet/feature_reuse": {},
                      "cifar10/alexnet/data_scarcity": {"batch_size": 16}, "cifar10/alexnet/stats_transfer": {"batch_size": 16}}
    assert any(line.startswith("note: -p batch_size applies to the linear_probe, partial, full, data_scarcity, "
                               "stats_transfer runs; "
                               "the frozen_svm, classical, feature_reuse runs do not read it "
                               "(frozen_svm: the frozen SVM trains")
               for line in lines), lines


def test_search_checks_its_pinned_settings_the_same_way_before_starting(tmp_path):
    search = pytest.importorskip("transferstudy.search")
    common = dict(model="alexnet", dataset="cifar10", regime="linear_probe", profile="smoke", n_trials=1,
                  data_root=tmp_path, runs_root=tmp_path / "runs")
    with pytest.raises(config.ConfigError, match="-p epochs='ten': not a whole number"):
        search.search(**common, fixed={"epochs": "ten"})
    with pytest.raises(config.ConfigError, match="-p C: no selected run reads it"):
        search.search(**common, fixed={"C": 1.0})
    with pytest.raises(config.ConfigError, match="-p model: model says which run"):
        search.search(**common, fixed={"model": "deit_base"})
    bad_space = tmp_path / "space.yaml"
    bad_space.write_text("lr: [0.1, -0.5]\n")
    with pytest.raises(config.ConfigError, match="-p lr=-0.5: too small"):
        search.search(**common, space_file=bad_space)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("only", ["", " ", ",", " , "])
def test_an_empty_only_is_refused_not_read_as_the_whole_matrix(only):
    # an unset shell variable in --only "$RUNS" must not start every run of the study
    with pytest.raises(runner.RunnerError, match=r"names no run; leave --only out to run every run"):
        runner.matrix(only)
    assert len(runner.matrix(None)) == 32 and [s.key for s in runner.matrix("cifar10/alexnet/full")] == [
        "cifar10/alexnet/full"]
