"""Resolve one run's settings: the original study's values, the profile's overrides, then the user's.

Everything lives in ``profiles.yaml`` beside this module; see its header for the lookup order.
The names a regime notebook's ``parameters`` cell defines are the run's names (``run_names``) and
the regime's settings (``settings``), less ``NOT_IN_NOTEBOOK``; ``from_namespace`` collects them.

``SCHEMA`` is the one table of what each setting may be (its type, its allowed values or range, what
null means for it); ``readers`` says which regimes read a setting. ``resolve`` checks every value
against it (the yaml's and the overrides'), so a notebook run by plain papermill stops in its first
cell, before any data is loaded; ``check_overrides`` checks ``-p`` settings once for a whole matrix
(``transferstudy run`` and ``search``).

Null on the command line and in the notebooks: an override of None (``-p KEY null``, a notebook
parameter left at None) keeps the profile's value. The word ``none`` sets a setting to no value where
the setting has one (``-p n_train none`` or ``-p n_train all``: the whole split; ``-p patience none``: no
early stopping); ``SCHEMA`` and the ``transferstudy run --help`` table say what it means for each.
"""

from __future__ import annotations

import copy
import difflib
import math
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

PROFILE_FILE = Path(__file__).with_name("profiles.yaml")
MODELS = ("alexnet", "deit_base")
DATASETS = ("cifar10", "ferplus")
NOTEBOOK_REGIMES = ("frozen_svm", "linear_probe", "partial", "full", "classical")
# The analyses of how the regimes reuse ImageNet features (Matsoukas et al. 2022): runs of the matrix like the
# regimes, one notebook each, read after the regimes they measure. profiles.yaml lists their settings under
# `analyses`, the regimes' under `regimes`. stats_transfer fine-tunes the whole network again from statistics
# transfer, with the full fine-tune's settings, to set against the full fine-tune's weight transfer.
ANALYSES = ("feature_reuse", "data_scarcity", "stats_transfer")
NOTEBOOKS = NOTEBOOK_REGIMES + ANALYSES  # every notebook of the matrix, in the order the runner runs them
# An analysis that trains as a regime does has that regime's settings (its profiles.yaml entries, and the profile
# entries that name the regime), less the ones it fixes itself (FIXED_SETTINGS): stats_transfer is the full
# fine-tune started from statistics transfer, so a `-p` that reaches the full fine-tune reaches it too, and init
# (always stats) is not one of its settings.
TRAINS_AS = {"stats_transfer": "full"}
FIXED_SETTINGS = {"stats_transfer": {"init": "stats"}}
WILDCARDS = ("all", "common")
IDENTITY = ("regime", "model", "dataset", "profile")  # what resolve adds to every run's settings
# Which run and where, in every regime notebook; not settings.
RUN_NAMES = ("model", "dataset", "profile", "data_dir", "output_dir", "cache_dir")
# Where a regime reads its inputs from besides the data, in its notebook only: the classical regime's fine-tune
# (its run folder), and the classroom pack that replaces the images and the backbone pass of the frozen
# regimes (`transferstudy classroom-pack`; papermill -p features_pack PACK, None: the images).
# The feature-reuse analysis reads the partial and the full fine-tune beside it, the statistics-transfer one the full.
SOURCE_NAMES = {"classical": ("source_dir",), "frozen_svm": ("features_pack",), "linear_probe": ("features_pack",),
                "feature_reuse": ("partial_dir", "full_dir"), "stats_transfer": ("full_dir",)}

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
    "feature_reuse": {
        "batch_size": "the feature-reuse analysis trains no network",
        "micro_batch_size": "the feature-reuse analysis trains no network",
        "n_embed_plot": "the feature-reuse analysis keeps its own representations (representations-*.npz)",
    },
    "data_scarcity": {
        "n_embed_plot": "the data-scarcity analysis keeps no embeddings for the book's figures",
    },
    "stats_transfer": {
        "n_embed_plot": "the statistics-transfer analysis keeps no embeddings for the book's figures",
    },
}


class ConfigError(ValueError):
    """A profile, regime or parameter name that does not exist, or a value a setting does not take."""


# --- the schema: what each setting may be ----------------------------------------------------------

