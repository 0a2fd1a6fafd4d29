"""Resolve one run's settings: the study's values, the profile's overrides, then the user's.

Everything lives in ``profiles.yaml`` beside this module; see its header for the lookup order.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml

PROFILE_FILE = Path(__file__).with_name("profiles.yaml")
MODELS = ("alexnet", "deit_base")
DATASETS = ("cifar10", "ferplus")
NOTEBOOK_REGIMES = ("frozen_svm", "linear_probe", "partial", "full", "classical")
WILDCARDS = ("all", "common")


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
    for layer in _matching(data["study"][regime], regime, model, dataset):
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
        for values in _load()["study"][regime].values():
            keys.update(values)
    return keys | {"regime", "model", "dataset", "profile", "data_dir", "output_dir"}


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
