"""Execute the study's matrix of notebooks with papermill into the results store.

Each run goes to ``<runs>/<profile>/<dataset>/<model>/<regime>/``. It is executed in a
``.running`` folder beside it and moved into place only when the notebook succeeded, so a
failure never overwrites a finished result; the failed attempt is kept as ``.failed``.
A run whose fingerprint (settings, notebook, library code and versions, data listing) is unchanged
since its last success is skipped.

Before anything runs, the ``-p`` settings are checked once for the whole matrix
(:func:`config.check_overrides`), and each selected run folder is locked (``<regime>.lock`` beside it:
the holder's pid and host, :class:`RunLock`), so a second runner on the same runs stops at once with
a message naming the holder. Then every run folder a killed runner left behind is put right
(:func:`recover`): a finished ``.running`` folder is swapped into place, an unfinished one is kept as
the run's ``.failed`` attempt, a ``.old`` one is put back or removed (:func:`results.swap_into_place`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import functools
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import config, preflight
from .report.store import write_table
from .results import read_json, recover_swap, swap_into_place, write_json

try:
    import fcntl
except ImportError:  # not Unix: the lock relies on the recorded pid alone
    fcntl = None  # type: ignore[assignment]

PACKAGE_DIR = Path(__file__).parent
NOTEBOOK_DIR = PACKAGE_DIR.parent.parent / "notebooks"
NOTEBOOKS = {
    "frozen_svm": "01_frozen_svm.ipynb",
    "linear_probe": "02_linear_probe.ipynb",
    "partial": "03_partial_finetune.ipynb",
    "full": "04_full_finetune.ipynb",
    "classical": "05_classical_on_embeddings.ipynb",
    "feature_reuse": "07_feature_reuse.ipynb",
    "data_scarcity": "08_data_scarcity.ipynb",
    "stats_transfer": "09_stats_transfer.ipynb",
}
# The runs whose folders a run reads (so they are locked with it, and their meta.json is part of its fingerprint):
# the classical regime's fine-tune (source_regime), the feature-reuse analysis's two fine-tunes, the
# statistics-transfer analysis's full fine-tune (its weight transfer).
SOURCES = {"feature_reuse": {"partial_dir": "partial", "full_dir": "full"}, "stats_transfer": {"full_dir": "full"}}


class RunnerError(ValueError):
    """Bad arguments to the runner (unknown override, missing notebook, ...)."""


class LockHeld(RunnerError):
    """Another live process holds the lock of a run folder."""


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
    specs = [RunSpec(d, m, r) for d in config.DATASETS for m in config.MODELS for r in config.NOTEBOOKS]
    if only is not None and not only.replace(",", "").strip():
        raise RunnerError(f"--only {only!r} names no run; leave --only out to run every run, or name runs as "
                          f"dataset/model/regime globs, e.g. cifar10/alexnet/full or '*/deit_base/*'")
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
    """The papermill parameters of one run: identity, paths, and the overrides its notebook reads.

    ``overrides`` are checked for this run (:func:`config.check_overrides`): a name its notebook does
    not read, a bad value, or a name that says which run (model, dataset, ...) is a ConfigError, never
    dropped. No value is passed as ``config.NONE``: a notebook parameter of None keeps the profile's value.
    """
    key = (spec.regime, spec.model, spec.dataset)
    checked = config.check_overrides(overrides, [key], profile)[key]
    settings = config.resolve(spec.regime, spec.model, spec.dataset, profile, checked)
    params = {"model": spec.model, "dataset": spec.dataset, "profile": profile,
              "data_dir": str(Path(data_root).resolve() / spec.dataset),
              "output_dir": str(run_dir.resolve()),
              "cache_dir": str((Path(runs_root) / ".cache").resolve())}
    for name, regime in sources(spec, settings).items():
        params[name] = str(run_dir_for(runs_root, profile, RunSpec(spec.dataset, spec.model, regime)).resolve())
    params.update(checked)
    if params.get("weights_path") not in (None, config.NONE):  # the notebook runs in its run folder, not here
        params["weights_path"] = str(Path(params["weights_path"]).expanduser().resolve())
    return params


def sources(spec: RunSpec, settings: dict[str, Any]) -> dict[str, str]:
    """{notebook parameter: regime} of the runs whose folders ``spec``'s notebook reads (``settings``: its own)."""
    if spec.regime == "classical":
        return {"source_dir": settings["source_regime"]}
    return dict(SOURCES.get(spec.regime, {}))