NONE = "none"  # the word for "no value" (None in the settings), for a setting that has one


@dataclass(frozen=True)
class Setting:
    """What one setting may be; ``check_value`` applies it.

    ``kind``: int | float | bool | str | path | list. ``choices``: the allowed strings (of a str, or the
    items of a list). ``low``/``high``: the range, each end allowed unless ``*_open``. ``none``: what no
    value (None) means for it, or None where it must have a value; ``words`` spell no value too, besides
    ``none``. ``per_model`` narrows the choices per model; ``per_dataset_high`` sets ``high`` per dataset
    (with the reason shown in the message).
    """

    kind: str
    text: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: str | None = None
    words: tuple[str, ...] = ()
    per_model: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    per_dataset_high: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    exists: bool = False  # a path: the file must be there when the setting is checked


def _subset(split: str, cifar: tuple[int, str], fer: tuple[int, str]) -> Setting:
    return Setting("int", f"stratified subset of the {split} split (drawn after the 80/20 split)", low=1,
                   none=f"the whole {split} split", words=("all",), per_dataset_high={"cifar10": cifar, "ferplus": fer})


_FER_TRAIN = (28709, "FER2013's training images; fewer remain under a label rule, checked when the data loads")
SCHEMA: dict[str, Setting] = {
    # every regime
    "seed": Setting("int", "seed of the split, the initialisation and the shuffles", low=0, high=2**32 - 1),
    "image_size": Setting("int", "side of the network's input in pixels", low=63, high=1024,
                          per_model={"deit_base": (224,)}),
    "pretrained": Setting("bool", "ImageNet weights (true) or random initialisation (false)"),
    "init": Setting("str", "a fine-tune's starting weights: imagenet (weight transfer), stats (statistics transfer: "
                    "each tensor drawn from a normal with its ImageNet tensor's mean and std), random (the "
                    "architecture's own initialisation; pretrained false says the same)", ("imagenet", "stats", "random")),
    "weights_path": Setting("path", "an ImageNet state-dict file, for machines without network access",
                            none="ImageNet weights from torchvision / timm or their caches", exists=True),
    "n_train": _subset("train", (40000, "CIFAR-10's 50,000 training images less the 20% validation hold-out"),
                       _FER_TRAIN),
    "n_val": _subset("validation", (10000, "the 20% of CIFAR-10's training images held out"), _FER_TRAIN),
    "n_test": _subset("test", (10000, "CIFAR-10's test images"),
                      (7178, "FERPlus's Valid + Test images, the largest test split of its layouts")),
    "label_rule": Setting("str", "FERPlus: how the crowd votes become labels", ("majority", "argmax", "votes"),
                          none="the layout's own rule: majority for Microsoft's label.csv, argmax for class folders"),
    "val_source": Setting("str", "FERPlus: validation from a stratified 20% of train, or FER2013Valid",
                          ("split", "official")),
    "eval_mode": Setting("str", "evaluation resize: plain, or Resize 256 -> CenterCrop 224", ("resize", "resize_crop")),
    "eval_batch_size": Setting("int", "images per forward pass when embedding and scoring", low=1),
    "batch_size": Setting("int", "training batch (the global batch over all processes)", low=1),
    "micro_batch_size": Setting("int", "split each training batch into micro-batches of this size", low=1,
                                none="whole batches"),
    "n_embed_plot": Setting("int", "test embeddings kept for the book's PCA / t-SNE / UMAP figures", low=1),
    # frozen_svm (embedding: classical too)
    "embedding": Setting("str", "which features of the backbone", ("pooled", "penultimate", "cls"),
                         per_model={"alexnet": ("pooled", "penultimate"), "deit_base": ("cls",)}),
    "C": Setting("float", "SVM regularisation (smaller: stronger)", low=0, low_open=True),
    "class_weight": Setting("str", "SVM class weights", ("balanced",), none="every class weighs the same"),
    "max_iter": Setting("int", "iterations of the linear SVM's solver", low=1),
    "pca": Setting("int", "PCA components before the SVM", low=1, none="no PCA"),
    "kernel": Setting("str", "SVM kernel", ("linear", "rbf")),
    # the trained regimes
    "optimizer": Setting("str", "optimiser", ("adamw", "adam", "sgd")),
    "momentum": Setting("float", "SGD momentum (read with optimizer sgd)", low=0, high=1, high_open=True),
    "lr": Setting("float", "learning rate of the head", low=0, low_open=True),
    "lr_backbone": Setting("float", "learning rate of the unfrozen backbone layers", low=0, low_open=True),
    "lr_head": Setting("float", "learning rate of the head", low=0, low_open=True),
    "weight_decay": Setting("float", "weight decay", low=0),
    "scheduler": Setting("str", "learning-rate schedule", ("cosine", "plateau", "none")),
    "warmup_frac": Setting("float", "fraction of the steps spent warming up, with cosine", low=0, high=1,
                           high_open=True),
    "epochs": Setting("int", "training epochs", low=1),
    "patience": Setting("int", "early stopping after this many epochs without improvement", low=1,
                        none="no early stopping"),
    "monitor": Setting("str", "what picks the kept best-on-val checkpoint", ("val_loss", "val_acc")),
    "label_smoothing": Setting("float", "label smoothing of the loss", low=0, high=1, high_open=True),
    "augment": Setting("str", "training augmentation policy", ("none", "light", "cifar_full", "fer", "deit")),
    # classical
    "source_regime": Setting("str", "the fine-tune whose model gives the embeddings", ("partial", "full")),
    "classifiers": Setting("list", "the classical classifiers to fit", ("linear_svm", "logistic_regression",
                           "rbf_svm_pca256", "sgd_hinge", "knn_pca128", "random_forest", "mlp")),
    "refit_on_trainval": Setting("bool", "also refit each classifier on train + val and score test"),
    # feature_reuse
    "n_boot": Setting("int", "bootstrap resamples of the test images for each CKA interval", low=1),
    "n_resilience": Setting("int", "test images scored with each unit restored or re-drawn (resilience)", low=4,
                            none="every test image of the run"),
    # data_scarcity
    "fractions": Setting("list", "fractions of the training split, nested stratified subsets", low=0, high=1,
                         low_open=True),
    "subset_seeds": Setting("int", "subset draws at each fraction below 1 (one draw of the whole split at 1)", low=1),
    "finetunes": Setting("list", "the fine-tunes trained at every fraction (the frozen SVM and the linear probe "
                         "always are)", ("partial", "full"), none="no fine-tune"),
    "finetune_seeds": Setting("int", "how many of the subset draws the fine-tunes train on", low=1),
}
_KIND_NAMES = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string",
               "path": "a file path", "list": "a list"}


