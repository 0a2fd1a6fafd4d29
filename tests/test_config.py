"""Settings resolution: the original study's values, then the profile's, then the user's."""

import copy

import pytest

from transferstudy import config, runner


@pytest.mark.parametrize(("regime", "model", "dataset", "key", "value"), [
    # facts of ORIGINAL-STUDY.md, transcribed into profiles.yaml
    ("frozen_svm", "alexnet", "cifar10", "embedding", "pooled"),
    ("frozen_svm", "alexnet", "ferplus", "class_weight", "balanced"),
    ("frozen_svm", "deit_base", "ferplus", "max_iter", 20000),
    ("linear_probe", "alexnet", "ferplus", "optimizer", "adam"),
    ("linear_probe", "deit_base", "cifar10", "lr", 3e-3),
    ("linear_probe", "deit_base", "ferplus", "lr", 5e-3),
    ("partial", "alexnet", "cifar10", "lr_backbone", 3e-5),
    ("partial", "alexnet", "cifar10", "lr_head", 1e-3),
    ("partial", "deit_base", "cifar10", "lr_backbone", 5e-5),
    ("full", "alexnet", "cifar10", "optimizer", "sgd"),
    ("full", "alexnet", "cifar10", "momentum", 0.9),
    ("full", "alexnet", "cifar10", "epochs", 40),
    ("full", "alexnet", "ferplus", "label_smoothing", 0.05),
    ("full", "deit_base", "ferplus", "label_smoothing", 0.1),
    ("classical", "alexnet", "cifar10", "embedding", "penultimate"),
])
def test_full_profile_holds_the_original_study_settings(regime, model, dataset, key, value):
    assert config.resolve(regime, model, dataset, "full")[key] == value


def test_more_specific_entries_win():
    # quick: common sets epochs 5, deit_base 2, linear_probe/deit_base 10
    assert config.resolve("full", "alexnet", "cifar10", "quick")["epochs"] == 5
    assert config.resolve("full", "deit_base", "cifar10", "quick")["epochs"] == 2
    assert config.resolve("linear_probe", "deit_base", "cifar10", "quick")["epochs"] == 10


def test_profile_changes_only_keys_the_regime_has():
    cfg = config.resolve("frozen_svm", "alexnet", "cifar10", "smoke")
    assert "epochs" not in cfg and cfg["n_train"] == 20


def test_user_overrides_beat_the_profile_and_none_keeps_it():
    cfg = config.resolve("partial", "alexnet", "cifar10", "smoke", {"lr_head": 0.5, "epochs": None})
    assert cfg["lr_head"] == 0.5
    assert cfg["epochs"] == config.resolve("partial", "alexnet", "cifar10", "smoke")["epochs"]


@pytest.mark.parametrize(("args", "match"), [
    (("nope", "alexnet", "cifar10", "full"), "unknown regime or analysis 'nope'.*feature_reuse"),
    (("full", "vgg", "cifar10", "full"), "unknown model 'vgg'"),
    (("full", "alexnet", "mnist", "full"), "unknown dataset 'mnist'"),
    (("full", "alexnet", "cifar10", "fast"), "unknown profile 'fast'.*smoke"),
])
def test_unknown_names_are_rejected_with_the_choices(args, match):
    with pytest.raises(config.ConfigError, match=match):
        config.resolve(*args)


def test_override_of_a_missing_setting_names_it():
    with pytest.raises(config.ConfigError, match="'lr_head' is not a setting of the frozen_svm regime"):
        config.resolve("frozen_svm", "alexnet", "cifar10", "full", {"lr_head": 1.0})


@pytest.mark.parametrize(("text", "value"), [
    ("1e-3", 1e-3), ("0.01", 0.01), ("12", 12), ("false", False), ("null", None), ("balanced", "balanced"),
    ("[linear_svm, mlp]", ["linear_svm", "mlp"]),
])
def test_command_line_values_parse_as_yaml(text, value):
    assert config.parse_value(text) == value


def test_every_profile_has_a_description():
    assert set(config.profiles()) == {"smoke", "quick", "full"}
    assert all(config.profiles().values())


@pytest.mark.parametrize("regime", config.NOTEBOOK_REGIMES)
def test_a_regime_has_the_same_settings_for_every_model_and_dataset(regime):
    every = config.settings(regime)
    for model in config.MODELS:
        for dataset in config.DATASETS:
            assert set(config.resolve(regime, model, dataset, "quick")) - set(config.IDENTITY) == every
    assert every <= config.all_keys()


