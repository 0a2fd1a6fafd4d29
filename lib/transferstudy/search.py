"""Hyperparameter search on Optuna: the author's grids, each trial one `transferstudy run` of a notebook.

A worker (``transferstudy search`` or ``python -m transferstudy.search``) opens the study in its
storage: by default a SQLite file in the search's output folder (no server); with
``--storage postgresql://...`` any number of workers on any number of machines join one study.
Each trial is :func:`transferstudy.runner.execute` with the trial's parameters as overrides, into
``<output>/trials/<number>/<profile>/<dataset>/<model>/<regime>/``: a run folder like any other, with
``results.csv`` beside it. The trials share one feature cache, ``<output>/cache``.

Pruning: the worker names the trial in the ``TRANSFERSTUDY_TRIAL`` environment variable that the
notebook's kernel inherits; there :meth:`transferstudy.session.Session.fit` gets a
:class:`~transferstudy.trials.TrialReporter` (:mod:`transferstudy.trials`) that reports each epoch's validation accuracy to the
trial in the storage and stops training when the pruner says so. The run then finishes as usual
(evaluation, records) with ``pruned_epoch`` in its ``meta.json``, and the trial is marked pruned.

``--trials N`` is the number of trials the study should finish (complete, pruned, or failed with an
error in the notebook). Workers heartbeat their running trial; a trial whose worker died is marked
failed by the next worker and queued again with the same parameters, so none is lost, and a trial
numbered beyond the N-th live one is never run (the study holds exactly N finished trials).
Every worker writes the summary when it leaves: ``trials.csv``, ``importances.csv``,
``best_params.yaml`` (a profile entry and the ``transferstudy run`` command that re-runs it),
``summary.json``, and ``report.ipynb`` (notebooks/06_search.ipynb drawing them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

with warnings.catch_warnings():  # optuna imports tqdm.auto, which warns in a kernel without ipywidgets
    warnings.simplefilter("ignore")
    import optuna
    from optuna.trial import TrialState

from . import config, runner
from .trials import PRUNERS, TRIAL_ENV, SearchError, make_pruner, open_storage
from .report.store import read_run, write_table
from .results import atomic_write_bytes, read_json, write_json

SPACE_FILE = Path(__file__).with_name("searchspaces.yaml")
REPORT_NOTEBOOK = runner.NOTEBOOK_DIR / "06_search.ipynb"
OBJECTIVE = "val_accuracy"  # maximised; the test split is only read, never searched on
SEARCH_REGIMES = ("frozen_svm", "linear_probe", "partial", "full")
POLL_S = 5.0


class TrialFailed(RuntimeError):
    """The trial's notebook failed; the trial counts as finished (failed) and the search goes on."""


class SurplusTrial(RuntimeError):
    """Another worker already started the study's last trial; this one is not run."""


# --- the search space -----------------------------------------------------------------------


def load_space(regime: str, model: str, dataset: str, path: str | Path | None = None) -> dict[str, list]:
    """The grids for one run, from ``searchspaces.yaml`` then ``path`` (same layout or a flat mapping)."""
    if regime not in SEARCH_REGIMES:
        raise SearchError(f"regime {regime!r} has no search space; choose one of {', '.join(SEARCH_REGIMES)}")
    space: dict[str, list] = {}
    for source in [SPACE_FILE] + ([Path(path)] if path else []):
        if not source.is_file():
            raise SearchError(f"--space {source}: no such file; give a YAML file of {{setting: [choices]}}")
        data = yaml.safe_load(source.read_text()) or {}
        if not isinstance(data, dict):
            raise SearchError(f"{source}: expected a mapping of regimes or of settings to lists of choices")
        layered = regime in data or any(r in data for r in SEARCH_REGIMES)
        layers = config._matching(data.get(regime, {}), regime, model, dataset) if layered else [data]
        for layer in layers:
            for key, choices in layer.items():
                if choices is None:
                    space.pop(key, None)
                elif not isinstance(choices, list) or not choices:
                    raise SearchError(f"{source}: {key} must be a non-empty list of choices, got {choices!r}")
                else:
                    space[key] = copy.deepcopy(choices)
    return space


