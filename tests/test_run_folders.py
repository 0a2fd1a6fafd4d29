"""Run folders survive crashes and concurrent runners: the swap into place, recovery, and the lock per run.

Plain folders and a stand-in for the notebook step: no notebook is executed here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from transferstudy import cli, preflight, results, runner
from transferstudy.results import read_json, write_json

RUN = "cifar10/alexnet/frozen_svm"


class Crash(BaseException):
    """The process dies here: no except clause of the code under test runs (it catches Exception only)."""


def make_run(folder: Path, tag: str, fingerprint: bool = True) -> Path:
    """A finished run folder (meta.json written last, as the notebook and the runner do)."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"tag": tag}))
    write_json(folder / "meta.json", {"status": "ok", "tag": tag, **({"fingerprint": tag} if fingerprint else {})})
    return folder


def tag(folder: Path) -> str | None:
    return read_json(folder / "meta.json")["tag"] if (folder / "meta.json").is_file() else None


def inject(monkeypatch, at: int | None, error: type[BaseException] = Crash) -> list[str]:
    """Make the ``at``-th step (rename or removal) of the swap raise ``error``, once; returns the steps taken."""
    steps: list[str] = []
    real = {"_rename": results._rename, "_remove": results._remove}
    fired: list[bool] = []

    def step(name):
        def run(*args):
            if at is not None and len(steps) == at and not fired:
                fired.append(True)
                raise error(f"injected at step {at} ({name})")
            steps.append(name)
            real[name](*args)
        return run

    for name in real:
        monkeypatch.setattr(results, name, step(name))
    return steps


def leftovers(final: Path) -> set[str]:
    return {p.name for p in final.parent.iterdir() if p.name != final.name}


# --- the swap: a crash at any step hides nothing ----------------------------------------------------------


@pytest.mark.parametrize("previous", [True, False], ids=["over-a-result", "first-result"])
def test_a_crash_at_any_step_of_the_swap_or_of_its_recovery_loses_no_finished_result(previous, tmp_path,
                                                                                    monkeypatch):
    def setup(root: Path) -> tuple[Path, Path]:
        final = root / "smoke" / "cifar10" / "alexnet" / "full"
        if previous:
            make_run(final, "old")
        return make_run(final.with_name("full.running"), "new"), final

    stage, final = setup(tmp_path / "count")
    steps = inject(monkeypatch, None)
    results.swap_into_place(stage, final)
    monkeypatch.undo()
    assert steps == (["_rename", "_rename", "_remove"] if previous else ["_rename"])
    n_steps = len(steps)
    for k in range(n_steps):
        for j in range(4):  # then a second crash at step j of the next start's recovery (4: none)
            stage, final = setup(tmp_path / f"crash{k}-{j}")
            inject(monkeypatch, k)
            with pytest.raises(Crash):
                results.swap_into_place(stage, final)
            monkeypatch.undo()
            # nothing is lost: the new result and the previous one are both on disk, under names that say which
            assert "new" in {tag(final), tag(stage)}
            if previous:
                assert "old" in {tag(final), tag(final.with_name("full.old"))}
            inject(monkeypatch, j)
            try:
                runner.recover(final)
            except Crash:
                pass
            monkeypatch.undo()
            runner.recover(final)  # the start after that
            assert tag(final) == "new" and leftovers(final) == set(), (k, j)


def test_an_error_while_moving_in_puts_the_previous_result_back_at_once(tmp_path, monkeypatch):
    final = make_run(tmp_path / "full", "old")
    stage = make_run(tmp_path / "full.running", "new")
    inject(monkeypatch, 1, OSError)  # step 2: .running -> full
    with pytest.raises(OSError, match="injected at step 1"):
        results.swap_into_place(stage, final)
    monkeypatch.undo()
    assert tag(final) == "old" and tag(stage) == "new" and leftovers(final) == {"full.running"}
    assert runner.recover(final) == [f"{final}: moved in the finished run that an interrupted runner left in "
                                     f"full.running"]
    assert tag(final) == "new" and leftovers(final) == set()


def test_an_unfinished_running_folder_is_kept_as_the_failed_attempt(tmp_path):
    final = make_run(tmp_path / "smoke" / "cifar10" / "alexnet" / "full", "old")
    stage = final.with_name("full.running")
    stage.mkdir()
    (stage / "notebook.ipynb").write_text("{}")
    # the notebook finished (status ok) but the runner died before adding its fingerprint: not finished
    make_run(final.with_name("partial.running"), "half", fingerprint=False)
    lines = runner.recover(final) + runner.recover(final.with_name("partial"))
    assert len(lines) == 2 and all("an interrupted run was left in" in line for line in lines)
    assert tag(final) == "old"
    for name in ("full.failed", "partial.failed"):
        meta = read_json(final.with_name(name) / "meta.json")
        assert meta["status"] == "failed" and meta["interrupted"] is True and "interrupted" in meta["error"]
    assert (final.with_name("full.failed") / "notebook.ipynb").is_file()
    assert not final.with_name("partial").exists()


