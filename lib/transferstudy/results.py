"""The results store's writers: one folder per run, every file written atomically.

A run folder holds ``params.json`` (its resolved settings), ``split.json`` (indices and hash),
``metrics.json``, ``curves.csv`` (per epoch, where there is training), ``predictions.npz``
(test labels, predictions, probabilities), ``embeddings.npz`` (for the figures), the executed
``notebook.ipynb`` and ``meta.json`` (status, provenance, wall time, peak resident memory), which
is written last. ``report.store`` is the one reader of these folders (and writes the table across runs).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

def peak_rss_mb(who: str = "self") -> float:
    """Peak resident memory in MiB of this process (``"self"``) or of its largest finished child (``"children"``)."""
    import resource  # Unix only; the study's machines are Linux (and macOS, which counts bytes)

    usage = resource.getrusage(resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN).ru_maxrss
    return usage / (2**20 if sys.platform == "darwin" else 2**10)


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's umask, which a plain open() would apply


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (identifies a weights file or a checkpoint; checks a training state's file)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes the file private (0600); results are shared like any file
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- swapping a finished run folder into place ------------------------------------------------------
#
# A run is made in ``<run>.running`` beside its folder ``<run>``; when it has finished, the swap is
#   1. ``<run>`` -> ``<run>.old``       (only when there is a previous result)
#   2. ``<run>.running`` -> ``<run>``
#   3. remove ``<run>.old``
# Each step is one rename (atomic within a filesystem) or a removal, and the names say what each folder
# holds: ``.running`` the newest attempt, ``.old`` the previous result. So after a crash between any two
# steps a finished result is in ``<run>`` or ``<run>.running``, the previous one in ``<run>`` or
# ``<run>.old``, and ``recover_swap`` (run on the next start, under the run's lock) completes the swap
# or puts the previous result back. An error in step 2 puts the previous result back at once.


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _remove(path: Path) -> None:
    shutil.rmtree(path)


def _sync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def swap_into_place(stage: Path, final: Path) -> None:
    """Move a finished run folder ``stage`` to ``final``; the old ``final`` is removed only after the move.

    ``stage`` is ``<run>.running`` (its name is what tells ``recover_swap`` that it is the newer one).
    """
    stage, final = Path(stage), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        if final.exists():
            _remove(old)  # left by step 3 of an earlier swap
        # else: old is the previous result, left between steps 1 and 2; step 2 supersedes it
    if final.exists():
        _rename(final, old)  # 1
    try:
        _rename(stage, final)  # 2
    except Exception:
        if old.exists() and not final.exists():
            _rename(old, final)  # the previous result back; the finished one stays in stage
        raise
    _sync_dir(final.parent)
    if old.exists():
        _remove(old)  # 3


def run_finished(folder: Path) -> bool:
    """Whether ``folder`` holds a finished run: its ``meta.json`` (written last) says status ok."""
    try:
        return read_json(Path(folder) / "meta.json").get("status") == "ok"
    except (OSError, ValueError):
        return False


def recover_swap(final: Path, finished: Any = run_finished) -> list[str]:
    """Finish or undo a swap into ``final`` that a crash interrupted; what was done, one line each.

    ``<run>.running`` that is ``finished`` is swapped into place (it is the newest result); a ``<run>.old``
    is put back when ``<run>`` is missing and removed otherwise. An unfinished ``<run>.running`` is left
    for the caller (the runner keeps it as the run's failed attempt). Call it holding the run's lock.
    """
    final = Path(final)
    stage = final.with_name(final.name + ".running")
    old = final.with_name(final.name + ".old")
    done: list[str] = []
    if stage.is_dir() and finished(stage):
        swap_into_place(stage, final)
        done.append(f"{final}: moved in the finished run that an interrupted runner left in {stage.name}")
    if old.is_dir():
        if final.exists():
            _remove(old)
            done.append(f"{final}: removed {old.name}, the previous result an interrupted swap left behind")
        else:
            _rename(old, final)
            _sync_dir(final.parent)
            done.append(f"{final}: put back the previous result from {old.name} (an interrupted swap)")
    return done


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def write_state_dict(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` a state dict atomically (a checkpoint is never seen half-written)."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def provenance(device: str, pretrained: bool) -> dict[str, Any]:
    """Where a number came from: versions, device, date, and whether weights were pretrained."""
    import timm
    import torch
    import torchvision

    return {"device": device, "pretrained": bool(pretrained), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "host_cpu": platform.processor() or platform.machine(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


@dataclass
class RunRecorder:
    """Collects one run's outputs into its folder; ``finish`` writes ``meta.json`` last."""

    run_dir: Path
    params: dict[str, Any]
    started: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "params.json", self.params)

    def save_split(self, split_hash: str, indices: dict[str, list[int]], info: dict) -> None:
        self.meta["split_hash"] = split_hash
        write_json(self.run_dir / "split.json", {"split_hash": split_hash, "info": info, "indices": indices})

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.run_dir / "metrics.json", metrics)

    def save_curves(self, frame: pd.DataFrame) -> None:
        atomic_write_bytes(self.run_dir / "curves.csv", frame.to_csv(index=False).encode())

    def save_predictions(self, y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray | None,
                         files: list[str]) -> None:
        arrays = {"y_true": np.asarray(y_true), "y_pred": np.asarray(y_pred), "files": np.asarray(files)}
        if probs is not None:
            arrays["probs"] = np.asarray(probs, dtype=np.float32)
        write_npz(self.run_dir / "predictions.npz", **arrays)

    def save_embeddings(self, name: str, X: np.ndarray, y: np.ndarray) -> None:
        write_npz(self.run_dir / f"embeddings-{name}.npz", X=np.asarray(X, dtype=np.float32), y=np.asarray(y))

    def finish(self, **meta: Any) -> dict[str, Any]:
        """Record status ok, wall time and provenance; call it as the notebook's last step."""
        self.meta.update(meta)
        self.meta.update(status="ok", wall_s=round(time.time() - self.started, 2), peak_rss_mb=round(peak_rss_mb()),
                         **{k: self.params[k] for k in ("model", "dataset", "regime", "profile")})
        write_json(self.run_dir / "meta.json", self.meta)
        return self.meta
