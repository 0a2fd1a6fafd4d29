"""Killed runs resume: fit's per-epoch state, written atomically and checked, goes on bit-identically.

In-process tests stop a fit at an epoch's end (before that epoch's state is written, as a kill would) and
start a fresh model, optimiser and schedule from the saved state; the subprocess tests ``kill -9`` a real
training process, and a whole ``transferstudy run`` of a smoke fine-tune, then rerun the same command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_training import PREPROCESS, _model, _split

from transferstudy.preprocess import Preprocessor
from transferstudy.training import TrainState, fit, make_optimizer, make_scheduler

AUGMENTED = Preprocessor(size=8, policy="light")  # draws from torch's global RNG every batch
TRAIN, VAL = _split(96, 1), _split(40, 2)


class Killed(Exception):
    """Stands for a kill at the end of an epoch, before its state is written."""


def _fit(state: TrainState | None, *, epochs: int = 5, kill_at: int | None = None, scheduler: str = "cosine",
         optimizer: str = "adamw", patience: int | None = None, lines: list[str] | None = None,
         model_seed: int = 0, **kw):
    """One fit of the tiny net (dropout, augmentation, warmup + cosine); its model, history and log."""
    model = _model(model_seed)
    opt = make_optimizer({"all": list(model.parameters())}, name=optimizer, lr=0.05)
    sched = make_scheduler(opt, name=scheduler, epochs=epochs, steps_per_epoch=-(-len(TRAIN.labels) // 16), warmup_frac=0.1)

    def on_epoch(epoch: int, row: dict) -> bool:
        if epoch == kill_at:
            raise Killed
        return False

    log = lines.append if lines is not None else (lambda line: None)
    history = fit(model, TRAIN, VAL, preprocess=kw.pop("preprocess", AUGMENTED), optimizer=opt, scheduler=sched,
                  epochs=epochs, batch_size=16, device="cpu", patience=patience, monitor="val_acc", seed=7,
                  log=log, on_epoch=on_epoch, resume=state, **kw)
    return model, history


def _rows(history) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history.epochs]


def _assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{name} differs after resuming"


@pytest.mark.parametrize("scheduler, optimizer, patience", [("cosine", "adamw", None), ("plateau", "sgd", 3)])
@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_fit_stopped_after_an_epoch_goes_on_bit_identically(tmp_path, kill_at, scheduler, optimizer, patience):
    whole_model, whole = _fit(None, scheduler=scheduler, optimizer=optimizer, patience=patience)
    assert len(whole.epochs) > kill_at + 1  # the kill lands inside the run
    state = TrainState(tmp_path, "run", key="settings")
    with pytest.raises(Killed):
        _fit(state, kill_at=kill_at + 1, scheduler=scheduler, optimizer=optimizer, patience=patience)
    assert [p.name.split(".")[2] for p in state.files()] == [f"e{kill_at:04d}"]  # the last finished epoch only
    lines: list[str] = []
    model, history = _fit(TrainState(tmp_path, "run", key="settings"), scheduler=scheduler, optimizer=optimizer,
                          patience=patience, lines=lines, model_seed=123)  # other starting weights: all come from the state
    assert history.resumed_from == kill_at
    assert any(f"going on after epoch {kill_at}" in line for line in lines)
    assert _rows(history) == _rows(whole)
    assert (history.best_epoch, history.best_metric, history.stopped_early) == \
           (whole.best_epoch, whole.best_metric, whole.stopped_early)
    _assert_same_model(model, whole_model)


def test_a_finished_state_is_not_trained_again(tmp_path):
    first_model, first = _fit(TrainState(tmp_path, "run", key="k"), epochs=3)
    again_model, again = _fit(TrainState(tmp_path, "run", key="k"), epochs=3, model_seed=9)
    assert again.resumed_from == 3 and _rows(again) == _rows(first)
    _assert_same_model(again_model, first_model)  # the best epoch's weights, loaded back
    state = TrainState(tmp_path, "run", key="k")
    (tmp_path / ".run.abc123.tmp").write_bytes(b"half a state")  # a write a kill cut short
    state.clear()
    assert state.files() == [] and not list(tmp_path.iterdir())


def test_a_damaged_state_file_is_reported_deleted_and_not_used(tmp_path):
    state = TrainState(tmp_path, "run", key="k")
    with pytest.raises(Killed):
        _fit(state, kill_at=3)
    (saved,) = state.files()
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the pickled tensors
    saved.write_bytes(bytes(data))
    lines: list[str] = []
    _, history = _fit(TrainState(tmp_path, "run", key="k"), epochs=3, lines=lines)
    assert history.resumed_from == 0
    assert any(str(saved) in line and "do not match the checksum" in line for line in lines)
    assert not saved.exists()


def test_a_truncated_state_file_is_not_used(tmp_path):
    state = TrainState(tmp_path, "run", key="k")
    with pytest.raises(Killed):
        _fit(state, kill_at=2)
    (saved,) = state.files()
    saved.write_bytes(saved.read_bytes()[:1000])
    lines: list[str] = []
    _, history = _fit(TrainState(tmp_path, "run", key="k"), epochs=2, lines=lines)
    assert history.resumed_from == 0 and any("not used and was deleted" in line for line in lines)


def test_a_state_of_other_settings_is_not_used(tmp_path):
    with pytest.raises(Killed):
        _fit(TrainState(tmp_path, "run", key="k"), kill_at=2)
    lines: list[str] = []
    # Same caller key, but fit's own settings differ (more epochs change the schedule).
    _, history = _fit(TrainState(tmp_path, "run", key="k"), epochs=6, lines=lines)
    assert history.resumed_from == 0
    assert any("written for other settings" in line for line in lines)


def test_the_state_is_written_atomically_and_only_the_newest_is_kept(tmp_path, monkeypatch):
    state = TrainState(tmp_path, "run", key="k")
    _fit(state, epochs=2)
    assert [p.name.split(".")[2] for p in state.files()] == ["e0002"]
    assert not list(tmp_path.glob(".*.tmp"))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # A write that fails midway leaves the previous epoch's file and no temporary file.
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        _fit(TrainState(tmp_path, "other", key="k"), epochs=2)
    assert [p.name for p in tmp_path.iterdir()] == [state.files()[0].name]


# --- kill -9 -----------------------------------------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    import test_resume
    from transferstudy.training import TrainState
    folder, out, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    save = TrainState.save
    def slow_save(self, *args, **kwargs):  # a window after each epoch's state for the parent's kill
        path = save(self, *args, **kwargs)
        time.sleep(pause)
        return path
    TrainState.save = slow_save
    state = TrainState(folder, "run", key="settings") if folder != "-" else None
    model, history = test_resume._fit(state, epochs=6)
    torch.save({{"model": model.state_dict(), "rows": test_resume._rows(history),
                "resumed_from": history.resumed_from}}, out)
""")