def _inferred(value: Any) -> Setting:
    """The schema of a setting profiles.yaml has but SCHEMA does not list yet: its value's type."""
    for kind, types in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", list)):
        if isinstance(value, types):
            return Setting(kind, "(not in config.SCHEMA: checked by the type of its value in profiles.yaml)")
    return Setting("any", "(not in config.SCHEMA)", none="no value")


def schema(name: str, value: Any = None) -> Setting:
    """``name``'s entry of ``SCHEMA``; for a setting not listed there, the type of its yaml ``value``."""
    return SCHEMA[name] if name in SCHEMA else _inferred(value)


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) >= 1000 else f"{x:g}"


def allowed(name: str, model: str | None = None, dataset: str | None = None, setting: Setting | None = None) -> str:
    """What ``name`` takes, in words: the schema's type and range (for ``model`` / ``dataset`` when given)."""
    s = setting or schema(name)
    if s.per_model and model is None:
        text = "; ".join(f"{_allowed_value(s, m, dataset)}" + ("" if s.kind in ("int", "float") else f" for {m}")
                         for m in MODELS if m in s.per_model)
        others = [m for m in MODELS if m not in s.per_model]
        if others:
            text += f"; {_allowed_value(s, others[0], dataset)} for {', '.join(others)}"
    elif s.per_dataset_high and dataset is None:
        text = _allowed_value(s, model, None, bound=False) + " and at most " + "; ".join(
            f"{_num(high)} for {d} ({why})" for d, (high, why) in s.per_dataset_high.items())
    else:
        text = _allowed_value(s, model, dataset)
    if s.none is not None:
        text += f", or {' / '.join((NONE, *s.words))} ({s.none})"
    return text