# Packages whose version can change a run's numbers; part of the fingerprint.
FINGERPRINT_PACKAGES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "scipy", "pillow", "papermill")
_DATA_SIGNATURES: dict[str, str] = {}


@functools.cache
def _versions() -> str:
    from importlib import metadata

    found = {}
    for name in FINGERPRINT_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return json.dumps({"python": platform.python_version(), **found}, sort_keys=True)


def data_signature(data_dir: str | Path) -> str:
    """What identifies a dataset folder's content cheaply: each file's path and size (not its bytes).

    Computed once per folder and process (a walk of stat calls: a fraction of a second for CIFAR-10).
    """
    root = Path(data_dir).resolve()
    if str(root) not in _DATA_SIGNATURES:
        h = hashlib.sha256()
        if not root.is_dir():
            h.update(b"missing")
        stack, seen = ([root] if root.is_dir() else []), set()
        while stack:
            folder = stack.pop()
            if os.path.realpath(folder) in seen:  # a symlink loop
                continue
            seen.add(os.path.realpath(folder))
            with os.scandir(folder) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if entry.is_dir(follow_symlinks=True):
                        h.update(f"{os.path.relpath(entry.path, root)}/\n".encode())
                        stack.append(Path(entry.path))
                    else:
                        rel = os.path.relpath(entry.path, root)
                        h.update(f"{rel}\0{entry.stat(follow_symlinks=True).st_size}\n".encode())
        _DATA_SIGNATURES[str(root)] = h.hexdigest()
    return _DATA_SIGNATURES[str(root)]


def fingerprint(spec: RunSpec, profile: str, params: dict[str, Any], code: str) -> str:
    """What a finished run depends on: the settings it reads, its notebook, the library and the versions of
    the packages it computes with, its data (the folder and its files' listing), a weights file, and for the
    classical regime the fine-tune it reads.

    A setting the regime does not read (``config.NOT_IN_NOTEBOOK``) is left out, so changing it does not
    redo the run; everything else that can change the run's output is in.
    """
    run_names = set(config.run_names(spec.regime))
    settings = config.resolve(spec.regime, spec.model, spec.dataset, profile,
                              {k: v for k, v in params.items() if k not in run_names})
    reads = config.notebook_names(spec.regime) | set(config.IDENTITY)
    settings = {k: v for k, v in settings.items() if k in reads}
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(params["data_dir"].encode())
    h.update(data_signature(params["data_dir"]).encode())
    h.update(notebook_path(spec.regime).read_bytes())
    h.update(code.encode())
    h.update(_versions().encode())
    weights = settings.get("weights_path")
    if weights:
        path = Path(weights).expanduser()
        stat = path.stat() if path.is_file() else None
        h.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode() if stat else b"weights missing")
    for name in sorted(sources(spec, settings)):  # the fine-tunes it reads
        source_meta = Path(params[name]) / "meta.json"
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


# --- locks ----------------------------------------------------------------------------------------

_HELD: dict[Path, RunLock] = {}  # the run folders this process holds, so that a nested execute() does not wait on itself


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _lock_record() -> dict[str, Any]:
    stat = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": stat[1] if stat else None,
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else None}


