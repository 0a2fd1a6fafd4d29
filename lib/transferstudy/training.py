"""Optimisers, schedules, the training loop and batched inference over in-memory splits.

A *split* is any object with ``.images`` (uint8 ``[N, C, H, W]``, or float32 ``[N, D]`` cached
features with an identity preprocess), ``.labels`` (int64 ``[N]``)
and ``.soft`` (float32 ``[N, K]`` vote distributions, or None). Batches are preprocessed on the
device by a :class:`~transferstudy.preprocess.Preprocessor`-like callable ``(uint8 batch, train)``.
On CUDA the loop uses pinned memory, non-blocking copies and fp16 autocast with a GradScaler;
on CPU it runs plain fp32. Under ``torch.distributed`` (torchrun, see :mod:`transferstudy.distributed`)
:func:`fit` trains a DistributedDataParallel copy, each rank on its shard of every global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau
from tqdm import tqdm  # plain bars: notebooks run under papermill, where widgets cannot render

from .results import atomic_write_bytes, file_digest, write_state_dict

Preprocess = Callable[[torch.Tensor, bool], torch.Tensor]
EpochCallback = Callable[[int, dict[str, float]], bool]
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "plateau", "none")
MONITORS = ("val_loss", "val_acc")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global RNGs."""
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int (the study used 42), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(groups: dict[str, list[nn.Parameter]], *, name: str = "adamw",
                   lr: float | dict[str, float], weight_decay: float = 0.0,
                   momentum: float = 0.9) -> Optimizer:
    """One optimizer with a parameter group per entry of ``groups`` (e.g. ``backbone``, ``head``).

    ``lr`` is one float for every group or a dict with one learning rate per group name
    (discriminative learning rates). Parameters with ``requires_grad=False`` are left out.
    Each param group keeps its name under ``"name"``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is unknown; choose one of {OPTIMIZERS}")
    if isinstance(lr, dict) and set(lr) != set(groups):
        raise ValueError(f"lr dict keys {sorted(lr)} must match the parameter groups {sorted(groups)} "
                         "(give one learning rate per group, or one float for all)")
    param_groups = []
    for group, params in groups.items():
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ValueError(f"parameter group {group!r} has no trainable parameters; "
                             "unfreeze them or leave the group out")
        param_groups.append({"params": trainable, "name": group,
                             "lr": float(lr[group] if isinstance(lr, dict) else lr)})
    if name == "sgd":
        return SGD(param_groups, lr=param_groups[0]["lr"], momentum=momentum, weight_decay=weight_decay)
    cls = AdamW if name == "adamw" else Adam
    return cls(param_groups, lr=param_groups[0]["lr"], weight_decay=weight_decay)


def make_scheduler(optimizer: Optimizer, *, name: str = "cosine", epochs: int, steps_per_epoch: int,
                   warmup_frac: float = 0.0) -> LRScheduler | ReduceLROnPlateau | None:
    """Learning-rate schedule for :func:`fit`.

    ``cosine``: linear warmup over ``warmup_frac`` of all steps up to each group's lr, then cosine
    decay towards 0; stepped per batch. ``plateau``: ReduceLROnPlateau (factor 0.1, patience 2) on
    1 - val accuracy, stepped per epoch. ``none``: returns None (constant lr).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is unknown; choose one of {SCHEDULERS}")
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"make_scheduler needs epochs >= 1 and steps_per_epoch >= 1, got {epochs}, {steps_per_epoch}")
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup_frac must be in [0, 1) (e.g. 0.05 for 5% warmup), got {warmup_frac}")
    if name == "none":
        return None
    if name == "plateau":
        return ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=2)
    total = epochs * steps_per_epoch
    warmup = round(warmup_frac * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return LambdaLR(optimizer, factor)


class TrainingDiverged(RuntimeError):
    """:func:`fit` stopped: a training step's loss or an epoch's validation loss became NaN or infinite.

    ``phase`` is ``"train"`` or ``"validation"``; ``epoch`` and ``step`` are 1-based (``step`` within the
    epoch; a validation loss follows the epoch's last step), ``global_step`` counts steps from the start.
    ``loss`` is the non-finite value, ``lrs`` maps each parameter group's name to the learning rate the
    step used, ``last_finite_loss`` is the last finite training step loss (None when the first step
    diverged) and ``epochs`` holds the rows of the epochs that finished. Under torch.distributed every
    rank raises it at the same step, and ``ranks`` lists those whose loss was not finite.

    When it is raised, :func:`fit` has loaded back into the model the best epoch's weights, or the
    weights it started with if no epoch finished; ``restored`` says which. The checkpoint file is only
    ever written after an improving epoch, so it still holds the best epoch (or was never written).
    """

    def __init__(self, message: str, *, phase: str, epoch: int, step: int, steps: int, global_step: int,
                 loss: float, lrs: dict[str, float], last_finite_loss: float | None, ranks: list[int],
                 restored: str, epochs: list[dict[str, float]]) -> None:
        super().__init__(message)
        self.phase, self.epoch, self.step, self.steps, self.global_step = phase, epoch, step, steps, global_step
        self.loss, self.lrs, self.last_finite_loss, self.ranks = loss, lrs, last_finite_loss, ranks
        self.restored, self.epochs = restored, epochs


@dataclass
class History:
    """What :func:`fit` did: one dict per epoch (train_loss, train_acc, val_loss, val_acc, lr, seconds).

    ``lr`` is the largest group learning rate used by the epoch's last step; ``best_epoch`` is 1-based.
    """

    epochs: list[dict[str, float]]
    best_epoch: int
    best_metric: float
    stopped_early: bool
    seconds: float
    resumed_from: int = 0

    def to_frame(self) -> pd.DataFrame:
        """The per-epoch table, indexed by the 1-based epoch number."""
        frame = pd.DataFrame(self.epochs)
        frame.index = pd.RangeIndex(1, len(frame) + 1, name="epoch")
        return frame


def fit(model: nn.Module, train: Any, val: Any, *, preprocess: Preprocess, optimizer: Optimizer,
        scheduler: LRScheduler | ReduceLROnPlateau | None = None, epochs: int, batch_size: int,
        device: str | torch.device, label_smoothing: float = 0.0, patience: int | None = None,
        monitor: str = "val_loss", checkpoint_path: str | Path | None = None, seed: int = 42,
        soft_targets: bool = False, micro_batch_size: int | None = None, log: Callable[[str], Any] = print,
        progress: bool = False, on_epoch: EpochCallback | None = None,
        resume: TrainState | None = None) -> History:
    """Train ``model`` on ``train``, validate on ``val`` each epoch, and restore the best epoch.

    The best epoch by ``monitor`` (lowest ``val_loss`` or highest ``val_acc``) is kept in memory,
    written atomically to ``checkpoint_path`` (a ``state_dict``) if given, and loaded back into
    ``model`` at the end. Training stops early after ``patience`` epochs without improvement.
    ``soft_targets`` trains on ``train.soft`` probability targets instead of ``train.labels``.
    Validation loss is plain cross-entropy on ``val.labels`` (no label smoothing).
    ``micro_batch_size`` splits each batch (preprocessed whole) into micro-batches whose gradients are
    accumulated before the one optimiser step: the same step in less activation memory, exactly so for
    networks without dropout or batch statistics (DeiT-Base).
    Non-plateau schedulers are stepped per batch; ReduceLROnPlateau per epoch on 1 - val_acc.
    ``on_epoch(epoch, row)`` is called after each epoch with its row; returning True stops training
    there (a search pruning the trial).

    Every step's loss is checked before the optimiser applies it (on the value already copied to the
    host for the epoch's mean, so no extra synchronisation; on CUDA ``GradScaler.step`` synchronises each
    step anyway), and every epoch's validation loss before it can count as an improvement: a NaN or
    infinite one raises :class:`TrainingDiverged` naming the epoch, the step, the learning rates and the
    last finite loss. The diverged step is never applied, the model gets the best epoch's weights back
    (or, if no epoch finished, the weights it came in with) and ``checkpoint_path`` is left as it was.

    When a ``torch.distributed`` process group is up with several ranks, ``batch_size`` stays the
    global batch: each rank takes every ``world``-th sample of it (the epoch's order is the same on all
    ranks, padded to a multiple of ``world`` like DistributedSampler) and DDP averages the gradients,
    so a step equals the single-process step on the same batch. Metrics are reduced over the ranks;
    rank 0 alone writes the checkpoint and calls ``on_epoch``.

    With a :class:`TrainState` as ``resume``, the whole training state (weights, optimiser, schedule, AMP
    scaler, every RNG, early stopping and the best epoch so far) is written atomically at the end of every
    epoch, and a state left there by a killed run with the same ``resume.key`` is loaded first: training
    goes on from the epoch after it, and on CPU ends exactly as an uninterrupted run would.
    ``History.resumed_from`` is the epoch it went on from (0: a fresh start).
    """
    if monitor not in MONITORS:
        raise ValueError(f"monitor {monitor!r} is unknown; choose one of {MONITORS}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"fit needs epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be None (no early stopping) or >= 1, got {patience}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be None (whole batches) or >= 1, got {micro_batch_size}")
    n = _check_split(train, "train")
    _check_split(val, "val")
    if soft_targets and (train.soft is None or len(train.soft) != n):
        raise ValueError("soft_targets=True needs train.soft, float [N, classes] vote distributions "
                         "(load FERPlus with label_rule 'votes'), or use soft_targets=False")
    device = torch.device(device)
    rank, world = _world()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is the global batch and must divide evenly over {world} "
                         f"processes; pick a multiple of {world} or another --nproc-per-node")
    seed_everything(seed + rank)  # augmentation and dropout differ per rank; the shuffle below does not
    shuffle = torch.Generator().manual_seed(seed)
    model.to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    maximize = monitor == "val_acc"
    best_metric, best_epoch, best_state, stale = -math.inf if maximize else math.inf, 0, None, 0
    initial: dict[str, torch.Tensor] | None = _cpu_state(model)  # restored if it diverges before an epoch finished
    rows: list[dict[str, float]] = []
    last_finite: tuple[float, int, int] | None = None  # (loss, epoch, step) of the last finite training step
    global_step, first, finished, elapsed = 0, 1, False, 0.0
    if resume is not None:
        resume.key = _resume_key(resume.key, n=n, epochs=epochs, batch_size=batch_size, world=world, monitor=monitor,
                                 patience=patience, seed=seed, soft_targets=soft_targets)
        saved = resume.load(rank, world, device, log)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
            if scaler.is_enabled() and saved["scaler"]:
                scaler.load_state_dict(saved["scaler"])
            _set_rng(saved["rng"], shuffle)
            rows, best_epoch, stale, global_step = saved["rows"], saved["best_epoch"], saved["stale"], saved["global_step"]
            best_metric, finished, elapsed = saved["best_metric"], saved["finished"], saved["elapsed"]
            last_finite = tuple(saved["last_finite"]) if saved["last_finite"] is not None else None
            best_state = saved["best"] if saved["best"] is not None else (_cpu_state(model) if best_epoch else None)
            initial = None if best_state is not None else initial
            first = len(rows) + 1
    net = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda" else None)

    def diverged(phase: str, epoch: int, step: int, steps: int, losses: list[float]) -> TrainingDiverged:
        """Restore the best (or initial) weights and build the error naming where it diverged."""
        if best_state is not None:
            model.load_state_dict(best_state)
            restored = f"the best epoch's weights (epoch {best_epoch}, {monitor} {best_metric:.4f})"
            kept = f"; {checkpoint_path} still holds them" if checkpoint_path is not None else ""
        else:
            model.load_state_dict(initial)
            restored, kept = "the weights it started with (no epoch finished)", ""
        bad_ranks = [r for r, v in enumerate(losses) if not math.isfinite(v)]
        loss = losses[bad_ranks[0]]
        lrs = {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
        where = (f"the training loss became {loss} at epoch {epoch}, step {step} of {steps} (step {global_step} "
                 "overall)" if phase == "train" else
                 f"the validation loss became {loss} after epoch {epoch} (step {step} of {steps}, step "
                 f"{global_step} overall)")
        on_ranks = (f" on rank{'s' if len(bad_ranks) > 1 else ''} {', '.join(map(str, bad_ranks))}"
                    if world > 1 and phase == "train" else "")
        last = (f"last finite training loss {last_finite[0]:.6g} (epoch {last_finite[1]}, step {last_finite[2]})"
                if last_finite is not None else "no finite training loss before it")
        message = (f"training diverged: {where}{on_ranks}; learning rate{'s' if len(lrs) > 1 else ''} "
                   + ", ".join(f"{name}={value:.3g}" for name, value in lrs.items())
                   + f"; {last}. The model holds {restored}{kept}. Lower the learning rate (lr, or lr_backbone / "
                   "lr_head), add warmup (warmup_frac) or check the inputs for NaN/inf values")
        log(message)
        return TrainingDiverged(message, phase=phase, epoch=epoch, step=step, steps=steps, global_step=global_step,
                                loss=loss, lrs=lrs, last_finite_loss=None if last_finite is None else last_finite[0],
                                ranks=bad_ranks if phase == "train" else [],
                                restored="best" if best_state is not None else "initial", epochs=list(rows))

    start = time.perf_counter() - elapsed
    for epoch in range(first, epochs + 1 if not finished else first):
        tick = time.perf_counter()
        net.train()
        order = _shard(torch.randperm(n, generator=shuffle), batch_size, rank, world)
        loss_sum, correct = 0.0, 0
        n_steps = math.ceil(len(order) / (batch_size // world))
        steps = _batches(train.images, order, batch_size // world, device)
        for step, (idx, images) in enumerate(tqdm(steps, total=n_steps, desc=f"epoch {epoch}",
                                                  disable=not progress, leave=False), 1):
            inputs = preprocess(images, True)
            labels = train.labels[idx].to(device, non_blocking=True)
            target = train.soft[idx].to(device, non_blocking=True) if soft_targets else labels
            optimizer.zero_grad(set_to_none=True)
            loss, logits = _accumulate(net, inputs, target, micro_batch_size or len(idx), scaler, device,
                                       label_smoothing)
            global_step += 1
            losses = _step_losses(loss, rank, world)  # the step's one host sync (and all ranks agree on it)
            if not all(math.isfinite(v) for v in losses):
                optimizer.zero_grad(set_to_none=True)
                raise diverged("train", epoch, step, n_steps, losses)
            last_finite = (sum(losses) / world, epoch, step)
            scaler.step(optimizer)
            scaler.update()
            lr = max(group["lr"] for group in optimizer.param_groups)  # the lr this step used
            if scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step()
            loss_sum += losses[rank] * len(idx)
            correct += (logits.argmax(1) == labels).sum().item()
        loss_sum, correct, seen = _all_sum([loss_sum, correct, len(order)], device)
        val_loss, val_acc = _evaluate(model, val, preprocess, batch_size, device)
        if not math.isfinite(val_loss):  # the same on every rank: it is summed over them
            raise diverged("validation", epoch, n_steps, n_steps, [val_loss])
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(1.0 - val_acc)
        row = {"train_loss": loss_sum / seen, "train_acc": correct / seen, "val_loss": val_loss,
               "val_acc": val_acc, "lr": lr, "seconds": time.perf_counter() - tick}
        rows.append(row)
        metric = row[monitor]
        improved = metric > best_metric if maximize else metric < best_metric
        if improved:
            best_metric, best_epoch, stale = metric, epoch, 0
            best_state, initial = _cpu_state(model), None
            if checkpoint_path is not None and rank == 0:
                write_state_dict(Path(checkpoint_path), best_state)
        else:
            stale += 1
        log(f"epoch {epoch}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.2e}  {row['seconds']:.1f}s"
            + ("  *best" if improved else ""))
        stop = None
        if on_epoch is not None and _all_sum([rank == 0 and bool(on_epoch(epoch, row))], device)[0]:
            stop = f"stopped after epoch {epoch} by the on_epoch callback (a search pruned this trial)"
        elif patience is not None and stale >= patience and epoch < epochs:
            stop = f"early stop: no {monitor} improvement for {patience} epochs; best epoch {best_epoch}"
        if resume is not None:
            resume.save(rank, model=_cpu_state(model), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict() if scheduler is not None else None,
                        scaler=scaler.state_dict() if scaler.is_enabled() else {}, rng=_get_rng(shuffle),
                        rows=rows, best_epoch=best_epoch, best_metric=float(best_metric), stale=stale,
                        best=best_state if best_epoch != epoch else None, global_step=global_step,
                        last_finite=list(last_finite) if last_finite is not None else None,
                        finished=stop is not None or epoch == epochs, elapsed=time.perf_counter() - start)
        if stop is not None:
            log(stop)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return History(epochs=rows, best_epoch=best_epoch, best_metric=float(best_metric),
                   stopped_early=len(rows) < epochs, seconds=time.perf_counter() - start,
                   resumed_from=first - 1 if resume is not None else 0)


class TrainState:
    """Where :func:`fit` keeps its resumable state: one file per rank in ``folder``, the newest epoch only.

    A file is ``<name>.r<rank>.e<epoch>.<sha256 prefix>.pt``, written to a temporary name and renamed in
    one step, so a kill at any moment leaves the previous epoch's file or the new one, never a part. Its
    name carries the first 16 hex digits of its SHA-256: a file whose bytes do not match (truncated,
    altered) is reported, deleted and not used, and so is one written for other settings (``key``). Rank 0's
    file holds everything; another rank's holds only its own RNG states (augmentation and dropout differ
    per rank), and every rank reads rank 0's (one shared file system, as on one machine).
    """

    FORMAT = 1

    def __init__(self, folder: str | Path, name: str, key: str) -> None:
        self.folder, self.name, self.key = Path(folder), name, key

    def files(self, rank: int | None = None) -> list[Path]:
        """This state's files of ``rank`` (every rank: None), newest epoch first."""
        pattern = f"{self.name}.r{'*' if rank is None else rank}.e*.pt"
        return sorted(self.folder.glob(pattern), key=lambda p: p.name.split(".")[-3], reverse=True)

    def save(self, rank: int, **state: Any) -> Path:
        """Write this epoch's state of ``rank`` (rank 0: all of it; others: their ``rng``) and drop older ones."""
        epoch = len(state["rows"])
        payload = {"format": self.FORMAT, "key": self.key, "epoch": epoch,
                   **(state if rank == 0 else {"rng": state["rng"]})}
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{self.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            path = self.folder / f"{self.name}.r{rank}.e{epoch:04d}.{file_digest(Path(tmp))[:16]}.pt"
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for old in self.files(rank):
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def _read(self, rank: int, log: Callable[[str], Any]) -> dict[str, Any] | None:
        """The newest sound state file of ``rank``; damaged or foreign ones are reported and deleted."""
        for path in self.files(rank):
            why = None
            if file_digest(path)[:16] != path.name.split(".")[-2]:
                why = "its bytes do not match the checksum in its name (truncated or altered)"
            else:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
                    why = f"it cannot be read ({type(exc).__name__}: {exc})"
                else:
                    if not isinstance(state, dict) or state.get("format") != self.FORMAT:
                        why = f"it is not a training state of format {self.FORMAT}"
                    elif state.get("key") != self.key:
                        why = "it was written for other settings"
                    else:
                        return state
            log(f"resume: {path} is not used and was deleted: {why}")
            path.unlink(missing_ok=True)
        return None

    def load(self, rank: int, world: int, device: torch.device, log: Callable[[str], Any]) -> dict[str, Any] | None:
        """The state to go on from, or None for a fresh start (every rank agrees on which)."""
        state = self._read(0, log)
        if state is not None and rank > 0:
            own = self._read(rank, log)
            state = {**state, "rng": own["rng"]} if own is not None and own["epoch"] == state["epoch"] else None
        epochs = _all_sum([state["epoch"] if state is not None else -1], device) if world > 1 else None
        if epochs is not None and epochs[0] != world * (state["epoch"] if state is not None else -1):
            log("resume: the ranks' saved states are not all of the same epoch; starting from epoch 1")
            return None
        if state is not None:
            log(f"resume: going on after epoch {state['epoch']} from {self.folder / self.files(0)[0].name}")
        return state

    def save_result(self, value: Any) -> Path:
        """Keep what this training led to (``value``: JSON-able, e.g. a subset fit's test predictions) once its
        epoch states are gone, so a killed run that has many fits does not train this one again. The file is
        ``<name>.done.<sha256 prefix>.json``, written in one step; :meth:`clear_family` deletes it."""
        payload = json.dumps({"format": self.FORMAT, "key": self.key, "value": value}).encode()
        path = self.folder / f"{self.name}.done.{hashlib.sha256(payload).hexdigest()[:16]}.json"
        atomic_write_bytes(path, payload)
        for old in self.folder.glob(f"{self.name}.done.*.json"):
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def load_result(self, log: Callable[[str], Any]) -> Any | None:
        """The value :meth:`save_result` kept, or None; a damaged or foreign file is reported and deleted."""
        for path in sorted(self.folder.glob(f"{self.name}.done.*.json")):
            payload = path.read_bytes()
            why = None
            if hashlib.sha256(payload).hexdigest()[:16] != path.name.split(".")[-2]:
                why = "its bytes do not match the checksum in its name (truncated or altered)"
            else:
                kept = json.loads(payload)
                if not isinstance(kept, dict) or kept.get("format") != self.FORMAT or kept.get("key") != self.key:
                    why = "it was written for other settings"
                else:
                    log(f"resume: {path.name} holds this training's result from before the run was stopped; not "
                        f"trained again")
                    return kept["value"]
            log(f"resume: {path} is not used and was deleted: {why}")
            path.unlink(missing_ok=True)
        return None

    def clear(self) -> None:
        """Delete every rank's state (the run finished), and what a kill in the middle of a write left."""
        for path in [*self.files(), *self.folder.glob(f".{self.name}.*.tmp")]:
            path.unlink(missing_ok=True)

    @staticmethod
    def clear_family(folder: str | Path, pattern: str) -> list[Path]:
        """Delete every state in ``folder`` whose name matches the glob ``pattern`` (e.g. all the states of one run
        folder, whatever their settings), with what a kill in the middle of a write left; the files deleted."""
        folder = Path(folder)
        gone = sorted([*folder.glob(f"{pattern}*.r*.e*.pt"), *folder.glob(f"{pattern}*.done.*.json"),
                       *folder.glob(f".{pattern}*.tmp")])
        for path in gone:
            path.unlink(missing_ok=True)
        return gone


def _resume_key(key: str, **settings: Any) -> str:
    """``key`` (what the caller says identifies the run) with what :func:`fit` itself was given."""
    return hashlib.sha256(f"{key}|{sorted(settings.items())}".encode()).hexdigest()


def _get_rng(shuffle: torch.Generator) -> dict[str, Any]:
    """Every RNG state a training epoch draws from, as tensors and plain values (``weights_only`` loads them)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss], "shuffle": shuffle.get_state(), "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng(rng: dict[str, Any], shuffle: torch.Generator) -> None:
    version, mt, gauss = rng["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    shuffle.set_state(rng["shuffle"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s state_dict (parameters and buffers)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _step_losses(loss: torch.Tensor, rank: int, world: int) -> list[float]:
    """Each rank's loss of this step, on the host: one sync, plus one tiny all-reduce under DDP.

    Every rank gets every rank's value, so a NaN on one rank stops all of them at the same step
    instead of leaving the others waiting in the next collective.
    """
    if world == 1:
        return [loss.item()]
    every = torch.zeros(world, dtype=torch.float64, device=loss.device)
    every[rank] = loss.detach().double()
    dist.all_reduce(every)
    return every.tolist()


def _accumulate(net: nn.Module, inputs: torch.Tensor, target: torch.Tensor, micro: int,
                scaler: torch.amp.GradScaler, device: torch.device,
                label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of one batch's mean loss, ``micro`` samples at a time; (the batch's loss, its logits).

    The loss stays on the device (no synchronisation per micro-batch); :func:`fit` checks it.
    """
    n, total, outputs = len(inputs), torch.zeros((), device=device), []
    for start in range(0, n, micro):
        part = slice(start, start + micro)
        last = start + micro >= n
        # DDP averages gradients over the ranks once, on the last micro-batch.
        sync = contextlib.nullcontext() if last or not isinstance(net, DistributedDataParallel) else net.no_sync()
        with sync:
            with _autocast(device):
                logits = net(inputs[part])
            loss = F.cross_entropy(logits.float(), target[part], label_smoothing=label_smoothing)
            scaler.scale(loss * (len(logits) / n)).backward()
        total = total + loss.detach() * (len(logits) / n)
        outputs.append(logits.detach())
    return total, torch.cat(outputs)


@torch.no_grad()
def predict(model: nn.Module, split: Any, *, preprocess: Preprocess, batch_size: int,
            device: str | torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (float32 ``[N, classes]``) and predicted labels (int64 ``[N]``), eval mode."""
    logits = torch.from_numpy(extract(model, split, preprocess=preprocess, batch_size=batch_size, device=device))
    probs = logits.softmax(1)
    return probs.numpy(), probs.argmax(1).numpy()


def eval_batches(split: Any, *, preprocess: Preprocess, batch_size: int, device: str | torch.device,
                 limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(preprocessed images, labels) of the first ``limit`` images of ``split`` (all: None) in split order, on
    ``device``, ``batch_size`` at a time: what :func:`extract` feeds its function, for code that runs the network
    itself (the feature-reuse measures)."""
    n = _check_split(split, "split")
    device = torch.device(device)
    for idx, images in _batches(split.images, torch.arange(n if limit is None else min(n, limit)), batch_size, device):
        yield preprocess(images, False), split.labels[idx].to(device)


@torch.no_grad()
def extract(fn: Callable[[torch.Tensor], torch.Tensor], split: Any, *, preprocess: Preprocess,
            batch_size: int, device: str | torch.device, progress: bool = False) -> np.ndarray:
    """Run ``fn`` (a module, or e.g. an embedding function) over ``split``; float32 ``[N, D]`` in split order.

    Modules (and methods bound to a module) are moved to ``device`` and put in eval mode; for other
    callables that is the caller's job. Outputs are flattened per sample.
    """
    n = _check_split(split, "split")
    device = torch.device(device)
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        owner.to(device).eval()
    outputs = []
    steps = _batches(split.images, torch.arange(n), batch_size, device)
    for _, images in tqdm(steps, total=math.ceil(n / batch_size), disable=not progress, leave=False):
        with _autocast(device):
            out = fn(preprocess(images, False))
        outputs.append(torch.flatten(out, 1).float().cpu())
    return torch.cat(outputs).numpy()


@torch.no_grad()
def _evaluate(model: nn.Module, split: Any, preprocess: Preprocess, batch_size: int,
              device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split``; each rank scores every ``world``-th sample."""
    rank, world = _world()
    idx = torch.arange(rank, len(split.labels), world)
    loss_sum, correct = 0.0, 0
    if len(idx):
        shard = split if world == 1 else _Shard(split.images[idx], split.labels[idx])
        logits = torch.from_numpy(extract(model, shard, preprocess=preprocess, batch_size=batch_size,
                                          device=device))
        labels = shard.labels.cpu()
        loss_sum = F.cross_entropy(logits, labels, reduction="sum").item()
        correct = (logits.argmax(1) == labels).sum().item()
    loss_sum, correct, count = _all_sum([loss_sum, correct, len(idx)], device)
    return loss_sum / count, correct / count


@dataclass
class _Shard:
    images: torch.Tensor
    labels: torch.Tensor


def _world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks (themselves in a single process)."""
    if _world()[1] == 1:
        return [float(v) for v in values]
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def _shard(order: torch.Tensor, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """This rank's part of an epoch's ``order``: every ``world``-th sample of each global batch.

    ``order`` is first padded (repeating its start) to a multiple of ``world``, so every rank gets
    the same number of samples and steps, and rank slices of a batch put together give the batch.
    """
    if world == 1:
        return order
    padded = order[torch.arange(math.ceil(len(order) / world) * world) % len(order)]
    return torch.cat([padded[s:s + batch_size][rank::world] for s in range(0, len(padded), batch_size)])


def _batches(images: torch.Tensor, order: torch.Tensor, batch_size: int,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, uint8 batch on device)``; pinned, non-blocking host-to-GPU copies on CUDA."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = images[idx.to(images.device)]
        if device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()
        yield idx, batch.to(device, non_blocking=True)


def _autocast(device: torch.device) -> torch.autocast:
    """fp16 autocast on CUDA only; disabled (fp32) elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda")


def _check_split(split: Any, name: str) -> int:
    images, labels = getattr(split, "images", None), getattr(split, "labels", None)
    is_images = isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
    is_features = isinstance(images, torch.Tensor) and images.dtype == torch.float32 and images.ndim == 2
    if not (is_images or is_features):
        raise ValueError(f"{name}.images must be a uint8 tensor [N, C, H, W] (a data.Split) or float32 "
                         f"features [N, D] (a features.FeatureSplit), got {type(images).__name__} "
                         f"{getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (len(images),):
        raise ValueError(f"{name}.labels must be an int64 tensor [N] with N = {len(images)} images, "
                         f"got {type(labels).__name__} {tuple(getattr(labels, 'shape', ()))}")
    if len(images) == 0:
        raise ValueError(f"{name} is empty; check n_train / n_val / n_test in the profile")
    return len(images)