def _allowed_value(s: Setting, model: str | None, dataset: str | None, bound: bool = True) -> str:
    if s.kind in ("str", "list"):
        choices = _choices(s, model)
        if s.kind == "str" and choices:
            return f"one of: {', '.join(map(str, choices))}"
        if choices:
            return f"a list of one or more of: {', '.join(choices)}, e.g. [{', '.join(choices[:2])}]"
        if s.kind == "list" and (s.low is not None or s.high is not None):
            item = Setting("float", s.text, low=s.low, high=s.high, low_open=s.low_open, high_open=s.high_open)
            return f"a list of distinct numbers, each {_allowed_value(item, model, dataset).removeprefix('a number ')}"
        return _KIND_NAMES[s.kind]
    if s.kind in ("int", "float") and model in s.per_model:
        return " or ".join(map(str, s.per_model[model])) + f" for {model}"
    if s.kind in ("int", "float"):
        high, why = _high(s, dataset) if bound else (None, "")
        kind = _KIND_NAMES[s.kind]
        if s.low is not None and high is not None and not s.low_open and not s.high_open:
            text = f"{kind} from {_num(s.low)} to {_num(high)}"
        else:
            ends = ([f"{'>' if s.low_open else '>='} {_num(s.low)}"] if s.low is not None else []) + \
                   ([f"{'<' if s.high_open else '<='} {_num(high)}"] if high is not None else [])
            text = f"{kind} {' and '.join(ends)}".strip()
        return f"{text} ({why})" if why else text
    if s.kind == "path" and s.exists:
        return "the path of an existing file"
    return _KIND_NAMES.get(s.kind, "any value")


def _choices(s: Setting, model: str | None) -> tuple[Any, ...]:
    if model is not None and model in s.per_model:
        return s.per_model[model]
    return s.choices


def _high(s: Setting, dataset: str | None) -> tuple[float | None, str]:
    if dataset in s.per_dataset_high:
        high, why = s.per_dataset_high[dataset]
        return high, f"{dataset}: {why}"
    if s.per_dataset_high:
        return max(h for h, _ in s.per_dataset_high.values()), "the largest of the datasets"
    return s.high, ""


def _is_null_text(value: Any) -> bool:
    """A string that YAML reads as null (``null``, ``~``, ``Null``): how papermill's ``-p KEY null`` arrives."""
    return isinstance(value, str) and value.strip() in ("null", "Null", "NULL", "~")


def check_value(name: str, value: Any, model: str | None = None, dataset: str | None = None,
                setting: Setting | None = None) -> Any:
    """``value`` as setting ``name`` takes it (``none`` -> None, ``"false"`` -> False, 10.0 -> 10), or ConfigError.

    A string for a setting that is not a string (from papermill's ``-p``, or a shell) is read as YAML
    first, as the command line reads it. The message names the setting, the value and what is allowed.
    """
    s = setting or schema(name)
    given = value

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{name}={given!r}: {why}; {name} takes {allowed(name, model, dataset, s)}")

    if isinstance(value, str) and s.none is not None and value.strip() in (NONE, *s.words):
        return None
    if value is None:
        if s.none is None:
            raise bad("this setting needs a value")
        return None
    if s.kind == "any":
        return value
    if isinstance(value, str) and s.kind in ("int", "float", "bool", "list"):
        value = parse_value(value)
        if value is None:
            raise bad("a null value") if s.none is None else bad("write none for no value")
    if s.kind == "bool":
        if not isinstance(value, bool):
            raise bad("not a boolean")
        return value
    if s.kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"not {_KIND_NAMES[s.kind]}")
        if not math.isfinite(value):
            raise bad("not a finite number")
        if s.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise bad("not a whole number")
            value = int(value)
        else:
            value = float(value)
        if model in s.per_model:
            if value not in s.per_model[model]:
                raise bad(f"{model} takes no other value")
            return value
        high, _ = _high(s, dataset)
        if s.low is not None and (value <= s.low if s.low_open else value < s.low):
            raise bad("too small")
        if high is not None and (value >= high if s.high_open else value > high):
            raise bad("too large")
        return value
    if s.kind == "path":
        if hasattr(value, "__fspath__"):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise bad("not a file path")
        if s.exists and not Path(value).expanduser().is_file():
            raise bad(f"no such file ({Path(value).expanduser().resolve()}); check the path")
        return value
    if s.kind == "str":
        if not isinstance(value, str):
            raise bad("not a string")
        choices = _choices(s, model)
        if choices and value not in choices:
            known = model is not None and model in s.per_model and value in s.choices
            raise bad(f"not a choice for {model}" if known else "not a choice")
        return value
    if s.kind == "list":
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or not value:
            raise bad("not a non-empty list")
        if s.low is not None or s.high is not None:  # a list of numbers, each in the range
            item = Setting("float", s.text, low=s.low, high=s.high, low_open=s.low_open, high_open=s.high_open)
            try:
                value = [check_value(name, v, model, dataset, item) for v in value]
            except ConfigError:
                raise bad("each item must be " + _allowed_value(item, model, dataset)) from None
            if len(set(value)) != len(value):
                raise bad("a value given twice")
        if s.choices:
            unknown = [v for v in value if v not in s.choices]
            if unknown:
                raise bad(f"{unknown[0]!r} is not a choice")
            if len(set(value)) != len(value):
                raise bad("a name given twice")
        return value
    raise bad(f"config.SCHEMA has an unknown kind {s.kind!r}")