def holder_alive(record: dict[str, Any]) -> bool | None:
    """Whether the process a lock record names still runs: None when it ran on another host (cannot tell)."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False  # an unreadable record: nobody to wait for
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process, alive
    stat = _proc_stat(pid)
    if stat is not None:
        state, ticks = stat
        if state in ("Z", "X"):  # exited, not yet reaped
            return False
        if record.get("start_ticks") is not None and ticks != record["start_ticks"]:
            return False  # the pid was reused by a later process
    return True


class RunLock:
    """The lock of one run folder: ``<regime>.lock`` beside it, holding the holder's pid, host and command.

    Taken with ``flock`` where there is one (the kernel releases it when the holder dies, and two
    processes taking over the same stale lock cannot both win), and checked against the recorded pid: a
    record of a live process on this host is respected, one of a dead process (or a reused pid) is taken
    over and reported, one from another host is respected (this host cannot tell whether it still runs).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.with_name(self.run_dir.name + ".lock")
        self.fd: int | None = None
        self.took_over: dict[str, Any] | None = None

    def try_acquire(self) -> dict[str, Any] | None:
        """Take the lock: None when taken, else the record of its live (or unknowable) holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        return self._read(fd) or {"pid": None, "host": None}
                    try:  # a holder that released the lock may have removed the file meanwhile: start again
                        if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                            continue
                    except FileNotFoundError:
                        continue
                record = self._read(fd)
                if record is not None and not (record.get("pid") == os.getpid()
                                               and record.get("host") == socket.gethostname()):
                    if holder_alive(record) is not False:
                        return record
                    self.took_over = record
                payload = json.dumps(_lock_record()).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, payload, 0)
                os.fsync(fd)
                self.fd, fd = fd, -1
                _HELD[self.run_dir.resolve()] = self
                return None
            finally:
                if fd >= 0:
                    os.close(fd)

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        data = os.pread(fd, 65536, 0)
        if not data.strip():
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return {"pid": None, "host": socket.gethostname(), "unreadable": data[:200].decode(errors="replace")}
        return record if isinstance(record, dict) else {"pid": None, "host": socket.gethostname()}

    def acquire(self, wait: float = 0.0, poll: float = 0.5) -> None:
        """Take the lock, waiting up to ``wait`` seconds for its holder; LockHeld naming the holder otherwise."""
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            holder = self.try_acquire()
            if holder is None:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockHeld(self.held_message(holder, wait))
            time.sleep(min(poll, left))

    def held_message(self, holder: dict[str, Any], waited: float = 0.0) -> str:
        who = (f"pid {holder['pid']} on {holder.get('host')}" if holder.get("pid") else "another process")
        since = f", running since {holder['started']}" if holder.get("started") else ""
        what = f": {holder['command']}" if holder.get("command") else ""
        text = f"{self.run_dir} is being run by {who}{since}{what} (lock file {self.path})"
        text += f"; waited {waited:g} s" if waited > 0 else ""
        if holder_alive(holder) is None and holder.get("host"):
            return (f"{text}. That is another machine, so this one cannot tell whether it still runs; wait for it, "
                    f"or, if it is gone, remove {self.path}")
        return f"{text}. Wait for it to finish, or pass --wait SECONDS to wait for it"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)  # before unlocking: a waiter then sees a new file, not this one
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None
            _HELD.pop(self.run_dir.resolve(), None)


@contextlib.contextmanager
def hold(run_dirs: Sequence[Path], wait: float = 0.0) -> Iterator[list[str]]:
    """Lock every run folder of ``run_dirs`` (those this process holds already are skipped), in one order
    so that two runners waiting on each other cannot deadlock; yields a line per stale lock taken over."""
    deadline = time.monotonic() + max(0.0, wait)
    taken: list[RunLock] = []
    notes: list[str] = []
    try:
        for run_dir in sorted({Path(d).resolve() for d in run_dirs}):
            if run_dir in _HELD:
                continue
            lock = RunLock(run_dir)
            lock.acquire(wait=max(0.0, deadline - time.monotonic()))
            taken.append(lock)
            if lock.took_over is not None:
                old = lock.took_over
                notes.append(f"{run_dir}: took over the lock of pid {old.get('pid')} on {old.get('host')}, "
                             f"which no longer runs")
        yield notes
    finally:
        for lock in reversed(taken):
            lock.release()


# --- recovery --------------------------------------------------------------------------------------


def _finished(folder: Path) -> bool:
    """A run folder the runner finished: the notebook's meta.json says ok and the runner added its fingerprint."""
    try:
        meta = read_json(Path(folder) / "meta.json")
    except (OSError, ValueError):
        return False
    return meta.get("status") == "ok" and "fingerprint" in meta