def check_space(space: dict[str, list], regime: str, model: str, dataset: str, profile: str,
                fixed: dict[str, Any]) -> dict[str, list]:
    """``space`` less the settings pinned by ``fixed``; every choice checked against the regime's settings."""
    settings = config.resolve(regime, model, dataset, profile, fixed)
    space = {k: v for k, v in space.items() if not _keys(k, v) & set(fixed)}
    for name, choices in space.items():
        for choice in choices:
            for key, value in (choice.items() if isinstance(choice, dict) else [(name, choice)]):
                if key not in settings:
                    raise SearchError(f"search space: {key!r} is not a setting of the {regime} regime "
                                      f"(see {SPACE_FILE.name}); its settings: {', '.join(sorted(settings))}")
                if value is None and settings[key] is not None:
                    raise SearchError(f"search space: {key}: null cannot be a choice here, since a null override "
                                      f"keeps the profile's value ({settings[key]!r}); name the value instead")
    return space


def _keys(name: str, choices: list) -> set[str]:
    return set().union(*(set(c) for c in choices)) if isinstance(choices[0], dict) else {name}


def _label(choice: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in choice.items())


def suggest(trial: optuna.trial.BaseTrial, space: dict[str, list]) -> dict[str, Any]:
    """The trial's settings: one choice per grid; a grid of mappings is suggested by label and expanded."""
    overrides: dict[str, Any] = {}
    for name, choices in space.items():
        if isinstance(choices[0], dict):
            labels = {_label(c): c for c in choices}
            overrides.update(labels[trial.suggest_categorical(name, list(labels))])
        else:
            overrides[name] = trial.suggest_categorical(name, choices)
    return overrides


# --- the worker ----------------------------------------------------------------------------


def _counted(t: optuna.trial.FrozenTrial) -> bool:
    """Finished and counting towards ``--trials``: a lost worker's or a surplus trial does not."""
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and "error" in t.user_attrs)


def _live(t: optuna.trial.FrozenTrial) -> bool:
    return _counted(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)


def default_study_name(dataset: str, model: str, regime: str, profile: str) -> str:
    return f"{dataset}-{model}-{regime}-{profile}"


def search(*, model: str, dataset: str, regime: str, profile: str, n_trials: int, data_root: str | Path,
           runs_root: str | Path, storage: str | None = None, study_name: str | None = None,
           fixed: dict[str, Any] | None = None, space_file: str | Path | None = None, pruner: str = "median",
           heartbeat: int = 30, report: bool = True, log: Callable[[str], Any] = print) -> Path:
    """Join (or create) the study and run trials until it has ``n_trials`` finished ones; returns the output folder.

    The output folder is ``<runs_root>/search/<study_name>``; the default storage a SQLite file in it.
    """
    if n_trials < 1:
        raise SearchError(f"--trials must be >= 1, got {n_trials}")
    fixed = dict(fixed or {})
    grids = load_space(regime, model, dataset, space_file)
    run_key = (regime, model, dataset)
    config.check_overrides(fixed, [run_key], profile)  # the check `transferstudy run` makes, before anything starts
    space = check_space(grids, regime, model, dataset, profile, fixed)
    for name, choices in space.items():  # and every choice of the grids: a trial is a run like any other
        for choice in choices:
            config.check_overrides(choice if isinstance(choice, dict) else {name: choice}, [run_key], profile)
    if not space:
        raise SearchError(f"nothing to search for {dataset}/{model}/{regime}: every setting of its grid is pinned")
    make_pruner(pruner)
    data_dir = Path(data_root) / dataset
    if not data_dir.is_dir():
        raise SearchError(f"--data-root {data_root}: no {dataset}/ folder in it (run `make data`, or point "
                          f"--data-root at the folder holding cifar10/ and ferplus/)")
    study_name = study_name or default_study_name(dataset, model, regime, profile)
    output = Path(runs_root) / "search" / study_name
    output.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(output / 'study.db').resolve()}"
    study = optuna.create_study(study_name=study_name, storage=open_storage(url, heartbeat), direction="maximize",
                                pruner=make_pruner(pruner), load_if_exists=True)
    run = {"dataset": dataset, "model": model, "regime": regime, "profile": profile}
    if study.user_attrs.setdefault("run", run) != run:
        raise SearchError(f"study {study_name!r} searches {study.user_attrs['run']}, not {run}; "
                          f"give another --study-name")
    study.set_user_attr("run", run)
    spec = runner.RunSpec(dataset, model, regime)
    trial_env = {"storage": url, "study": study_name, "pruner": pruner}

    def objective(trial: optuna.Trial) -> float:
        before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and _live(t)]
        if len(before) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"the study already has {n_trials} trials finished or running")
        overrides = {**fixed, **suggest(trial, space)}
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("overrides", overrides)
        trial_root = output / "trials" / f"{trial.number:04d}"
        _share_cache(trial_root, output / "cache")
        # the trial's id tells the notebook's kernel which trial to report its epochs to
        os.environ[TRIAL_ENV] = json.dumps({**trial_env, "trial_id": trial._trial_id})
        try:
            outcome = runner.execute(spec, profile, Path(data_root), trial_root, overrides, force=True)
        finally:
            os.environ.pop(TRIAL_ENV, None)
        write_table(trial_root / profile)
        trial.set_user_attr("run_dir", str(outcome.run_dir))
        trial.set_user_attr("wall_s", round(outcome.seconds, 1))
        if outcome.status != "ok":
            trial.set_user_attr("error", outcome.error)
            raise TrialFailed(f"trial {trial.number}: {outcome.error}")
        run = read_run(outcome.run_dir)
        meta = run.meta
        trial.set_user_attr("test_accuracy", run.test["accuracy"])
        trial.set_user_attr("epochs_run", meta.get("epochs_run"))
        value = run.val["accuracy"]
        trial.set_user_attr(OBJECTIVE, value)
        if meta.get("pruned_epoch") is not None:
            trial.set_user_attr("pruned_epoch", meta["pruned_epoch"])
            raise optuna.TrialPruned(f"pruned after epoch {meta['pruned_epoch']}")
        return value

    log(f"study {study_name!r} in {_safe_url(url)}: {n_trials} trials of {spec.key} ({profile}), "
        f"searching {', '.join(space)}; output {output}")
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        if sum(map(_counted, trials)) >= n_trials:
            break
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if sum(map(_live, trials)) >= n_trials and not waiting:
            time.sleep(POLL_S)  # the last trials run on other workers; wait, in case one of them dies
            continue
        study.optimize(objective, n_trials=1, catch=(TrialFailed, SurplusTrial))
    write_summary(study, output, data_root)
    if report:
        _write_report(output)
    return output