# --- the runner: crash points and leftovers, with a stand-in notebook ---------------------------------------


@pytest.fixture
def fake_notebooks(monkeypatch) -> list[dict]:
    """Replace the papermill step by one that writes a finished run; records each call's parameters."""
    calls: list[dict] = []

    def execute_notebook(source, output, parameters, cwd):
        calls.append(dict(parameters))
        out = Path(parameters["output_dir"])
        (out / "notebook.ipynb").write_text("{}")
        write_json(out / "metrics.json", {"classifiers": {"head": {
            "val": {"accuracy": 0.5, "macro_f1": 0.5}, "test": {"accuracy": 0.5, "macro_f1": 0.5, "per_class": {}}}},
            "best": "head"})
        write_json(out / "meta.json", {"status": "ok", "attempt": len(calls)})

    monkeypatch.setattr(runner, "execute_notebook", execute_notebook)
    monkeypatch.setattr(preflight, "check_runs", lambda runs, data_root: None)  # no data, no weights: not needed
    return calls


def matrix(tmp_path: Path, only: str = RUN, overrides: dict | None = None, **kwargs) -> tuple[list, list[str]]:
    lines: list[str] = []
    outcomes = runner.run_matrix("smoke", tmp_path / "data", tmp_path / "runs", overrides, only=only,
                                 report=lines.append, **kwargs)
    return outcomes, lines


def test_a_finished_run_not_yet_swapped_is_moved_in_at_the_next_start_and_counts_as_done(tmp_path, fake_notebooks,
                                                                                      monkeypatch):
    (outcome,), _ = matrix(tmp_path)
    final = outcome.run_dir
    assert outcome.status == "ok" and read_json(final / "meta.json")["attempt"] == 1
    inject(monkeypatch, 1)  # a forced redo dies between moving the old result aside and moving the new one in
    with pytest.raises(Crash):
        matrix(tmp_path, force=True)
    monkeypatch.undo()
    monkeypatch.setattr(preflight, "check_runs", lambda runs, data_root: None)  # undone above with the crash
    assert not final.exists() and final.with_name("frozen_svm.old").is_dir()
    (outcome,), lines = matrix(tmp_path)
    assert any("moved in the finished run that an interrupted runner left in frozen_svm.running" in line
               for line in lines), lines
    assert outcome.status == "skipped"  # the second attempt's result is in place and nothing changed since
    assert read_json(final / "meta.json")["attempt"] == 2 and leftovers(final) == set()
    assert len(fake_notebooks) == 2


def test_an_interrupted_run_keeps_the_last_result_and_is_recorded(tmp_path, fake_notebooks, monkeypatch):
    (outcome,), _ = matrix(tmp_path)
    final = outcome.run_dir

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        matrix(tmp_path, force=True)
    assert read_json(final / "meta.json")["attempt"] == 1
    assert read_json(final.with_name("frozen_svm.failed") / "meta.json")["interrupted"] is True
    assert not final.with_name("frozen_svm.lock").exists()  # released on the way out
    # the interrupted attempt has no outcome: the results table still shows the finished run (it is not hidden)
    from transferstudy.report import store

    assert store._latest(final) == final
    write_json(final.with_name("frozen_svm.failed") / "meta.json", {"status": "failed", "error": "a real failure"})
    assert store._latest(final) == final.with_name("frozen_svm.failed")  # a real, newer failure still wins


def test_leftovers_of_runs_not_selected_are_put_right_at_the_start(tmp_path, fake_notebooks):
    profile = tmp_path / "runs" / "smoke"
    killed = profile / "cifar10" / "alexnet" / "full.running"
    killed.mkdir(parents=True)
    old = make_run(profile / "ferplus" / "deit_base" / "partial.old", "previous")
    _, lines = matrix(tmp_path)
    assert any(f"{killed.with_name('full')}: an interrupted run was left in full.running" in line for line in lines)
    assert any("put back the previous result from partial.old" in line for line in lines), lines
    assert tag(old.with_name("partial")) == "previous" and not old.exists()
    assert read_json(killed.with_name("full.failed") / "meta.json")["interrupted"] is True


# --- fingerprints: "skipped (unchanged)" only when nothing changed -------------------------------------------


