"""The regime notebooks' Colab setup cell: present, hidden in the book, installing from _config.yml's repository,
and doing nothing where transferstudy is installed (no pip, no network, no output)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import nbformat
import pytest
import yaml

from transferstudy import book, colab, data, models
from transferstudy.runner import NOTEBOOK_DIR, NOTEBOOKS

REPO = NOTEBOOK_DIR.parent


def setup_cells(path: Path) -> list[nbformat.NotebookNode]:
    return [c for c in nbformat.read(path, as_version=4).cells if "colab-setup" in c.metadata.get("tags", [])]


def cell_source(path: Path = NOTEBOOK_DIR / NOTEBOOKS["frozen_svm"]) -> str:
    return setup_cells(path)[0].source


@pytest.mark.parametrize("name", list(NOTEBOOKS.values()))
def test_every_regime_notebook_starts_with_the_setup_cell_tagged_and_from_config(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "colab-setup" in code[0].metadata.get("tags", []), f"{name}: the setup cell must be the first code cell"
    assert len(setup_cells(NOTEBOOK_DIR / name)) == 1
    assert set(code[0].metadata["tags"]) == {"colab-setup", "remove-cell"}  # remove-cell: Jupyter Book hides it
    assert "parameters" in code[1].metadata.get("tags", [])  # papermill injects right after this one, as before
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")  # the page's title stays first
    with open(REPO / "_config.yml") as fh:
        repo = yaml.safe_load(fh)["repository"]
    assert f'"git+{repo["url"]}@{repo["branch"]}"' in code[0].source, (
        f"{name}: the setup cell does not install from _config.yml's repository; run python -m transferstudy.colab")
    assert code[0].source == colab.cell_source(repo["url"], repo["branch"]), (
        f"{name}: the setup cell differs from colab.cell_source; run python -m transferstudy.colab")


# --- executing the cell ----------------------------------------------------------------------------

# Run in a child interpreter before the cell: any process start or network connection ends it with status 3,
# saying what was attempted; afterwards, status 4 if the cell imported transferstudy.colab.
HARNESS = """
import os, socket, subprocess, sys

def refuse(what):
    def call(*args, **kwargs):
        sys.stderr.write(f"ATTEMPTED {{what}} {{args!r}}\\n")
        os._exit(3)
    return call