def readers(name: str) -> tuple[str, ...]:
    """The regimes and analyses whose notebooks read setting ``name`` (their parameters cells define it)."""
    return tuple(regime for regime in NOTEBOOKS
                 if name in settings(regime) and name not in NOT_IN_NOTEBOOK.get(regime, {}))


def settings_help(width: int = 88) -> str:
    """Every setting with what it takes and the regimes that read it: the table of ``transferstudy run --help``."""
    lines = []
    for name in sorted(all_keys(), key=str.lower):
        who = readers(name)
        regimes = "every notebook" if len(who) == len(NOTEBOOKS) else ", ".join(who) or "no notebook"
        lines.append(textwrap.fill(f"{name} ({schema(name).text}): {allowed(name)} [{regimes}]", width,
                                   initial_indent="  ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


@cache
def _load() -> dict:
    with open(PROFILE_FILE) as fh:
        return yaml.safe_load(fh)


def profiles() -> dict[str, str]:
    """Profile name -> its one-line description."""
    return {name: " ".join(str(p.get("description", "")).split()) for name, p in _load()["profiles"].items()}


def _matching(section: dict, regime: str, model: str, dataset: str) -> list[dict]:
    """The entries of a section whose key applies to this run, most general first."""
    names = {regime, model, dataset, TRAINS_AS.get(regime, regime)}
    hits = []
    for key, values in section.items():
        if key == "description" or not isinstance(values, dict):
            continue
        parts = [] if key in WILDCARDS else key.split("/")
        if all(part in names for part in parts):
            hits.append((len(parts), values))
    return [values for _, values in sorted(hits, key=lambda hit: hit[0])]


def _section(regime: str) -> dict:
    """profiles.yaml's entries of a regime (under ``regimes``) or of an analysis (under ``analyses``)."""
    data = _load()
    regime = TRAINS_AS.get(regime, regime)
    return data["analyses"][regime] if regime in ANALYSES else data["regimes"][regime]


def _check(name: str, allowed: tuple[str, ...], what: str) -> None:
    if name not in allowed:
        raise ConfigError(f"unknown {what} {name!r}; choose one of: {', '.join(allowed)}")


def resolve(regime: str, model: str, dataset: str, profile: str = "full",
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """All settings of one run, as a flat dict, each checked against ``SCHEMA``.

    ``overrides`` whose value is None (or the text null) are ignored: a notebook parameter left at None
    means "the profile's value". The word ``none`` sets no value where a setting has one
    (``check_value``). An override naming a key this regime does not have, and a value its setting does
    not take, are errors (ConfigError naming the parameter, the value and what is allowed).
    """
    _check(regime, NOTEBOOKS, "regime or analysis")
    _check(model, MODELS, "model")
    _check(dataset, DATASETS, "dataset")
    data = _load()
    _check(profile, tuple(data["profiles"]), "profile")
    cfg: dict[str, Any] = copy.deepcopy(data["common"])
    for layer in _matching(_section(regime), regime, model, dataset):
        cfg.update(copy.deepcopy(layer))
    for layer in _matching(data["profiles"][profile], regime, model, dataset):
        cfg.update({k: copy.deepcopy(v) for k, v in layer.items() if k in cfg})
    for key in FIXED_SETTINGS.get(regime, ()):
        del cfg[key]
    kinds = {key: schema(key, value) for key, value in cfg.items()}
    for key, value in cfg.items():
        try:
            cfg[key] = check_value(key, value, model, dataset, kinds[key])
        except ConfigError as exc:
            raise ConfigError(f"{PROFILE_FILE.name}, profile {profile}, run {dataset}/{model}/{regime}: {exc}") from None
    profile_values = dict(cfg)
    for key, value in (overrides or {}).items():
        if value is None or _is_null_text(value):
            continue
        if key not in cfg:
            raise ConfigError(f"parameter {key!r} is not a setting of the {regime} regime; "
                              f"its settings are: {', '.join(sorted(cfg))}")
        try:
            cfg[key] = check_value(key, value, model, dataset, kinds[key])
        except ConfigError as exc:
            raise ConfigError(f"parameter {exc}") from None
    for key, value in (overrides or {}).items():  # a changed value the run would not apply (the profile's own is
        changed = key in cfg and cfg[key] != profile_values[key]  # not applied there either, and changes nothing)
        if changed and (why := not_applied(key, {**cfg, "dataset": dataset})):
            on, values, _ = APPLIES[key]
            fix = f"leave {key} out" if on == "dataset" else f"set {on} to {values[0]} as well, or leave {key} out"
            raise ConfigError(f"parameter {key}={value!r} would not be applied, so it is refused: {why}; {fix}")
    if cfg["weights_path"] and (not cfg["pretrained"] or start_weights(cfg) == "random"):
        why = "pretrained is false" if not cfg["pretrained"] else "init='random'"
        raise ConfigError(f"{why}: the run starts from the architecture's own initialisation, so weights_path="
                          f"{cfg['weights_path']!r} would not be read: drop weights_path, or set pretrained true "
                          f"(init imagenet or stats) to start from it")
    if cfg.get("finetune_seeds") is not None and cfg["finetune_seeds"] > cfg["subset_seeds"]:
        raise ConfigError(f"finetune_seeds={cfg['finetune_seeds']} is more than subset_seeds={cfg['subset_seeds']}: "
                          f"the fine-tunes train on some of the subset draws, so there are only {cfg['subset_seeds']}; "
                          f"lower finetune_seeds or raise subset_seeds")
    cfg.update(regime=regime, model=model, dataset=dataset, profile=profile)
    return cfg


def start_weights(cfg: Mapping[str, Any]) -> str:
    """Where a run's backbone starts: ``imagenet``, ``stats`` or ``random``. ``pretrained`` says what the source
    network is (ImageNet's, or with ``pretrained: false`` the architecture's own random initialisation), ``init``
    how the run uses it: so ``pretrained: false`` is ``random``, except that ``stats`` still draws from the source's
    statistics (those of the random initialisation). An analysis that fixes ``init`` (``FIXED_SETTINGS``) starts as
    fixed; the other runs without ``init`` start from the source itself."""
    init = cfg.get("init", FIXED_SETTINGS.get(cfg.get("regime"), {}).get("init", "imagenet"))
    if init == "stats":
        return init
    return init if cfg["pretrained"] else "random"


def common_settings() -> set[str]:
    """The settings every regime and analysis has (profiles.yaml's ``common``)."""
    return set(_load()["common"])


def all_keys() -> set[str]:
    """Every setting any regime has (used to reject typos in command-line overrides).

    Settings only: the names that say which run and where (``IDENTITY``, ``RUN_NAMES``) are not settings
    and cannot be overridden.
    """
    keys = set(_load()["common"])
    for regime in NOTEBOOKS:
        for values in _section(regime).values():
            keys.update(values)
    return keys


def run_names(regime: str) -> tuple[str, ...]:
    """The names of ``regime``'s notebook that say which run and where (not settings)."""
    _check(regime, NOTEBOOKS, "regime or analysis")
    return RUN_NAMES + SOURCE_NAMES.get(regime, ())


def settings(regime: str) -> set[str]:
    """Every setting of ``regime``: the names ``resolve`` takes as overrides, the same for every model and dataset."""
    _check(regime, NOTEBOOKS, "regime or analysis")
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
    known = all_keys() | set(IDENTITY) | set(RUN_NAMES) | {name for extra in SOURCE_NAMES.values() for name in extra}
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


_RUN_NAME_HINTS = {
    "model": "choose the runs with --only DATASET/MODEL/REGIME, e.g. --only '*/deit_base/*'",
    "dataset": "choose the runs with --only DATASET/MODEL/REGIME, e.g. --only 'ferplus/*/*'",
    "regime": "choose the runs with --only DATASET/MODEL/REGIME, e.g. --only '*/*/full'",
    "profile": "choose the profile with --profile",
    "data_dir": "point --data-root at the folder holding cifar10/ and ferplus/",
    "output_dir": "choose the results store with --runs-dir; each run's folder is <runs-dir>/<profile>/<dataset>/<model>/<regime>",
    "cache_dir": "the feature cache is <runs-dir>/.cache",
    "source_dir": "the classical regime reads the fine-tune beside it in the results store; -p source_regime picks which",
    "features_pack": "a classroom pack replaces one notebook's images: give it to that notebook, e.g. papermill "
                     "notebooks/02_linear_probe.ipynb out.ipynb -p features_pack PACK -p model alexnet -p dataset "
                     "cifar10 -p profile quick (README, \"Classroom pack\")",
}

RunKey = tuple[str, str, str]  # (regime, model, dataset)


# Settings a run reads only when another setting has one of some values (or on one dataset): given where they do not
# apply they would be recorded and change nothing, so a run refuses them and `-p` gives them only to the runs that
# apply them (and says which do not).
APPLIES: dict[str, tuple[str, tuple[Any, ...], str]] = {
    "momentum": ("optimizer", ("sgd",), "momentum is SGD's, adam and adamw have none"),
    "warmup_frac": ("scheduler", ("cosine",), "only the cosine schedule warms up"),
    "max_iter": ("kernel", ("linear",), "it bounds the linear SVM's solver, and the RBF SVM runs to convergence"),
    "label_rule": ("dataset", ("ferplus",), "only FERPlus turns crowd votes into labels"),
    "val_source": ("dataset", ("ferplus",), "CIFAR-10's validation images are always a split of its training set"),
}


def not_applied(name: str, cfg: Mapping[str, Any]) -> str | None:
    """Why run settings ``cfg`` would not apply setting ``name`` (``APPLIES``), or None where they apply it."""
    if name not in APPLIES or name not in cfg:
        return None
    on, values, why = APPLIES[name]
    if cfg.get(on) in values:
        return None
    return f"{why}; this run has {on} {cfg.get(on)}"


def check_overrides(overrides: Mapping[str, Any], runs: Iterable[RunKey], profile: str) -> dict[RunKey, dict[str, Any]]:
    """Check ``-p`` overrides once for a set of runs, before any of them starts; what each run is to get.

    Refused, with every problem in one ConfigError (each named once, however many runs it concerns):
    a name that says which run (``model``, ``dataset``, ``regime``, ``profile``, the paths: they come
    from the run, not from ``-p``); a name no regime has; a setting no regime of ``runs`` reads; a value
    the setting does not take (``SCHEMA``, for each run's model and dataset); null where a run's profile
    value is not null (null keeps the profile's value, so it would change nothing: ``none`` asks for no
    value). Returns, per run, the overrides its notebook reads, each as ``check_value`` reads it, with
    no value spelled ``NONE`` (a notebook parameter of None would keep the profile's value).
    """
    runs = list(dict.fromkeys(runs))
    _check(profile, tuple(_load()["profiles"]), "profile")
    problems: list[str] = []
    per_run: dict[RunKey, dict[str, Any]] = {run: {} for run in runs}
    base: dict[RunKey, dict[str, Any]] = {}
    reads = {regime: notebook_names(regime) - set(run_names(regime)) for regime in {r for r, _, _ in runs}}
    settings_known = all_keys()
    run_words = set(IDENTITY) | set(RUN_NAMES) | {name for extra in SOURCE_NAMES.values() for name in extra}

    def add(message: str) -> None:
        if message not in problems:
            problems.append(message)

    for name, value in overrides.items():
        if name in run_words:
            add(f"-p {name}: {name} says which run this is, it is not a setting, so -p cannot change it; "
                f"{_RUN_NAME_HINTS.get(name, 'it comes from the run')}")
            continue
        if name not in settings_known:
            close = difflib.get_close_matches(name, sorted(settings_known), n=1)
            add(f"-p {name}: no notebook has this parameter{f' (did you mean {close[0]}?)' if close else ''}; "
                f"known parameters: {', '.join(sorted(settings_known))}")
            continue
        readers_here = [run for run in runs if name in reads[run[0]]]
        if not readers_here:
            selected = sorted({r for r, _, _ in runs}, key=NOTEBOOKS.index)
            why = "; ".join(f"{r}: {NOT_IN_NOTEBOOK[r][name]}" for r in selected if name in NOT_IN_NOTEBOOK.get(r, {}))
            add(f"-p {name}: no selected run reads it, so it would have no effect; {name} is read by "
                f"{', '.join(readers(name)) or 'no regime'}, the selected runs are {', '.join(selected)}"
                f"{f' ({why})' if why else ''}")
            continue
        for run in readers_here:
            if run not in base:
                base[run] = resolve(*run, profile)
        if value is None or _is_null_text(value):
            not_null = [run for run in readers_here if base[run][name] is not None]
            if not_null:  # where the profile's value is null already, null changes nothing and is not passed
                regime, model, dataset = not_null[0]
                current = base[not_null[0]][name]
                s = schema(name, current)
                instead = (f"for {s.none} write -p {name} {NONE}" + (f" (or {s.words[0]})" if s.words else "")
                           if s.none is not None else f"{name} takes {allowed(name, model, dataset, s)}")
                more = f" and {len(not_null) - 1} more of the selected runs" if len(not_null) > 1 else ""
                add(f"-p {name} null: null keeps the profile's value ({current!r} in the {profile} profile for "
                    f"{dataset}/{model}/{regime}{more}), so it would change nothing; {instead}; "
                    f"to keep the profile's value leave -p {name} out")
            continue
        for run in readers_here:
            regime, model, dataset = run
            try:
                checked = check_value(name, value, model, dataset, schema(name, base[run][name]))
            except ConfigError as exc:
                add(f"-p {exc}")
                continue
            per_run[run][name] = NONE if checked is None else checked
    for name in [n for n in overrides if n in APPLIES and any(n in per_run[run] for run in runs)]:
        given = [run for run in runs if name in per_run[run]]
        on, values, why = APPLIES[name]
        skipped: dict[RunKey, str] = {}  # run -> the value of ``on`` that keeps it from applying ``name``
        for run in given:
            try:
                cfg = resolve(*run, profile, {k: v for k, v in per_run[run].items() if k not in APPLIES})
            except ConfigError:
                continue  # its own problem is reported on its own
            if not_applied(name, cfg) is not None:
                skipped[run] = str(cfg.get(on))
                del per_run[run][name]
        if skipped and len(skipped) == len(given):
            add(f"-p {name}: none of the selected runs would apply it, so it would change nothing: {why}, and "
                f"the selected runs have {on} " + ", ".join(sorted(set(skipped.values())))
                + (f"; select {values[0]} runs with --only, or leave -p {name} out" if on == "dataset" else
                   f"; add -p {on} {values[0]}, select runs that have it, or leave -p {name} out"))
    if not problems:  # what resolve refuses of the settings together (one setting against another), up front too
        for run in runs:
            try:
                resolve(*run, profile, per_run[run])
            except ConfigError as exc:
                regime, model, dataset = run
                add(f"{dataset}/{model}/{regime}: {exc}")
    if problems:
        if len(problems) == 1:
            raise ConfigError(problems[0])
        raise ConfigError(f"{len(problems)} problems with the settings, nothing was run:\n" +
                          "\n".join(f"  {p}" for p in problems))
    return per_run


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