def _share_cache(trial_root: Path, cache: Path) -> None:
    """Point the trial's runs root's feature cache (``<runs root>/.cache``) at the search's shared one."""
    cache.mkdir(parents=True, exist_ok=True)
    trial_root.mkdir(parents=True, exist_ok=True)
    link = trial_root / ".cache"
    if not link.is_symlink():
        link.symlink_to(cache.resolve(), target_is_directory=True)


def _safe_url(url: str) -> str:
    """The storage URL without its password."""
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    return head.rsplit(":", 1)[0] + ":***@" + tail


# --- the summary ---------------------------------------------------------------------------


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, value, parameters, pruned epoch, test accuracy, worker, run folder."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        rows.append({"number": t.number, "state": t.state.name.lower(), OBJECTIVE: t.value,
                     **{f"param_{k}": v for k, v in t.params.items()},
                     "pruned_epoch": attrs.get("pruned_epoch"), "epochs_run": attrs.get("epochs_run"),
                     "test_accuracy": attrs.get("test_accuracy"), "wall_s": attrs.get("wall_s"),
                     "retry_of": t.system_attrs.get("failed_trial"), "worker": attrs.get("worker"),
                     "surplus": bool(attrs.get("surplus")), "error": attrs.get("error"),
                     "run_dir": attrs.get("run_dir"), "reported": json.dumps(t.intermediate_values),
                     "completed": t.datetime_complete.isoformat() if t.datetime_complete else None})
    return pd.DataFrame(rows)


def write_summary(study: optuna.Study, output: Path, data_root: str | Path) -> dict[str, Any]:
    """Write trials.csv, importances.csv, best_params.yaml and summary.json into ``output``."""
    run = study.user_attrs["run"]
    table = trials_table(study)
    atomic_write_bytes(output / "trials.csv", table.to_csv(index=False).encode())
    complete = [t for t in study.get_trials(deepcopy=False)  # run by a search (not added by hand)
                if t.state == TrialState.COMPLETE and "overrides" in t.user_attrs]
    varied = [k for k in (complete[0].params if complete else {})
              if all(k in t.params for t in complete) and len({str(t.params[k]) for t in complete}) > 1]
    importances = optuna.importance.get_param_importances(study, params=varied) if varied else {}
    atomic_write_bytes(output / "importances.csv", pd.DataFrame(
        {"param": list(importances), "importance": list(importances.values())}).to_csv(index=False).encode())
    summary: dict[str, Any] = {"study": study.study_name, **run, "objective": OBJECTIVE,
                               "states": {s.name.lower(): int((table["state"] == s.name.lower()).sum())
                                          for s in TrialState} if len(table) else {}}
    if complete:
        best = max(complete, key=lambda t: t.value)
        overrides = best.user_attrs["overrides"]
        args = ["run", "--profile", run["profile"], "--data-root", str(data_root),
                "--only", f"{run['dataset']}/{run['model']}/{run['regime']}"]
        for key, value in overrides.items():
            args += ["-p", key, _cli_value(value)]
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                       best_overrides=overrides, run_args=args,
                       run_command=shlex.join(["transferstudy", *args]))
        entry = {f"{run['regime']}/{run['model']}/{run['dataset']}": overrides}
        header = (f"# Best trial {best.number} of study {study.study_name!r}: {OBJECTIVE} {best.value:.4f} "
                  f"({len(complete)} complete trials).\n# Re-run it:\n#   {summary['run_command']}\n"
                  f"# or paste the entry below under a profile in lib/transferstudy/profiles.yaml.\n")
        atomic_write_bytes(output / "best_params.yaml",
                           (header + yaml.safe_dump(entry, sort_keys=False)).encode())
    write_json(output / "summary.json", summary)
    return summary


