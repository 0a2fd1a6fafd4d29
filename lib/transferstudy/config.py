"""Resolve one run's settings: the original study's values, the profile's overrides, then the user's.

Everything lives in ``profiles.yaml`` beside this module; see its header for the lookup order.
The names a regime notebook's ``parameters`` cell defines are the run's names (``run_names``) and
the regime's settings (``settings``), less ``NOT_IN_NOTEBOOK``; ``from_namespace`` collects them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

PROFILE_FILE = Path(__file__).with_name("profiles.yaml")
MODELS = ("alexnet", "deit_base")
DATASETS = ("cifar10", "ferplus")
NOTEBOOK_REGIMES = ("frozen_svm", "linear_probe", "partial", "full", "classical")
WILDCARDS = ("all", "common")
IDENTITY = ("regime", "model", "dataset", "profile")  # what resolve adds to every run's settings
# Which run and where, in every regime notebook; not settings.
RUN_NAMES = ("model", "dataset", "profile", "data_dir", "output_dir", "cache_dir")
SOURCE_NAMES = {"classical": ("source_dir",)}  # the run folder of the fine-tune whose model it reads

# Settings a regime has (every regime has the `common` ones) but never reads, so its notebook's
# parameters cell leaves them out; an override of one is accepted (a `-p` for the whole matrix)
# and the run says it has no effect.
NOT_IN_NOTEBOOK: dict[str, dict[str, str]] = {
    "frozen_svm": {
        "batch_size": "the frozen SVM trains no network; its one pass through the backbone uses eval_batch_size",
        "micro_batch_size": "the frozen SVM trains no network",
    },
    "linear_probe": {
        "n_embed_plot": "the linear probe keeps no embeddings for the book's figures (the SVM and the fine-tunes do)",
    },
    "classical": {
        "batch_size": "the classical regime trains no network; its pass through the fine-tune uses eval_batch_size",
        "micro_batch_size": "the classical regime trains no network",
        "n_embed_plot": "the classical regime keeps no embeddings for the book's figures (its fine-tune's run does)",
        "weights_path": "the classical regime loads its fine-tune's checkpoint (source_dir), not ImageNet weights",
    },
}


class ConfigError(ValueError):
    """A profile, regime or parameter name that does not exist."""


@cache
def _load() -> dict:
    with open(PROFILE_FILE) as fh:
        return yaml.safe_load(fh)


def profiles() -> dict[str, str]:
    """Profile name -> its one-line description."""
    return {name: " ".join(str(p.get("description", "")).split()) for name, p in _load()["profiles"].items()}


def _matching(section: dict, regime: str, model: str, dataset: str) -> list[dict]:
    """The entries of a section whose key applies to this run, most general first."""
    names = {regime, model, dataset}
    hits = []
    for key, values in section.items():
        if key == "description" or not isinstance(values, dict):
            continue
        parts = [] if key in WILDCARDS else key.split("/")
        if all(part in names for part in parts):
            hits.append((len(parts), values))
    return [values for _, values in sorted(hits, key=lambda hit: hit[0])]


def _check(name: str, allowed: tuple[str, ...], what: str) -> None:
    if name not in allowed:
        raise ConfigError(f"unknown {what} {name!r}; choose one of: {', '.join(allowed)}")


def resolve(regime: str, model: str, dataset: str, profile: str = "full",
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """All settings of one run, as a flat dict.

    ``overrides`` whose value is None are ignored (a notebook parameter left at None means
    "the profile's value"); an override naming a key this regime does not have is an error.
    """
    _check(regime, NOTEBOOK_REGIMES, "regime")
    _check(model, MODELS, "model")
    _check(dataset, DATASETS, "dataset")
    data = _load()
    _check(profile, tuple(data["profiles"]), "profile")
    cfg: dict[str, Any] = copy.deepcopy(data["common"])
    for layer in _matching(data["regimes"][regime], regime, model, dataset):
        cfg.update(copy.deepcopy(layer))
    for layer in _matching(data["profiles"][profile], regime, model, dataset):
        cfg.update({k: copy.deepcopy(v) for k, v in layer.items() if k in cfg})
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in cfg:
            raise ConfigError(f"parameter {key!r} is not a setting of the {regime} regime; "
                              f"its settings are: {', '.join(sorted(cfg))}")
        cfg[key] = value
    cfg.update(regime=regime, model=model, dataset=dataset, profile=profile)
    return cfg


def all_keys() -> set[str]:
    """Every setting any regime has (used to reject typos in command-line overrides)."""
    keys = set(_load()["common"])
    for regime in NOTEBOOK_REGIMES:
        for values in _load()["regimes"][regime].values():
            keys.update(values)
    return keys | {"regime", "model", "dataset", "profile", "data_dir", "output_dir"}


def run_names(regime: str) -> tuple[str, ...]:
    """The names of ``regime``'s notebook that say which run and where (not settings)."""
    _check(regime, NOTEBOOK_REGIMES, "regime")
    return RUN_NAMES + SOURCE_NAMES.get(regime, ())


def settings(regime: str) -> set[str]:
    """Every setting of ``regime``: the names ``resolve`` takes as overrides, the same for every model and dataset."""
    _check(regime, NOTEBOOK_REGIMES, "regime")
    per_run = {(model, dataset): set(resolve(regime, model, dataset)) - set(IDENTITY)
               for model in MODELS for dataset in DATASETS}
    every = set().union(*per_run.values())
    for (model, dataset), keys in per_run.items():
        if keys != every:
            missing = sorted(every - keys)
            raise ConfigError(f"profiles.yaml: the {regime} regime has no {missing[0]!r} for {model}/{dataset}, "
                              f"while other runs of it do; give it a value in regimes.{regime}.all")
    return every


def notebook_names(regime: str) -> set[str]:
    """What the ``parameters`` cell of ``regime``'s notebook defines: its run names and the settings it reads."""
    return set(run_names(regime)) | (settings(regime) - set(NOT_IN_NOTEBOOK.get(regime, {})))


def from_namespace(regime: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of ``session.start`` from a notebook's namespace (its ``globals()``).

    Takes the run names (``run_names``) and, as ``overrides``, every setting of ``regime`` found there,
    so a parameter written once in the ``parameters`` cell (or injected by papermill) reaches the
    settings. A name config knows that is not one of this regime's (another regime's setting, say)
    is an error rather than ignored.
    """
    names = run_names(regime)
    own = settings(regime)
    known = all_keys() | set(RUN_NAMES) | {name for extra in SOURCE_NAMES.values() for name in extra}
    foreign = sorted(name for name in namespace if name in known and name not in names and name not in own)
    if foreign:
        name = foreign[0]
        raise ConfigError(f"notebook parameter {name}={namespace[name]!r} is not a parameter of the {regime} "
                          f"regime, so it would have no effect; remove it (from the parameters cell or -p). "
                          f"The {regime} regime's parameters are: {', '.join(sorted(set(names) | own))}")
    for name in ("model", "dataset"):
        if namespace.get(name) is None:
            raise ConfigError(f"the notebook defines no {name}; its parameters cell must set {name} = one of "
                              f"{', '.join(MODELS if name == 'model' else DATASETS)}")
    args = {name: namespace.get(name) for name in names}
    args["overrides"] = {name: namespace[name] for name in sorted(own) if name in namespace}
    return args


def parse_value(text: str) -> Any:
    """A command-line value as YAML reads it: 1e-3 -> float, false -> bool, null -> None, [a, b] -> list."""
    value = yaml.safe_load(text)
    # YAML 1.1 reads "1e-3" (no dot) as a string; take it as the number it is.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