def _keep_failed(final: Path, stage: Path, error: str, **meta: Any) -> Path:
    """Keep the attempt in ``stage`` as ``<run>.failed`` (replacing an earlier failure) with its error."""
    failed = final.with_name(final.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    stage.rename(failed)
    names = final.resolve().parts  # <runs>/<profile>/<dataset>/<model>/<regime>
    profile, dataset, model, regime = (names[-4:] if len(names) >= 4 else (None, None, None, final.name))
    write_json(failed / "meta.json", {"status": "failed", "error": error, "model": model, "dataset": dataset,
                                      "regime": regime, "profile": profile, **meta})
    return failed


def recover(final: Path) -> list[str]:
    """Put right what an interrupted runner left beside run folder ``final``; a line for each thing done.

    A finished ``.running`` folder is swapped into place and a ``.old`` one put back or removed
    (:func:`results.recover_swap`); an unfinished ``.running`` folder (a killed run) is kept as the
    run's ``.failed`` attempt, marked ``interrupted``. Call it holding the run's lock.
    """
    final = Path(final)
    done = recover_swap(final, finished=_finished)
    stage = final.with_name(final.name + ".running")
    if stage.is_dir():
        failed = _keep_failed(final, stage, "interrupted: the runner stopped before this run finished "
                                            "(its .running folder was found at the next start)", interrupted=True)
        done.append(f"{final}: an interrupted run was left in {stage.name}; kept as {failed.name}")
    return done


def recover_store(profile_dir: Path) -> list[str]:
    """``recover`` every run folder under ``profile_dir`` that has a ``.running`` or ``.old`` folder beside it,
    taking its lock for the while (runs whose lock a live process holds are left to it)."""
    done: list[str] = []
    profile_dir = Path(profile_dir)
    leftovers = sorted({p.with_name(p.name.rsplit(".", 1)[0]) for pattern in ("*/*/*.running", "*/*/*.old")
                        for p in profile_dir.glob(pattern) if p.is_dir()})
    for final in leftovers:
        if final.resolve() in _HELD:
            done += recover(final)
            continue
        lock = RunLock(final)
        if lock.try_acquire() is not None:
            continue  # a live runner is on it
        try:
            if lock.took_over is not None:
                done.append(f"{final}: took over the lock of pid {lock.took_over.get('pid')} on "
                            f"{lock.took_over.get('host')}, which no longer runs")
            done += recover(final)
        finally:
            lock.release()
    return done


# --- running -----------------------------------------------------------------------------------------


def execute(spec: RunSpec, profile: str, data_root: Path, runs_root: Path, overrides: dict[str, Any],
            force: bool = False, code: str | None = None, report: Callable[[str], None] | None = None) -> Outcome:
    """Run one notebook; skip it when its last success has the same fingerprint.

    ``overrides`` are checked for this run first (``notebook_parameters``). The run folder is locked for the
    while (LockHeld when a live process holds it) and what an interrupted runner left there is put right.
    """
    code = code or _code_digest()
    final = run_dir_for(runs_root, profile, spec)
    params = notebook_parameters(spec, profile, data_root, final, runs_root, overrides)
    with hold([final]) as notes:
        for line in notes + recover(final):
            if report is not None:
                report(line)
        return _execute_locked(spec, profile, final, params, force, code)


def _execute_locked(spec: RunSpec, profile: str, final: Path, params: dict[str, Any], force: bool,
                    code: str) -> Outcome:
    digest = fingerprint(spec, profile, params, code)
    meta_file = final / "meta.json"
    failed = final.with_name(final.name + ".failed")
    try:
        unchanged = not force and read_json(meta_file).get("fingerprint") == digest
    except (OSError, ValueError):  # no result yet, or an unreadable one: run it
        unchanged = False
    if unchanged:
        if (failed / "meta.json").is_file() and read_json(failed / "meta.json").get("interrupted"):
            shutil.rmtree(failed)  # an interrupted redo of this same run: the result in place is current
        return Outcome(spec, "skipped", 0.0, final)

    stage = final.with_name(final.name + ".running")
    stage.mkdir(parents=True)
    params["output_dir"] = str(stage.resolve())
    started = time.time()
    try:
        execute_notebook(notebook_path(spec.regime), stage / "notebook.ipynb", params, stage)
        meta = read_json(stage / "meta.json")  # the notebook's last step writes it
    except Exception as exc:  # papermill raises its own error types and kernel errors
        error = _error_of(exc)
        where = _keep_failed(final, stage, error, wall_s=round(time.time() - started, 2), fingerprint=digest,
                             pretrained=_pretrained(spec, profile, params))
        return Outcome(spec, "failed", time.time() - started, where, error)
    except BaseException:  # interrupted (Ctrl-C): keep the attempt as failed, then stop
        _keep_failed(final, stage, "interrupted (KeyboardInterrupt or exit) before the run finished",
                     interrupted=True, wall_s=round(time.time() - started, 2))
        raise

    meta["fingerprint"] = digest
    write_json(stage / "meta.json", meta)
    try:
        swap_into_place(stage, final)
    except Exception as exc:  # the finished run stays in stage; recover() moves it in at the next start
        error = (f"could not move the finished run into place ({_error_of(exc)}); it is kept in {stage} and "
                 f"moved in when this run is next started")
        return Outcome(spec, "failed", time.time() - started, stage, error)
    shutil.rmtree(failed, ignore_errors=True)
    return Outcome(spec, "ok", time.time() - started, final)


def _pretrained(spec: RunSpec, profile: str, params: dict[str, Any]) -> bool | None:
    """Whether the run asked for ImageNet weights (what its rerun command must keep), even when it failed before
    its notebook recorded its settings."""
    try:
        return config.resolve(spec.regime, spec.model, spec.dataset, profile,
                              {k: v for k, v in params.items() if k not in config.run_names(spec.regime)})["pretrained"]
    except config.ConfigError:
        return None


def _unread_notes(overrides: dict[str, Any], specs: Sequence[RunSpec]) -> list[str]:
    """A line for each -p setting that some of the selected runs do not read (it is not passed to them)."""
    notes = []
    regimes = sorted({s.regime for s in specs}, key=config.NOTEBOOKS.index)
    for name in overrides:
        skip = [r for r in regimes if name not in config.notebook_names(r)]
        if skip and len(skip) < len(regimes):
            why = "; ".join(f"{r}: {config.NOT_IN_NOTEBOOK[r][name]}" for r in skip if name in config.NOT_IN_NOTEBOOK.get(r, {}))
            notes.append(f"note: -p {name} applies to the {', '.join(r for r in regimes if r not in skip)} runs; "
                         f"the {', '.join(skip)} runs do not read it{f' ({why})' if why else ''}")
    return notes


def _unapplied_notes(overrides: dict[str, Any], specs: Sequence[RunSpec],
                     per_run: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    """A line for each -p setting that some selected runs read but would not apply (``config.APPLIES``): it is
    given only to the others."""
    notes = []
    for name in (n for n in overrides if n in config.APPLIES):
        left = [s.key for s in specs if name in config.notebook_names(s.regime)
                and name not in per_run[(s.regime, s.model, s.dataset)]]
        if left:
            on, values, why = config.APPLIES[name]
            notes.append(f"note: -p {name} is not given to {', '.join(left)}, which would not apply it ({why}: "
                         f"they do not have {on} {' or '.join(map(str, values))})")
    return notes


def run_matrix(profile: str, data_root: Path, runs_root: Path, overrides: dict[str, Any] | None = None,
               only: str | None = None, force: bool = False,
               report: Callable[[str], None] = print, wait: float = 0.0) -> list[Outcome]:
    """Execute the (filtered) matrix; a failing run is reported and the others still run.

    Before anything runs: the overrides are checked once for every selected run (one ConfigError naming
    each bad setting), the selected run folders (and the fine-tunes their classical runs read) are locked
    (LockHeld naming the holder, after waiting up to ``wait`` seconds), and what interrupted runners left
    in the profile's folder is put right (``recover_store``).
    """
    from tqdm import tqdm

    overrides = dict(overrides or {})
    config.resolve("full", config.MODELS[0], config.DATASETS[0], profile)  # unknown profile -> clear error
    specs = matrix(only)
    per_run = config.check_overrides(overrides, [(s.regime, s.model, s.dataset) for s in specs], profile)
    settings = {s: config.resolve(s.regime, s.model, s.dataset, profile, per_run[(s.regime, s.model, s.dataset)])
                for s in specs}
    preflight.check_runs([(s.regime, s.model, s.dataset, settings[s]) for s in specs],  # the data, the split sizes,
                         Path(data_root))                                               # the weights: up front
    notes = _unread_notes(overrides, specs) + _unapplied_notes(overrides, specs, per_run)
    _DATA_SIGNATURES.clear()  # the data may have changed since an earlier call in this process
    code = _code_digest()
    root = Path(runs_root)
    folders = [run_dir_for(root, profile, s) for s in specs]
    for s in specs:  # the fine-tunes a run reads: nobody may swap them meanwhile
        folders += [run_dir_for(root, profile, RunSpec(s.dataset, s.model, r)) for r in sources(s, settings[s]).values()]
    outcomes = []
    with hold(folders, wait=wait) as taken:
        bar = tqdm(specs, desc=f"study ({profile})", unit="run", mininterval=1.0)
        say = bar.write if report is print else report
        for line in notes + taken + recover_store(root / profile):
            say(line)
        for i, spec in enumerate(bar, 1):
            bar.set_postfix_str(spec.key)
            outcome = execute(spec, profile, data_root, runs_root, per_run[(spec.regime, spec.model, spec.dataset)],
                              force=force, code=code, report=say)
            outcomes.append(outcome)
            line = f"[{i}/{len(specs)}] {spec.key}: {outcome.status} ({outcome.seconds:.0f} s)"
            if outcome.error:
                line += f" -- {outcome.error.splitlines()[0]}  (see {outcome.run_dir / 'notebook.ipynb'})"
            say(line)
            write_table(root / profile)
    return outcomes