def _train_process(tmp_path: Path, folder: str, out: Path, pause: float) -> subprocess.Popen:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    return subprocess.Popen([sys.executable, str(script), folder, str(out), str(pause)], start_new_session=True)


def test_kill_9_after_the_first_epoch_then_resume_is_bit_identical(tmp_path):
    whole = tmp_path / "whole.pt"
    assert _train_process(tmp_path, "-", whole, 0).wait(timeout=300) == 0
    folder = tmp_path / "state"
    state = TrainState(folder, "run", key="settings")
    killed = _train_process(tmp_path, str(folder), tmp_path / "never.pt", 30)
    deadline = time.monotonic() + 300
    while not state.files() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "never.pt").exists()
    resumed = tmp_path / "resumed.pt"
    assert _train_process(tmp_path, str(folder), resumed, 0).wait(timeout=300) == 0
    a, b = torch.load(whole, weights_only=True), torch.load(resumed, weights_only=True)
    assert b["resumed_from"] >= 1 and a["rows"] == b["rows"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


# --- a whole run: `transferstudy run` of a smoke fine-tune, killed after its first epoch -------------------

RUN_ARGS = ["--profile", "smoke", "--only", "cifar10/alexnet/full", "-p", "pretrained", "false", "-p", "epochs", "2"]


def _transferstudy(root: Path, runs: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("transferstudy")), "run", "--data-root", str(root),
           "--runs-dir", str(runs), *RUN_ARGS]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL the runner and everything it started (the notebook's kernel runs in a session of its own)."""
    import psutil

    parent = psutil.Process(pid)
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def test_kill_9_of_a_smoke_fine_tune_then_the_same_command_resumes_bit_identically(cifar_dir, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar10").symlink_to(cifar_dir)
    whole = _transferstudy(root, tmp_path / "whole")
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out

    runs = tmp_path / "runs"
    killed = _transferstudy(root, runs)
    state = runs / ".cache" / "resume"
    deadline = time.monotonic() + 600
    while not list(state.glob("smoke-cifar10-alexnet-full-*.r0.e0001.*.pt")) and time.monotonic() < deadline:
        assert killed.poll() is None, killed.communicate()[0]
        time.sleep(0.05)
    _kill_tree(killed.pid)
    killed.communicate(timeout=60)
    run = runs / "smoke" / "cifar10" / "alexnet" / "full"
    assert not (run / "meta.json").exists() and (run.with_name("full.running")).is_dir()

    again = _transferstudy(root, runs)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "an interrupted run was left in full.running" in out and "cifar10/alexnet/full: ok" in out
    meta = json.loads((run / "meta.json").read_text())
    assert meta["resumed_from_epoch"] >= 1 and meta["epochs_run"] == 2
    assert not list(state.iterdir())  # the finished run's state is gone
    reference = tmp_path / "whole" / "smoke" / "cifar10" / "alexnet" / "full"
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    import numpy as np
    a, b = np.load(run / "predictions.npz"), np.load(reference / "predictions.npz")
    np.testing.assert_array_equal(a["probs"], b["probs"])  # bit-identical, not just the same argmax
    ours = torch.load(run / "bundle" / "checkpoint.pt", weights_only=True)
    theirs = torch.load(reference / "bundle" / "checkpoint.pt", weights_only=True)
    for name, tensor in theirs.items():
        assert torch.equal(tensor, ours[name]), name
