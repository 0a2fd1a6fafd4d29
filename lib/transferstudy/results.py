"""The results store: one folder per run, written atomically, and one table across runs.

A run folder holds ``params.json`` (its resolved settings), ``split.json`` (indices and hash),
``metrics.json``, ``curves.csv`` (per epoch, where there is training), ``predictions.npz``
(test labels, predictions, probabilities), ``embeddings.npz`` (for the figures), the executed
``notebook.ipynb`` and ``meta.json`` (status, provenance, wall time, peak resident memory), which
is written last.
"""

from __future__ import annotations

import datetime as _dt
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

TABLE_COLUMNS = ["model", "dataset", "regime", "classifier", "status", "val_accuracy", "test_accuracy",
                 "test_macro_f1", "trainable", "total", "pretrained", "profile", "device", "wall_s",
                 "peak_rss_mb", "date", "split_hash", "error", "run_dir"]


def peak_rss_mb(who: str = "self") -> float:
    """Peak resident memory in MiB of this process (``"self"``) or of its largest finished child (``"children"``)."""
    import resource  # Unix only; the study's machines are Linux (and macOS, which counts bytes)

    usage = resource.getrusage(resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN).ru_maxrss
    return usage / (2**20 if sys.platform == "darwin" else 2**10)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def swap_into_place(stage: Path, final: Path) -> None:
    """Move a finished run folder ``stage`` to ``final``; the old ``final`` is removed only after the move."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    stage.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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


# --- the table across runs -------------------------------------------------------------


def _rows_for(run_dir: Path) -> list[dict[str, Any]]:
    meta = read_json(run_dir / "meta.json")
    base = {k: meta.get(k) for k in TABLE_COLUMNS if k in meta}
    base.update(run_dir=str(run_dir), status=meta.get("status", "ok"), classifier=None)
    metrics_file = run_dir / "metrics.json"
    metrics = read_json(metrics_file) if metrics_file.exists() else {}
    if base["status"] != "ok":
        return [base]
    if "classifiers" in metrics:
        rows = []
        for name, m in metrics["classifiers"].items():
            rows.append({**base, "classifier": name, "val_accuracy": m["val"]["accuracy"],
                         "test_accuracy": m["test"]["accuracy"], "test_macro_f1": m["test"]["macro_f1"]})
        return rows
    return [{**base, "classifier": metrics.get("classifier"),
             "val_accuracy": metrics.get("val", {}).get("accuracy"),
             "test_accuracy": metrics.get("test", {}).get("accuracy"),
             "test_macro_f1": metrics.get("test", {}).get("macro_f1")}]


def collect(root: Path) -> pd.DataFrame:
    """One row per run (per classifier for the classical regime) under ``root``.

    A failed attempt (``<run>.failed/meta.json``) newer than the run's last success shows as
    ``failed``, with its error; the earlier success stays on disk untouched.
    """
    rows: list[dict[str, Any]] = []
    root = Path(root)
    # run folders sit at <dataset>/<model>/<regime>/ under the profile's root
    for meta in sorted(root.glob("*/*/*/meta.json")):
        run_dir = meta.parent
        if run_dir.name.endswith((".running", ".failed", ".old")):
            continue
        failed = run_dir.with_name(run_dir.name + ".failed") / "meta.json"
        if failed.exists() and failed.stat().st_mtime > meta.stat().st_mtime:
            continue  # reported below, from the failure
        rows.extend(_rows_for(run_dir))
    for failed in sorted(root.glob("*/*/*.failed/meta.json")):
        ok = failed.parent.with_name(failed.parent.name.removesuffix(".failed")) / "meta.json"
        if not ok.exists() or failed.stat().st_mtime > ok.stat().st_mtime:
            rows.extend(_rows_for(failed.parent))
    frame = pd.DataFrame(rows, columns=TABLE_COLUMNS).astype({"trainable": "Int64", "total": "Int64"})
    return frame.sort_values(["dataset", "model", "regime", "classifier"], na_position="first",
                             ignore_index=True)


def write_table(root: Path) -> pd.DataFrame:
    frame = collect(root)
    atomic_write_bytes(Path(root) / "results.csv", frame.to_csv(index=False).encode())
    return frame