def test_every_regime_with_an_optimizer_takes_momentum():
    # the full fine-tune of DeiT runs AdamW, yet `-p optimizer sgd -p momentum 0.8` must apply to it too
    for regime in ("linear_probe", "partial", "full"):
        cfg = config.resolve(regime, "deit_base", "ferplus", "full", {"optimizer": "sgd", "momentum": 0.8})
        assert (cfg["optimizer"], cfg["momentum"]) == ("sgd", 0.8)
        with pytest.raises(config.ConfigError, match="momentum=0.8 would not be applied, so it is refused: momentum "
                                                     "is SGD's, adam and adamw have none; this run has optimizer"):
            config.resolve(regime, "deit_base", "ferplus", "full", {"momentum": 0.8})


@pytest.mark.parametrize("name, value, run, fix", [
    ("momentum", 0.5, ("linear_probe", "alexnet", "cifar10"), "add -p optimizer sgd"),
    ("warmup_frac", 0.1, ("linear_probe", "alexnet", "ferplus"), "add -p scheduler cosine"),  # plateau there
    ("max_iter", 50, ("frozen_svm", "alexnet", "cifar10"), None),  # applied: a linear SVM
    ("label_rule", "argmax", ("frozen_svm", "alexnet", "cifar10"), "select ferplus runs with --only"),
    ("val_source", "official", ("full", "deit_base", "cifar10"), "select ferplus runs with --only"),
])
def test_a_setting_the_selected_runs_would_not_apply_is_refused_and_given_only_where_it_applies(name, value, run, fix):
    if fix is None:
        assert config.check_overrides({name: value}, [run], "smoke")[run] == {name: value}
        with pytest.raises(config.ConfigError, match="none of the selected runs would apply it.*kernel rbf"):
            config.check_overrides({name: value, "kernel": "rbf"}, [run], "smoke")
        return
    with pytest.raises(config.ConfigError, match=f"-p {name}: none of the selected runs would apply it.*{fix}"):
        config.check_overrides({name: value}, [run], "smoke")
    # beside a run that applies it, it goes to that run only, and the runner says which runs do not get it
    other = {"momentum": ("full", "alexnet", "cifar10"), "warmup_frac": ("linear_probe", "deit_base", "ferplus"),
             "label_rule": ("frozen_svm", "alexnet", "ferplus"), "val_source": ("full", "deit_base", "ferplus")}[name]
    per_run = config.check_overrides({name: value}, [run, other], "smoke")
    assert name not in per_run[run] and per_run[other][name] == value
    specs = [runner.RunSpec(d, m, r) for r, m, d in (run, other)]
    (note,) = runner._unapplied_notes({name: value}, specs, per_run)
    assert note.startswith(f"note: -p {name} is not given to {specs[0].key}, which would not apply it")


def test_a_setting_given_for_some_runs_of_a_regime_only_is_a_config_error(monkeypatch):
    data = copy.deepcopy(config._load())
    data["regimes"]["full"]["alexnet/cifar10"]["nesterov"] = True
    monkeypatch.setattr(config, "_load", lambda: data)
    with pytest.raises(config.ConfigError, match=r"the full regime has no 'nesterov' for alexnet/ferplus.*"
                                                 r"regimes\.full\.all"):
        config.settings("full")


def test_the_validation_split_is_fixed_not_a_setting():
    # data.load_dataset always holds out a stratified 20% of train: a val_fraction setting would be ignored
    assert "val_fraction" not in config.all_keys()


def test_a_runs_own_settings_replayed_as_overrides_are_accepted_though_some_are_not_applied():
    # the classroom pack and the book replay a run's whole params.json: its profile values include momentum on
    # AdamW runs and label_rule none on CIFAR-10, which change nothing; a changed value is still refused
    for regime, model, dataset in (("linear_probe", "alexnet", "cifar10"), ("full", "deit_base", "cifar10")):
        cfg = config.resolve(regime, model, dataset, "smoke")
        replayed = {k: v for k, v in cfg.items() if k not in config.IDENTITY}
        assert config.resolve(regime, model, dataset, "smoke", replayed) == cfg
    with pytest.raises(config.ConfigError, match="label_rule='argmax' would not be applied"):
        config.resolve("linear_probe", "alexnet", "cifar10", "smoke", {"label_rule": "argmax"})
