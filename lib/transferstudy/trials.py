"""The link between a running notebook and its Optuna trial: storage, pruner, per-epoch reporting.

Kept apart from :mod:`transferstudy.search` so that a notebook's training loop
(:meth:`transferstudy.session.Session.fit`) depends only on this small module, and only loads
Optuna when it runs as a search trial (``$TRANSFERSTUDY_TRIAL`` set by the search worker).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

TRIAL_ENV = "TRANSFERSTUDY_TRIAL"
PRUNERS = ("median", "halving", "none")


class SearchError(ValueError):
    """A bad search space, regime or storage."""


def _optuna():
    """Optuna, imported on first use (it imports tqdm.auto, which warns in a kernel without ipywidgets)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import optuna
    return optuna


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """median: below the median of finished trials at the same epoch (after 2 trials);
    halving: asynchronous successive halving over epochs; none: never prune."""
    optuna = _optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SearchError(f"--pruner {name!r} is unknown; choose one of {', '.join(PRUNERS)}")


def open_storage(url: str, heartbeat: int | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage (sqlite:///FILE or postgresql://...); with ``heartbeat`` seconds, a dead worker's
    trial is failed after 4 missed beats and queued again (once) with the same parameters."""
    import sqlalchemy

    optuna = _optuna()
    if not url.startswith(("sqlite:///", "postgresql://", "postgresql+", "mysql")):
        raise SearchError(f"--storage {url!r}: give sqlite:///PATH or postgresql://user@host:port/db")
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat options are experimental
        kwargs: dict[str, Any] = {}
        if heartbeat is not None:
            kwargs = dict(heartbeat_interval=heartbeat, grace_period=4 * heartbeat,
                          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(1))
        for wait in (1.0, 2.0):  # workers starting together may race to create the tables
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
            except sqlalchemy.exc.SQLAlchemyError:
                time.sleep(wait)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)


class TrialReporter:
    """Reports each epoch's val accuracy to a running trial; returns True when the pruner stops it."""

    def __init__(self, spec: dict[str, Any]):
        optuna = _optuna()
        study = optuna.load_study(study_name=spec["study"], storage=open_storage(spec["storage"]),
                                  pruner=make_pruner(spec["pruner"]))
        self.trial = optuna.trial.Trial(study, spec["trial_id"])
        self.pruned_epoch: int | None = None

    def __call__(self, epoch: int, row: dict[str, float]) -> bool:
        self.trial.report(row["val_acc"], epoch)
        if self.trial.should_prune():
            self.pruned_epoch = epoch
        return self.pruned_epoch is not None


def trial_reporter() -> TrialReporter | None:
    """The reporter of the search trial this process runs (``$TRANSFERSTUDY_TRIAL``), else None."""
    spec = os.environ.get(TRIAL_ENV)
    return TrialReporter(json.loads(spec)) if spec else None
