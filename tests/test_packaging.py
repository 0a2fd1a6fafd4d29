"""The project's set-up files agree with each other, and the console script answers --help."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    return {line.split("==")[0].lower(): line.split("==")[1] for line in lines if "==" in line}


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_deps = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip_deps) == _pins(deps)


def test_lock_agrees_with_pyproject():
    deps = _pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    lock = _pins((ROOT / "requirements-lock.txt").read_text().splitlines())
    assert {name: lock.get(name) for name in deps} == deps


@pytest.mark.parametrize("command", [[], ["params"], ["data"], ["run"], ["results"], ["compare"], ["predict"], ["bench"], ["book-data"], ["search"]])
def test_every_subcommand_has_help(command):
    out = subprocess.run([sys.executable, "-m", "transferstudy.cli", *command, "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: transferstudy")
