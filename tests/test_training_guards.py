"""fit stops on a NaN/infinite loss: a clear error, the best (or initial) weights back, the checkpoint untouched.

The model is a linear layer on 4 cached features whose output is poisoned (NaN) at a chosen training
forward call or validation pass, so the step where training diverges is known exactly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from transferstudy.training import TrainingDiverged, fit, make_optimizer

N, BATCH, STEPS = 16, 4, 4  # 4 steps per epoch


@dataclass
class Split:
    images: torch.Tensor
    labels: torch.Tensor
    soft: torch.Tensor | None = None


def _split(seed: int, n: int = N) -> Split:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) + 2 * labels[:, None].float()
    return Split(x, labels)


class Poisoned(nn.Module):
    """``Linear(4, 2)`` whose output is NaN on training forward call ``nan_at`` or validation pass ``nan_val_at``.

    It keeps every training call's (inputs, logits), so a step's loss can be recomputed.
    """

    def __init__(self, nan_at: int | None = None, nan_val_at: int | None = None, rank: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 2)
        self.nan_at, self.nan_val_at, self.rank = nan_at, nan_val_at, rank
        self.calls, self.val_calls, self.seen = 0, 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        poison = self.rank is None or not dist.is_initialized() or dist.get_rank() == self.rank
        if torch.is_grad_enabled():
            self.calls += 1
            self.seen.append((x.detach().clone(), out.detach().clone()))
            if self.calls == self.nan_at and poison:
                out = out * float("nan")
        else:
            self.val_calls += 1
            if self.nan_val_at is not None and self.val_calls >= self.nan_val_at:
                out = out * float("nan")
        return out


def identity(batch: torch.Tensor, train: bool) -> torch.Tensor:
    """The preprocessing of cached features (as ``features.identity``; importing that module would slow the
    DDP test's processes down)."""
    return batch


def _groups_opt(model: Poisoned) -> torch.optim.Optimizer:
    return make_optimizer({"weight": [model.lin.weight], "bias": [model.lin.bias]}, name="adam",
                          lr={"weight": 0.05, "bias": 0.02})


def _fit(model: nn.Module, *, epochs: int = 3, **kw):
    kw.setdefault("log", lambda line: None)
    return fit(model, _split(1), _split(2), preprocess=identity, optimizer=kw.pop("optimizer", None)
               or _groups_opt(model), epochs=epochs, batch_size=BATCH, device="cpu", seed=5, **kw)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _after_one_epoch(**kw) -> dict[str, torch.Tensor]:
    """The weights a clean run has after epoch 1 (the same seed, so the same batches)."""
    model = Poisoned()
    _fit(model, epochs=1, **kw)
    return _state(model)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("micro", [None, 2])
def test_a_nan_loss_names_epoch_step_lrs_and_last_finite_loss_and_restores_the_best_epoch(tmp_path, micro):
    per_step = 1 if micro is None else BATCH // micro  # forward calls per step
    model = Poisoned(nan_at=(STEPS + 3) * per_step)  # the last micro-batch of epoch 2, step 3
    opt = _groups_opt(model)
    ckpt, saved, lines = tmp_path / "best.pt", {}, []

    def snapshot(epoch: int, row: dict) -> bool:
        saved[epoch] = ckpt.read_bytes()
        return False

    with pytest.raises(TrainingDiverged) as info:
        _fit(model, optimizer=opt, checkpoint_path=ckpt, micro_batch_size=micro, on_epoch=snapshot, log=lines.append)
    err = info.value
    assert (err.phase, err.epoch, err.step, err.steps, err.global_step) == ("train", 2, 3, STEPS, STEPS + 3)
    assert math.isnan(err.loss) and err.lrs == {"weight": 0.05, "bias": 0.02} and err.ranks == [0]
    # The last finite loss is step 6's (epoch 2, step 2): cross-entropy of the logits that step produced.
    inputs = torch.cat([x for x, _ in model.seen[(STEPS + 1) * per_step:(STEPS + 2) * per_step]])
    logits = torch.cat([o for _, o in model.seen[(STEPS + 1) * per_step:(STEPS + 2) * per_step]])
    labels = _split(1).labels[[int((_split(1).images == row).all(1).nonzero()) for row in inputs]]
    assert err.last_finite_loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    message = str(err)
    for part in ("training diverged", "training loss became nan", "epoch 2, step 3 of 4", "step 7 overall",
                 "weight=0.05", "bias=0.02", f"last finite training loss {err.last_finite_loss:.6g} (epoch 2, step 2)",
                 "best epoch's weights (epoch 1", str(ckpt), "Lower the learning rate"):
        assert part in message, (part, message)
    assert "\n" not in message and lines[-1] == message  # logged, and one line for the run's failure record
    assert len(err.epochs) == 1 and err.restored == "best"

    # The weights are epoch 1's (the best, and only, finished epoch), as in the untouched checkpoint.
    assert _same(_state(model), _after_one_epoch(micro_batch_size=micro))
    assert ckpt.read_bytes() == saved[1] and list(saved) == [1]
    assert _same(torch.load(ckpt), _state(model))
    # The diverged step was never applied: Adam took the 6 finite steps only, and no NaN gradient is left.
    assert all(int(opt.state[p]["step"]) == STEPS + 2 for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_diverging_in_the_first_epoch_restores_the_initial_weights(tmp_path):
    # A real divergence: SGD at lr 1e20 on a two-layer net overflows float32 within a few steps.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    initial = _state(model)
    opt = make_optimizer({"all": list(model.parameters())}, name="sgd", lr=1e20, momentum=0.0)
    ckpt = tmp_path / "best.pt"
    with pytest.raises(TrainingDiverged, match=r"training loss became (nan|inf) at epoch 1, step \d of 4") as info:
        _fit(model, optimizer=opt, checkpoint_path=ckpt)
    err = info.value
    assert err.epoch == 1 and err.step > 1 and err.lrs == {"all": 1e20} and math.isfinite(err.last_finite_loss)
    assert "learning rate all=1e+20" in str(err) and "the weights it started with (no epoch finished)" in str(err)
    assert err.restored == "initial" and err.epochs == []
    assert _same(_state(model), initial)
    assert not ckpt.exists()  # no epoch finished, so nothing was ever checkpointed


def test_the_first_step_diverging_has_no_last_finite_loss():
    model = Poisoned(nan_at=1)
    initial = _state(model)
    with pytest.raises(TrainingDiverged, match="step 1 of 4 .*no finite training loss before it") as info:
        _fit(model)
    assert info.value.last_finite_loss is None and _same(_state(model), initial)


def test_a_nan_validation_loss_stops_before_it_can_count_as_the_best_epoch(tmp_path):
    # NaN logits score an accuracy (argmax picks an index), so val_acc alone would let such an epoch win.
    model, ckpt, saved = Poisoned(nan_val_at=N // BATCH + 1), tmp_path / "best.pt", {}  # epoch 2's validation

    def snapshot(epoch: int, row: dict) -> bool:
        saved[epoch] = ckpt.read_bytes()
        return False

    with pytest.raises(TrainingDiverged, match=r"validation loss became nan after epoch 2 \(step 4 of 4") as info:
        _fit(model, monitor="val_acc", checkpoint_path=ckpt, on_epoch=snapshot)
    err = info.value
    assert (err.phase, err.epoch, err.global_step, len(err.epochs)) == ("validation", 2, 2 * STEPS, 1)
    assert math.isfinite(err.last_finite_loss)
    assert _same(_state(model), _after_one_epoch(monitor="val_acc"))
    assert ckpt.read_bytes() == saved[1] and list(saved) == [1]


# --- torch.distributed: a NaN on one rank stops every rank at the same step ------------------------------


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))  # a rank left waiting fails the test instead of hanging
    try:
        model = Poisoned(nan_at=2, rank=1)  # only rank 1's loss of step 2 is NaN
        initial = _state(model)
        try:
            _fit(model)
            outcome = {"raised": False}
        except TrainingDiverged as err:
            outcome = {"raised": True, "step": (err.epoch, err.step), "ranks": err.ranks, "message": str(err),
                       "initial": _same(_state(model), initial)}
        dist.barrier()  # both ranks are still in step with each other
        torch.save(outcome, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_under_ddp_every_rank_stops_at_the_step_where_one_rank_diverged(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    outcomes = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for outcome in outcomes:
        assert outcome["raised"] and outcome["step"] == (1, 2) and outcome["ranks"] == [1] and outcome["initial"]
        assert "epoch 1, step 2 of 4" in outcome["message"] and "on rank 1;" in outcome["message"]