def _cli_value(value: Any) -> str:
    """A setting as `-p KEY VALUE` spells it (read back by config.parse_value)."""
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def load_best(output: str | Path) -> dict[str, Any]:
    """The best trial's overrides, from a search's ``best_params.yaml``."""
    path = Path(output) / "best_params.yaml"
    if not path.is_file():
        raise SearchError(f"{path}: no such file; the search has no complete trial yet")
    (entry,) = yaml.safe_load(path.read_text()).values()
    return entry


def _write_report(output: Path) -> None:
    """Execute notebooks/06_search.ipynb on the finished study's summary into ``<output>/report.ipynb``."""
    runner.execute_notebook(REPORT_NOTEBOOK, output / "report.ipynb", {"output": str(output.resolve()), "trials": 0},
                            output)


# --- command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `transferstudy search`."""
    parser.add_argument("--model", required=True, choices=config.MODELS)
    parser.add_argument("--dataset", required=True, choices=config.DATASETS)
    parser.add_argument("--regime", required=True, choices=SEARCH_REGIMES)
    parser.add_argument("--profile", default="quick", choices=list(config.profiles()),
                        help="the profile the trials start from (default: quick)")
    parser.add_argument("--trials", type=int, default=20,
                        help="finished trials the study should hold, over all its workers (default: 20)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="Optuna storage shared by the workers, e.g. postgresql://user:pw@host:5432/db "
                             "(default: a SQLite file study.db in the output folder)")
    parser.add_argument("--study-name", default=None,
                        help="default: <dataset>-<model>-<regime>-<profile>; workers of one study use the same")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="pin a setting for every trial, as for `transferstudy run` (repeatable)")
    parser.add_argument("--space", default=None, metavar="FILE",
                        help=f"YAML grids laid over lib/transferstudy/{SPACE_FILE.name}")
    parser.add_argument("--pruner", default="median", choices=PRUNERS,
                        help="stop hopeless trials on their per-epoch val accuracy (default: median)")
    parser.add_argument("--heartbeat", type=int, default=30, metavar="S",
                        help="seconds between a worker's heartbeats; a trial silent for 4 beats is failed "
                             "and queued again (default: 30)")
    parser.add_argument("--data-root", default="data", help="folder holding cifar10/ and ferplus/ (default: data)")
    parser.add_argument("--runs-dir", default="runs",
                        help="results store; the search writes to <runs-dir>/search/<study-name> (default: runs)")
    parser.add_argument("--no-report", action="store_true", help="skip executing the report notebook at the end")


def main(args: argparse.Namespace) -> int:
    """Run one worker; 0 when the study has a complete trial, 1 otherwise."""
    fixed = {key: config.parse_value(value) for key, value in args.param}
    output = search(model=args.model, dataset=args.dataset, regime=args.regime, profile=args.profile,
                    n_trials=args.trials, data_root=args.data_root, runs_root=args.runs_dir,
                    storage=args.storage, study_name=args.study_name, fixed=fixed, space_file=args.space,
                    pruner=args.pruner, heartbeat=args.heartbeat, report=not args.no_report)
    summary = read_json(output / "summary.json")
    print(f"trials: {summary['states']}; summary in {output}")
    if "run_command" not in summary:
        print("no trial completed; see trials.csv for the errors", file=sys.stderr)
        return 1
    print(f"best: trial {summary['best_trial']}, {OBJECTIVE} {summary['best_value']:.4f}\n"
          f"re-run it: {summary['run_command']}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m transferstudy.search", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    try:
        sys.exit(main(_parser.parse_args()))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"search: error: {exc}", file=sys.stderr)
        sys.exit(2)