subprocess.run = refuse("subprocess.run")
subprocess.Popen = refuse("subprocess.Popen")
subprocess.check_call = refuse("subprocess.check_call")
os.system = refuse("os.system")
socket.socket.connect = refuse("socket.connect")
{before}
exec(compile({cell!r}, "colab-setup", "exec"))
sys.exit(4 if "transferstudy.colab" in sys.modules and {expect_quiet} else 0)
"""


def run_cell(before: str = "", *, colab_env: bool = False, expect_quiet: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLAB_")}
    if colab_env:
        env["COLAB_RELEASE_TAG"] = "release-colab-test"
    code = HARNESS.format(before=textwrap.dedent(before), cell=cell_source(), expect_quiet=expect_quiet)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_where_the_package_is_installed_the_cell_does_nothing():
    result = run_cell()
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_where_the_package_is_missing_the_cell_runs_pip_from_the_repository():
    # The control of the test above: the same harness catches the install when transferstudy cannot be found.
    result = run_cell("""
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "transferstudy" else real(name, *a)
    """)
    assert result.returncode == 3
    assert "ATTEMPTED subprocess.run" in result.stderr and "'pip', 'install'" in result.stderr
    with open(REPO / "_config.yml") as fh:
        assert f"git+{yaml.safe_load(fh)['repository']['url']}@" in result.stderr


def test_on_colab_with_the_package_installed_the_cell_runs_setup_without_pip():
    result = run_cell("""
        import types, transferstudy
        fake = types.ModuleType("transferstudy.colab")
        fake.setup = lambda: print("setup called")
        sys.modules["transferstudy.colab"] = transferstudy.colab = fake
    """, colab_env=True, expect_quiet=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "setup called\n", "")


# --- what the cell calls on Colab ---------------------------------------------------------------------


def test_setup_says_the_device_downloads_cifar10_and_explains_ferplus(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERSTUDY_DATA_ROOT", str(tmp_path))
    monkeypatch.setattr(models, "select_device", lambda preference="auto": __import__("torch").device("cpu"))
    calls = []

    def load_dataset(name, data_dir, **kwargs):
        calls.append((name, Path(data_dir), kwargs.get("download", False)))
        if not kwargs.get("download"):
            raise data.DataError(f"no {name} in {data_dir}")

    monkeypatch.setattr(data, "load_dataset", load_dataset)
    lines: list[str] = []
    colab.setup(log=lines.append)
    assert lines[0].startswith("device: cpu (no GPU in this runtime)")
    assert calls == [("cifar10", tmp_path / "cifar10", False), ("cifar10", tmp_path / "cifar10", True),
                     ("ferplus", tmp_path / "ferplus", False)]
    assert f"CIFAR-10: downloading through torchvision into {tmp_path / 'cifar10'}" in lines[1]
    help_text = lines[-1]
    for needed in ("FERPlus: not found in " + str(tmp_path / "ferplus"), "https://github.com/microsoft/FERPlus",
                   "kaggle.com", "fer2013.csv", "generate_training_data.py", "FER2013Train/, FER2013Valid/ and "
                   "FER2013Test/ in " + str(tmp_path / "ferplus")):
        assert needed in help_text


def test_setup_finds_data_already_there_and_downloads_nothing(tmp_path, monkeypatch, cifar_dir, fer_microsoft_dir):
    (tmp_path / "cifar10").symlink_to(cifar_dir)
    (tmp_path / "ferplus").symlink_to(fer_microsoft_dir)
    monkeypatch.setenv("TRANSFERSTUDY_DATA_ROOT", str(tmp_path))
    real = data.load_dataset

    def no_download(name, data_dir, **kwargs):
        assert not kwargs.get("download"), "downloaded although the data is there"
        return real(name, data_dir, **kwargs)

    monkeypatch.setattr(data, "load_dataset", no_download)
    lines: list[str] = []
    colab.setup(log=lines.append)
    assert lines[1:] == [f"CIFAR-10: found in {(tmp_path / 'cifar10').resolve()}",
                         f"FERPlus: found in {(tmp_path / 'ferplus').resolve()}"]


def test_setup_asks_for_a_restart_when_pip_replaced_an_imported_package(monkeypatch):
    loaded = types.ModuleType("ts_preloaded")
    loaded.__version__ = "0.0.0"  # what the kernel holds; the distribution (pytest's, here) says otherwise
    monkeypatch.setitem(sys.modules, "ts_preloaded", loaded)
    monkeypatch.setattr(colab, "_PRELOADED", (("ts_preloaded", "pytest"),))
    with pytest.raises(RuntimeError, match=r"ts_preloaded 0\.0\.0 \(installed now: \d.*Restart the session"):
        colab.setup(log=lambda line: None)


# --- the book and the cell's one source --------------------------------------------------------------


def test_the_book_page_of_a_run_keeps_the_cell_hidden():
    nb = nbformat.read(NOTEBOOK_DIR / NOTEBOOKS["linear_probe"], as_version=4)
    state = types.SimpleNamespace(title="CIFAR-10 · AlexNet · linear probe", params={}, regime="linear_probe",
                                  provenance=lambda: "profile smoke")
    cleaned = book._clean_notebook(nb, state)
    setup = [c for c in cleaned.cells if "colab-setup" in c.metadata.get("tags", [])]
    assert len(setup) == 1 and "remove-cell" in setup[0].metadata["tags"]
    assert cleaned.cells[0].source.startswith("# CIFAR-10 · AlexNet · linear probe")


def test_a_fork_rewrites_the_cells_from_its_config(tmp_path):
    (tmp_path / "notebooks").mkdir()
    for name in NOTEBOOKS.values():
        shutil.copy(NOTEBOOK_DIR / name, tmp_path / "notebooks" / name)
    config = (REPO / "_config.yml").read_text()
    with open(REPO / "_config.yml") as fh:
        url = yaml.safe_load(fh)["repository"]["url"]
    (tmp_path / "_config.yml").write_text(config.replace(url, "https://github.com/someone/fork"))
    before = {name: nbformat.read(tmp_path / "notebooks" / name, as_version=4) for name in NOTEBOOKS.values()}

    assert sorted(p.name for p in colab.write_cells(tmp_path)) == sorted(NOTEBOOKS.values())
    for name, old in before.items():
        new = nbformat.read(tmp_path / "notebooks" / name, as_version=4)
        assert "git+https://github.com/someone/fork@" in cell_source(tmp_path / "notebooks" / name)
        others = [json.dumps(c, sort_keys=True) for c in new.cells if "colab-setup" not in c.metadata.get("tags", [])]
        assert others == [json.dumps(c, sort_keys=True) for c in old.cells
                          if "colab-setup" not in c.metadata.get("tags", [])]
    assert colab.write_cells(tmp_path) == []  # written only when it changes

    (tmp_path / "_config.yml").write_text(config.replace(url, "git@github.com:someone/fork"))
    with pytest.raises(ValueError, match=r"_config.yml: repository.url is 'git@github.com:someone/fork'; set it to"):
        colab.write_cells(tmp_path)
