"""Execute the study's matrix of notebooks with papermill into the results store.

Each run goes to ``<runs>/<profile>/<dataset>/<model>/<regime>/``. It is executed in a
``.running`` folder beside it and moved into place only when the notebook succeeded, so a
failure never overwrites a finished result; the failed attempt is kept as ``.failed``.
A run whose settings, notebook and library code are unchanged since its last success is skipped.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import config
from .results import read_json, swap_into_place, write_json, write_table

PACKAGE_DIR = Path(__file__).parent
NOTEBOOK_DIR = PACKAGE_DIR.parent.parent / "notebooks"
NOTEBOOKS = {
    "frozen_svm": "01_frozen_svm.ipynb",
    "linear_probe": "02_linear_probe.ipynb",
    "partial": "03_partial_finetune.ipynb",
    "full": "04_full_finetune.ipynb",
    "classical": "05_classical_on_embeddings.ipynb",
}


class RunnerError(ValueError):
    """Bad arguments to the runner (unknown override, missing notebook, ...)."""


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    model: str
    regime: str

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.model}/{self.regime}"


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # ok | skipped | failed
    seconds: float
    run_dir: Path
    error: str | None = None


def matrix(only: str | None = None) -> list[RunSpec]:
    """Every dataset x model x regime, fine-tunes before the classifiers that read them.

    ``only`` is a glob over ``dataset/model/regime`` (``*deit*``, ``cifar10/*/full``); several
    globs may be given separated by commas.
    """
    specs = [RunSpec(d, m, r) for d in config.DATASETS for m in config.MODELS for r in config.NOTEBOOK_REGIMES]
    if only:
        globs = [g.strip() for g in only.split(",") if g.strip()]
        specs = [s for s in specs if any(fnmatch.fnmatch(s.key, g) for g in globs)]
        if not specs:
            raise RunnerError(f"--only {only!r} matches no run; runs are named dataset/model/regime, "
                              f"e.g. cifar10/alexnet/full")
    return specs


def _code_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.glob("*.py")) + sorted(PACKAGE_DIR.glob("*.yaml")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def notebook_path(regime: str) -> Path:
    path = NOTEBOOK_DIR / NOTEBOOKS[regime]
    if not path.exists():
        raise RunnerError(f"notebook {path} is missing; the runner expects the project's notebooks/ folder "
                          f"beside lib/ (an editable install: pip install -e .)")
    return path


def run_dir_for(runs_root: Path, profile: str, spec: RunSpec) -> Path:
    return Path(runs_root) / profile / spec.dataset / spec.model / spec.regime


def notebook_parameters(spec: RunSpec, profile: str, data_root: Path, run_dir: Path, runs_root: Path,
                        overrides: dict[str, Any]) -> dict[str, Any]:
    """The papermill parameters of one run: identity, paths, and the overrides this regime has."""
    settings = config.resolve(spec.regime, spec.model, spec.dataset, profile)
    params = {"model": spec.model, "dataset": spec.dataset, "profile": profile,
              "data_dir": str(Path(data_root).resolve() / spec.dataset),
              "output_dir": str(run_dir.resolve()),
              "cache_dir": str((Path(runs_root) / ".cache").resolve())}
    if spec.regime == "classical":
        source = RunSpec(spec.dataset, spec.model, settings["source_regime"])
        params["source_dir"] = str(run_dir_for(runs_root, profile, source).resolve())
    params.update({k: v for k, v in overrides.items() if k in settings})
    return params


def fingerprint(spec: RunSpec, profile: str, params: dict[str, Any], code: str) -> str:
    """What a finished run depends on: its resolved settings, its notebook, the library, its inputs."""
    settings = config.resolve(spec.regime, spec.model, spec.dataset, profile,
                              {k: v for k, v in params.items() if k not in
                               ("model", "dataset", "profile", "data_dir", "output_dir", "cache_dir", "source_dir")})
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(params["data_dir"].encode())
    h.update(notebook_path(spec.regime).read_bytes())
    h.update(code.encode())
    if "source_dir" in params:  # the classical regime reads a fine-tuned model
        source_meta = Path(params["source_dir"]) / "meta.json"
        h.update(source_meta.read_bytes() if source_meta.exists() else b"missing")
    return h.hexdigest()


def _error_of(exc: BaseException) -> str:
    name = getattr(exc, "ename", None) or type(exc).__name__
    value = getattr(exc, "evalue", None) or str(exc)
    return f"{name}: {value}".strip()[:2000]


def execute_notebook(source: Path, output: Path, parameters: dict[str, Any], cwd: Path) -> None:
    """Execute a notebook with papermill, quietly: no progress bar, no cell output in the log.

    On Unix the kernel talks over Unix sockets instead of plain-text loopback TCP, which other local
    users could read (ipykernel warns about it at every start, burying the runner's own lines).
    """
    import papermill as pm

    extra: dict[str, Any] = {"kernel_manager_class": _ipc_kernel_manager()} if os.name == "posix" else {}
    pm.execute_notebook(str(source), str(output), parameters=parameters, kernel_name="python3",
                        progress_bar=False, log_output=False, cwd=str(cwd), **extra)


def _ipc_kernel_manager() -> type:
    from jupyter_client import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IpcKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    return IpcKernelManager


def execute(spec: RunSpec, profile: str, data_root: Path, runs_root: Path, overrides: dict[str, Any],
            force: bool = False, code: str | None = None) -> Outcome:
    """Run one notebook; skip it when its last success has the same fingerprint."""
    code = code or _code_digest()
    final = run_dir_for(runs_root, profile, spec)
    params = notebook_parameters(spec, profile, data_root, final, runs_root, overrides)
    digest = fingerprint(spec, profile, params, code)
    meta_file = final / "meta.json"
    if not force and meta_file.exists() and read_json(meta_file).get("fingerprint") == digest:
        return Outcome(spec, "skipped", 0.0, final)

    stage = final.with_name(final.name + ".running")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    params["output_dir"] = str(stage.resolve())
    started = time.time()
    try:
        execute_notebook(notebook_path(spec.regime), stage / "notebook.ipynb", params, stage)
        meta = read_json(stage / "meta.json")  # the notebook's last step writes it
    except Exception as exc:  # papermill raises its own error types and kernel errors
        failed = final.with_name(final.name + ".failed")
        shutil.rmtree(failed, ignore_errors=True)
        stage.rename(failed)
        error = _error_of(exc)
        write_json(failed / "meta.json", {"status": "failed", "error": error, "model": spec.model,
                                          "dataset": spec.dataset, "regime": spec.regime, "profile": profile,
                                          "wall_s": round(time.time() - started, 2), "fingerprint": digest})
        return Outcome(spec, "failed", time.time() - started, failed, error)

    meta["fingerprint"] = digest
    write_json(stage / "meta.json", meta)
    swap_into_place(stage, final)
    shutil.rmtree(final.with_name(final.name + ".failed"), ignore_errors=True)
    return Outcome(spec, "ok", time.time() - started, final)


def run_matrix(profile: str, data_root: Path, runs_root: Path, overrides: dict[str, Any] | None = None,
               only: str | None = None, force: bool = False,
               report: Callable[[str], None] = print) -> list[Outcome]:
    """Execute the (filtered) matrix; a failing run is reported and the others still run."""
    from tqdm import tqdm

    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - config.all_keys())
    if unknown:
        raise RunnerError(f"-p {unknown[0]}: no notebook has this parameter; "
                          f"known parameters: {', '.join(sorted(config.all_keys()))}")
    config.resolve("full", config.MODELS[0], config.DATASETS[0], profile)  # unknown profile -> clear error
    specs = matrix(only)
    code = _code_digest()
    outcomes = []
    bar = tqdm(specs, desc=f"study ({profile})", unit="run", mininterval=1.0)
    for i, spec in enumerate(bar, 1):
        bar.set_postfix_str(spec.key)
        outcome = execute(spec, profile, data_root, runs_root, overrides, force=force, code=code)
        outcomes.append(outcome)
        line = f"[{i}/{len(specs)}] {spec.key}: {outcome.status} ({outcome.seconds:.0f} s)"
        if outcome.error:
            line += f" -- {outcome.error.splitlines()[0]}  (see {outcome.run_dir / 'notebook.ipynb'})"
        bar.write(line) if report is print else report(line)
        write_table(Path(runs_root) / profile)
    return outcomes