def test_a_run_is_skipped_only_when_nothing_it_reads_changed(tmp_path, fake_notebooks):
    data = tmp_path / "data" / "cifar10"
    data.mkdir(parents=True)
    (data / "a.jpg").write_bytes(b"x")
    both = "cifar10/alexnet/frozen_svm,cifar10/alexnet/linear_probe"
    status = lambda outcomes: [o.status for o in outcomes]  # noqa: E731
    assert status(matrix(tmp_path, both)[0]) == ["ok", "ok"]
    assert status(matrix(tmp_path, both)[0]) == ["skipped", "skipped"]
    # a setting only the probe reads redoes the probe alone
    assert status(matrix(tmp_path, both, {"batch_size": 8})[0]) == ["skipped", "ok"]
    assert fake_notebooks[-1]["batch_size"] == 8 and "batch_size" not in fake_notebooks[0]
    # none and all are the same request (the whole split), and differ from the profile's 20
    assert status(matrix(tmp_path, RUN, {"n_train": "all"})[0]) == ["ok"]
    assert fake_notebooks[-1]["n_train"] == "none"
    assert status(matrix(tmp_path, RUN, {"n_train": "none"})[0]) == ["skipped"]
    assert status(matrix(tmp_path, RUN)[0]) == ["ok"]
    # the data: a file added to the dataset folder
    (data / "b.jpg").write_bytes(b"y")
    assert status(matrix(tmp_path, RUN)[0]) == ["ok"]
    assert status(matrix(tmp_path, RUN)[0]) == ["skipped"]
    # a weights file's content
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"1")
    assert status(matrix(tmp_path, RUN, {"weights_path": str(weights)})[0]) == ["ok"]
    weights.write_bytes(b"22")
    assert status(matrix(tmp_path, RUN, {"weights_path": str(weights)})[0]) == ["ok"]


# --- the lock per run folder ----------------------------------------------------------------------------------


def lock_file(tmp_path: Path, run: str = RUN) -> Path:
    return tmp_path / "runs" / "smoke" / f"{run}.lock"


def write_lock(path: Path, pid: int, host: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "earlier",
                                "command": "transferstudy run"}))


def test_a_lock_of_a_live_process_stops_the_second_runner_naming_it_then_a_dead_ones_is_taken_over(
        tmp_path, fake_notebooks, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(lock_file(tmp_path), sleeper.pid)
        capsys.readouterr()
        code = cli.main(["run", "--profile", "smoke", "--data-root", str(tmp_path / "data"),
                         "--runs-dir", str(tmp_path / "runs"), "--only", RUN])
        err = capsys.readouterr().err
        assert code == 2
        assert (f"is being run by pid {sleeper.pid} on {socket.gethostname()}, running since earlier: "
                f"transferstudy run (lock file {lock_file(tmp_path)})") in err
        assert "--wait SECONDS" in err and "FileNotFoundError" not in err
        assert fake_notebooks == [] and not (tmp_path / "runs" / "smoke" / "cifar10" / "alexnet" / "frozen_svm").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same lock file, its process gone: taken over, and said so
    (outcome,), lines = matrix(tmp_path)
    assert outcome.status == "ok"
    assert f"took over the lock of pid {sleeper.pid} on {socket.gethostname()}, which no longer runs" in lines[0]
    assert not lock_file(tmp_path).exists()  # released at the end


def test_a_lock_from_another_host_is_respected(tmp_path, fake_notebooks):
    write_lock(lock_file(tmp_path), 4242, host="another-machine")
    with pytest.raises(runner.LockHeld, match="by pid 4242 on another-machine.*That is another machine, so this one "
                                              "cannot tell whether it still runs; wait for it, or, if it is gone, "
                                              "remove"):
        matrix(tmp_path)


def test_a_runner_holding_the_lock_is_waited_for_and_a_classical_run_locks_its_fine_tune(tmp_path, fake_notebooks):
    final = tmp_path / "runs" / "smoke" / "cifar10" / "alexnet" / "full"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from transferstudy import runner
        lock = runner.RunLock({str(final)!r})
        assert lock.try_acquire() is None
        print("locked", flush=True)
        time.sleep(float(sys.stdin.readline()))
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        record = runner.RunLock(final).try_acquire()
        assert record is not None and record["pid"] == holder.pid
        # the classical run reads the full fine-tune's folder: it waits for that lock too
        with pytest.raises(runner.LockHeld, match=f"{final} is being run by pid {holder.pid}"):
            matrix(tmp_path, "cifar10/alexnet/classical")
        holder.stdin.write("1.0\n")
        holder.stdin.flush()
        outcomes, _ = matrix(tmp_path, "cifar10/alexnet/frozen_svm,cifar10/alexnet/full", wait=30)
        assert [o.status for o in outcomes] == ["ok", "ok"]
    finally:
        holder.kill()
        holder.wait()
    assert not final.with_name("full.lock").exists()


def test_atomically_written_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    results.atomic_write_bytes(tmp_path / "metrics.json", b"{}")
    with open(tmp_path / "plain.json", "wb"):  # what open() makes under this process's umask
        pass
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777
