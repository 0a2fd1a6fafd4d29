"""The book as a reader gets it: generated from a real smoke study, built with every warning fatal, opened in Chromium.

The slow tests share one smoke study (AlexNet's whole matrix, one DeiT run, and one run made to fail) and one
build of the book, run on the real data when this workplace has it and on synthetic data otherwise.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import nbformat
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from PIL import Image
from conftest import EXTRACT, REPO
from synthetic import FERPLUS_TRAIN_PER_EMOTION, clear_votes, write_cifar_imagefolder, write_ferplus_microsoft

from transferstudy import book, cli, config, figures, regimes, results, runner, search

matplotlib.use("Agg")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ONLY = "*/alexnet/*,cifar10/deit_base/frozen_svm"  # every AlexNet regime on both datasets, and one DeiT run
FAILING = "ferplus/deit_base/linear_probe"  # run with a bad label rule: a real failed run
BOOK_SOURCES = ("_config.yml", "_toc.yml", "book")


def toc_files() -> list[str]:
    """Every page of _toc.yml, in reading order (docnames without extension)."""
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            files.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc["parts"]:
        walk(part["chapters"])
    return files


def copy_book_sources(dest: Path) -> Path:
    """The book's committed sources (config, toc, pages) in ``dest``, without any generated files."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in BOOK_SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("_generated", "__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest


def build(root: Path) -> Path:
    """``jupyter-book build -n -W --keep-going`` of ``root``; returns the HTML folder, failing on any warning."""
    jb = Path(sys.executable).with_name("jupyter-book")
    out = root / "out"
    result = subprocess.run([str(jb), "build", str(root), "-n", "-W", "--keep-going", "--path-output", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"jupyter-book build failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return out / "_build" / "html"


# --- fixtures: one smoke study, one generated book, one build ------------------------------------------


@pytest.fixture(scope="session")
def data_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real data root where this workplace has it, else synthetic CIFAR-10 and FERPlus big enough for smoke."""
    if EXTRACT.is_file():
        return request.getfixturevalue("real_data_root")
    root = tmp_path_factory.mktemp("data")
    write_cifar_imagefolder(root / "cifar10", 6, 3)
    emotions = list(FERPLUS_TRAIN_PER_EMOTION)
    write_ferplus_microsoft(root / "ferplus", {
        "train": [clear_votes(e) for e, n in FERPLUS_TRAIN_PER_EMOTION.items() for _ in range(n)],
        "valid": [clear_votes(e) for e in emotions],
        "test": [clear_votes(e) for e in emotions for _ in range(3)]})
    return root


@dataclass
class Study:
    """The shared smoke study: its ``<runs>/smoke`` folder and what became of each run (ok, failed, missing)."""

    profile_dir: Path
    status: dict[str, str]


@pytest.fixture(scope="module")
def smoke(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    """The smoke study (random init) over ``ONLY``, plus one run made to fail with a bad label rule.

    The pages must follow what happened, so a run that fails for another reason is checked as a failed run.
    """
    runs = tmp_path_factory.mktemp("runs")
    lines: list[str] = []
    outcomes = runner.run_matrix("smoke", data_root, runs, {"pretrained": False}, only=ONLY, report=lines.append)
    outcomes += runner.run_matrix("smoke", data_root, runs, {"pretrained": False, "label_rule": "bogus"},
                                  only=FAILING, report=lines.append)
    status = {spec.key: "missing" for spec in runner.matrix()} | {o.spec.key: o.status for o in outcomes}
    assert status[FAILING] == "failed", lines
    assert "ok" in status.values(), f"no smoke run finished, so no page shows a notebook: {lines}"
    yield Study(runs / "smoke", status)
    shutil.rmtree(runs, ignore_errors=True)  # its bundles hold ~2 GB of weights; CI disks are small


@pytest.fixture(scope="module")
def generated(smoke: Study, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the book's sources with ``book/_generated`` written by ``transferstudy book-data``."""
    root = copy_book_sources(tmp_path_factory.mktemp("book"))
    code = cli.main(["book-data", "--profile", "smoke", "--runs-dir", str(smoke.profile_dir.parent),
                     "--data-root", str(data_root), "--book-root", str(root)])
    assert code == 0
    return root


@pytest.fixture(scope="module")
def html(generated: Path) -> Path:
    return build(generated)


@pytest.fixture(scope="module")
def server(html: Path) -> Iterator[str]:
    """The built HTML served on localhost."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(html)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Debian's headless Chromium with a fresh profile, driven by Playwright (which never downloads a browser)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (it installs Debian's chromium) or "
                    f"`apt-get install chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 900})
        yield context
        context.close()


# --- the committed sources ----------------------------------------------------------------------------


def test_toc_lists_every_run_of_the_matrix_once_under_its_regime():
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    regimes_part = next(p for p in toc["parts"] if p["caption"] == "The regimes")
    for chapter, regime in zip(regimes_part["chapters"], runner.NOTEBOOKS, strict=True):
        assert chapter["file"] == f"book/regimes/{regime}"
        expected = [f"book/_generated/runs/{book.page_name(s.dataset, s.model, s.regime)}"
                    for s in runner.matrix() if s.regime == regime]
        assert [s["file"] for s in chapter["sections"]] == expected
    static = [f for f in toc_files() if not f.startswith("book/_generated/")]
    missing = [f for f in static if not (REPO / f"{f}.md").is_file()]
    assert not missing, f"_toc.yml names pages that do not exist: {missing}"


def test_pages_include_exactly_the_snippets_book_data_writes():
    pattern = re.compile(r"```\{include\} (\S+)")
    included = set()
    for page in (REPO / "book").rglob("*.md"):
        for target in pattern.findall(page.read_text()):
            path = (page.parent / target).resolve()
            assert path.parent == (REPO / book.GENERATED / "include").resolve(), (page, target)
            included.add(path.stem)
    assert included == set(book.INCLUDES)


def test_config_renders_without_executing_and_keeps_non_pages_out():
    cfg = yaml.safe_load((REPO / "_config.yml").read_text())
    assert cfg["execute"]["execute_notebooks"] == "off"
    assert "execute_notebooks: 'off'" in (REPO / "_config.yml").read_text()
    for path in ("notebooks", "runs", "data", ".venv", "tests", "README.md"):
        assert path in cfg["exclude_patterns"]
    assert cfg["launch_buttons"]["colab_url"].startswith("https://colab.research.google.com")
    assert (REPO / cfg["bibtex_bibfiles"][0]).is_file()


def test_book_data_rejects_a_folder_without_the_book(tmp_path, capsys):
    code = cli.main(["book-data", "--profile", "smoke", "--runs-dir", str(tmp_path / "runs"),
                     "--book-root", str(tmp_path / "nowhere")])
    assert code == 2
    assert "book_root=" in capsys.readouterr().err


def test_generate_rejects_a_runs_folder_that_is_not_a_profile(tmp_path):
    with pytest.raises(book.BookError, match="profile_dir=.*<runs dir>/<profile>"):
        book.generate(tmp_path / "runs", tmp_path, copy_book_sources(tmp_path))


# --- the new figures ----------------------------------------------------------------------------------


def _check_figure(fig) -> None:
    assert fig.get_facecolor()[:3] == (1.0, 1.0, 1.0)
    for ax in fig.axes:
        if ax.has_data() and ax.get_xticks().size:
            assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


def test_accuracy_vs_params_has_a_log_panel_per_dataset_and_a_marker_per_run():
    points = pd.DataFrame({"dataset": ["cifar10", "cifar10", "ferplus"], "model": ["alexnet", "deit_base", "alexnet"],
                           "regime": ["linear_probe", "full", "partial"], "trainable": [40_970, 85_806_346, 55_157_000],
                           "test_accuracy": [0.8, 0.97, 0.6]})
    fig = figures.accuracy_vs_params(points, book.DATASET_LABELS, book.MODEL_LABELS, book.REGIME_LABELS, "t",
                                     ladder=book.STEPS)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["CIFAR-10", "FERPlus"]
    assert all(ax.get_xscale() == "log" for ax in panels)
    assert [sum(len(c.get_offsets()) for c in ax.collections) for ax in panels] == [2, 1]
    _check_figure(fig)


def test_embedding_scatter_names_every_class_in_its_legend():
    rng = np.random.default_rng(0)
    classes = ["anger", "contempt", "disgust"]
    panels = {name: (rng.normal(size=(9, 2)), np.arange(9) % 3) for name in ("frozen", "fine-tuned")}
    fig = figures.embedding_scatter(panels, classes, "PCA", "t")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == classes
    assert [ax.get_xlabel() for ax in fig.axes] == ["PCA 1", "PCA 1"]
    _check_figure(fig)


def test_grids_and_bars_reject_nothing_to_draw_and_label_what_they_draw():
    with pytest.raises(ValueError, match="captioned_grid"):
        figures.captioned_grid([], [], "t")
    with pytest.raises(ValueError, match="sample_grid"):
        figures.sample_grid({"cat": []}, "t")
    fig = figures.sample_grid({"cat": [np.zeros((8, 8, 3), np.uint8)] * 2, "dog": [np.zeros((8, 8), np.uint8)]}, "t")
    assert [ax.get_ylabel() for ax in fig.axes[::2]] == ["cat", "dog"]
    fig = figures.class_balance({"train": {"cat": 5, "dog": 3}, "test": {"cat": 1, "dog": 1}}, "t")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["cat", "dog"]
    _check_figure(fig)
    fig = figures.per_class_f1_compare(pd.DataFrame({"a": {"cat": 0.9, "dog": 0.2}, "b": {"cat": 0.8, "dog": 0.4}}), "t")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["dog", "cat"]  # weakest at the bottom
    _check_figure(fig)


# --- the hyperparameter search chapter, from real Optuna studies -------------------------------------------

# trial plans of the studies below: (lr, batch_size, what happens); a trial's val accuracy follows its settings
SEARCH_PLANS = {"alexnet": [(1e-3, 32, "complete"), (3e-4, 32, "pruned"), (3e-4, 64, "complete"), (1e-3, 64, "fail")],
                "deit_base": [(5e-3, 16, "complete"), (1e-4, 16, "fail")]}
SEARCH_PRETRAINED = {"alexnet": False, "deit_base": True}


def write_search(runs: Path, model: str, pretrained: bool) -> Path:
    """A real SQLite Optuna study of ``model``'s linear probe whose trials set what `transferstudy search`'s do
    (no notebook: a trial's run folder holds only its meta.json), summarised by ``search.write_summary``."""
    run = {"dataset": "cifar10", "model": model, "regime": "linear_probe", "profile": "smoke"}
    name = search.default_study_name(run["dataset"], model, run["regime"], run["profile"])
    output = runs / "search" / name
    output.mkdir(parents=True)
    study = optuna.create_study(study_name=name, storage=search.open_storage(f"sqlite:///{output / 'study.db'}"),
                                direction="maximize", pruner=optuna.pruners.NopPruner())
    study.set_user_attr("run", run)
    plan = SEARCH_PLANS[model]
    space = {"lr": sorted({lr for lr, _, _ in plan}), "batch_size": sorted({bs for _, bs, _ in plan})}
    for lr, batch_size, _ in plan:
        study.enqueue_trial({"lr": lr, "batch_size": batch_size})

    def objective(trial: optuna.Trial) -> float:
        overrides = {"pretrained": pretrained, **search.suggest(trial, space)}
        outcome = plan[trial.number][2]
        run_dir = output / "trials" / f"{trial.number:04d}" / "smoke" / "cifar10" / model / "linear_probe"
        run_dir.mkdir(parents=True)
        results.write_json(run_dir / "meta.json", {"pretrained": pretrained, "device": "cpu", "status": "ok"})
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("run_dir", str(run_dir))
        if outcome == "fail":
            trial.set_user_attr("error", "CUDA out of memory\nTraceback ...")
            raise search.TrialFailed(f"trial {trial.number}: CUDA out of memory")
        val = round(overrides["lr"] * 100 + overrides["batch_size"] / 1000, 4)
        epochs = 1 if outcome == "pruned" else 2
        for epoch in range(1, epochs + 1):
            trial.report(val - 0.05 * (epochs - epoch), epoch)
        trial.set_user_attr("test_accuracy", val - 0.01)
        trial.set_user_attr(search.OBJECTIVE, val)
        if outcome == "pruned":
            trial.set_user_attr("pruned_epoch", epoch)
            raise optuna.TrialPruned()
        return val

    study.optimize(objective, n_trials=len(plan), catch=(search.TrialFailed,))
    search.write_summary(study, output, "data")
    return output


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The book generated from a runs store holding one search study per model (and no run of the profile)."""
    tmp = tmp_path_factory.mktemp("searched")
    folders = {m: write_search(tmp / "runs", m, SEARCH_PRETRAINED[m]) for m in config.MODELS}
    root = copy_book_sources(tmp / "book")
    book.generate(tmp / "runs" / "smoke", tmp / "no-data", root)
    return root, folders


def _study_sections(snippet: str) -> dict[str, str]:
    """The search snippet's sections, by the heading that opens each."""
    return {part.split("\n", 1)[0]: part for part in snippet.split("### ")[1:]}


@pytest.mark.parametrize("model", config.MODELS)
def test_search_chapter_shows_each_study_from_its_files(searched, model):
    root, folders = searched
    sections = _study_sections((root / book.GENERATED / "include" / "search-results.md").read_text())
    assert len(sections) == len(config.MODELS)
    text = sections[f"{book.MODEL_LABELS[model]} on CIFAR-10, linear probe"]
    summary = results.read_json(folders[model] / "summary.json")
    trials = pd.read_csv(folders[model] / "trials.csv")
    plan = SEARCH_PLANS[model]
    complete = [(n, lr, bs) for n, (lr, bs, outcome) in enumerate(plan) if outcome == "complete"]
    best, best_lr, best_bs = max(complete, key=lambda t: t[1] * 100 + t[2] / 1000)
    assert summary["best_trial"] == best
    # identity and provenance
    assert f"study `{summary['study']}`" in text and "profile `smoke`" in text and "device `cpu`" in text
    assert "SQLite file" in text and str(trials["completed"].max())[:10] in text
    assert ("{warning}" in text and "**randomly initialised**" in text) == (not SEARCH_PRETRAINED[model])
    assert ("ImageNet-pretrained" in text) == SEARCH_PRETRAINED[model]
    # the best trial: its settings, val accuracy, test accuracy labelled as not chosen on, and its command
    best_row = trials.set_index("number").loc[best]
    assert f"**Best: trial {best}**, validation accuracy **{100 * best_row['val_accuracy']:.2f}%**" in text
    assert f"test accuracy, {100 * best_row['test_accuracy']:.2f}%, is shown for reference only" in text
    assert f"| `lr` | `{best_lr}` |" in text and f"| `batch_size` | `{best_bs}` |" in text
    assert f"```bash\n{summary['run_command']}\n```" in text
    assert f"-p pretrained {str(SEARCH_PRETRAINED[model]).lower()} -p lr {best_lr} -p batch_size {best_bs}" in text
    # one table row per trial, with its state, settings, val accuracy and pruned epoch
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \| ", line)]
    assert len(rows) == len(plan)
    for n, (lr, bs, outcome) in enumerate(plan):
        row = trials.set_index("number").loc[n]
        val = "—" if outcome == "fail" else f"{100 * row['val_accuracy']:.2f}%"
        state = "failed: `CUDA out of memory`" if outcome == "fail" else outcome
        pruned = "1" if outcome == "pruned" else "—"
        assert rows[n].startswith(f"| {n} | {state} | {lr} | {bs} | {val} | {pruned} | "), rows[n]
    # the figures: history and curves always here, importances only with 2 complete trials that differ
    figures_shown = re.findall(r"\{figure\} (\S+)", text)
    kinds = sorted(src.rsplit("-", 1)[1].removesuffix(".png") for src in figures_shown)
    assert kinds == (["curves", "history", "importances"] if len(complete) >= 2 else ["curves", "history"])
    if len(complete) < 2:
        assert f"No parameter importances for this study: {len(complete)} complete trial" in text
    for src in figures_shown:
        with Image.open(root / src.lstrip("/")) as image:
            assert image.format == "PNG" and image.size[0] > 300
            assert image.convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # white background


def test_search_chapter_says_how_to_run_a_search_when_there_is_none(tmp_path):
    root = copy_book_sources(tmp_path / "book")
    book.generate(tmp_path / "runs" / "quick", tmp_path / "no-data", root)
    text = (root / book.GENERATED / "include" / "search-results.md").read_text()
    assert "No hyperparameter search has run yet" in text and f"```bash\n{book.SEARCH_EXAMPLE}\n```" in text
    assert "-p pretrained false" in book.SEARCH_EXAMPLE and "next `make book`" in text
    assert not list((root / book.GENERATED / "figures").glob("search-*"))


@pytest.mark.parametrize("summary", ["{not json", '{"study": "s"}'], ids=["bad-json", "missing-keys"])
def test_a_broken_search_folder_is_named_with_the_fix(tmp_path, summary):
    folder = tmp_path / "runs" / "search" / "broken"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(summary)
    (folder / "trials.csv").write_text("number,state\n0,complete\n")
    with pytest.raises(book.BookError, match=r"broken.*rerun one worker of that search"):
        book.generate(tmp_path / "runs" / "smoke", tmp_path / "no-data", copy_book_sources(tmp_path / "book"))


def test_search_figures_draw_each_trial_and_refuse_nothing_to_draw():
    trials = pd.DataFrame({"number": [0, 1, 2, 3], "state": ["complete", "pruned", "complete", "fail"],
                           "val_accuracy": [0.4, 0.2, 0.6, None],
                           "reported": ['{"1": 0.3, "2": 0.4}', '{"1": 0.2}', '{"1": 0.5, "2": 0.6}', "{}"]})
    fig = figures.search_history(trials, "t")
    ax = fig.axes[0]
    points = [c.get_offsets() for c in ax.collections]
    assert [p[:, 0].tolist() for p in points] == [[0, 2], [1]]  # complete, then pruned; the failed trial has no value
    assert ax.lines[0].get_ydata().tolist() == [0.4, 0.6]  # best so far
    _check_figure(fig)
    fig = figures.search_curves(trials, "t")
    assert [line.get_label() for line in fig.axes[0].lines] == ["trial 0", "trial 1", "trial 2"]
    assert [line.get_linestyle() for line in fig.axes[0].lines] == ["-", "--", "-"]
    _check_figure(fig)
    fig = figures.param_importances(pd.DataFrame({"param": ["lr", "epochs"], "importance": [0.7, 0.3]}), "t")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["epochs", "lr"]  # most important on top
    _check_figure(fig)
    with pytest.raises(ValueError, match="at least 2 complete trials"):
        figures.param_importances(pd.DataFrame(columns=["param", "importance"]), "t")


# --- generated from a real smoke study ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("spec", runner.matrix(), ids=lambda s: s.key)
def test_each_run_has_one_page_that_matches_its_state(generated, smoke, spec):
    base = generated / book.GENERATED / "runs" / book.page_name(spec.dataset, spec.model, spec.regime)
    state = smoke.status[spec.key]
    pages = sorted(p.suffix for p in base.parent.glob(base.name + ".*"))
    assert pages == ([".ipynb"] if state == "ok" else [".md"])
    if state == "ok":
        nb = nbformat.read(base.with_suffix(".ipynb"), as_version=4)
        assert "papermill" not in nb.metadata
        assert nb.cells[0].source.startswith(f"# {book.REGIME_LABELS[spec.regime]}: ")
        assert "Parameters of this run" in nb.cells[1].source
        for cell in nb.cells:
            tags = cell.metadata.get("tags", [])
            assert "papermill" not in cell.metadata and "papermill-error-cell-tag" not in tags
            if {"parameters", "injected-parameters"} & set(tags):
                assert "remove-cell" in tags
            if "injected-parameters" in tags:  # re-runnable as this run, without this machine's paths
                assert f"model = {spec.model!r}" in cell.source and "output_dir" not in cell.source
        outputs = [o for c in nb.cells for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.output_type == "error"]
        assert any("image/png" in o.get("data", {}) for o in outputs)
    else:
        text = base.with_suffix(".md").read_text()
        assert text.startswith(f"# {book.REGIME_LABELS[spec.regime]}: ") and "{warning}" in text  # random-init banner
        if state == "failed":
            assert "{error}" in text and "**failed**" in text
            if spec.key == FAILING:
                assert "label_rule='bogus'" in text  # the one line of its error
            assert f"--only {spec.key} --force -p pretrained false" in text
        else:
            assert "**Not run yet**" in text and f"--only {spec.key} --force" in text


@pytest.mark.slow
def test_snippets_carry_provenance_banner_and_the_numbers_of_the_store(generated, smoke):
    include = generated / book.GENERATED / "include"
    assert sorted(p.stem for p in include.glob("*.md")) == sorted(book.INCLUDES)
    banner = (include / "banner.md").read_text()
    assert "{warning}" in banner and "randomly initialised" in banner and "profile `smoke`" in banner
    counts = {k: list(smoke.status.values()).count(k) for k in ("ok", "failed", "missing")}
    assert (f"{counts['ok']} of {len(smoke.status)} runs finished, {counts['failed']} failed, "
            f"{counts['missing']} not run yet") in banner
    # Each reported number of the original study, and each finished run's own test accuracy, is in the table.
    reported = (include / "reported.md").read_text()
    assert ":name: reported-table" in reported
    study = pd.read_csv(Path(book.__file__).with_name("reported.csv"))
    for value in study["test_accuracy"]:
        assert f"{100 * value:.2f}%" in reported
    frame = pd.read_csv(smoke.profile_dir / "results.csv")
    for value in frame.loc[frame["status"] == "ok", "test_accuracy"]:
        assert f"{100 * value:.2f}%" in reported
    assert "failed: `" in reported and ":name: provenance-table" in reported
    for (dataset, model), runs in frame[frame["status"] == "ok"].groupby(["dataset", "model"]):
        for run in runs.itertuples():
            row = f"| {book.DATASET_LABELS[dataset]} | {book.MODEL_LABELS[model]} | {{doc}}`{run.regime.replace('_', ' ')} "
            assert row in reported and f"| ok | random init | {run.device} | {run.date[:10]} |" in reported
    # Parameter counts come from the library: DeiT-Base's linear probe trains 7,690 of 85,806,346 on CIFAR-10.
    params = (include / "models-params.md").read_text()
    assert "| CIFAR-10 | DeiT-Base | Linear probe | 7,690 | 85,806,346 |" in params
    for row in regimes.param_table("alexnet", 8):
        assert f"{row['trainable']:,} | {row['total']:,}" in params
    # Each finished run's wall time and peak memory, and the largest peak, are in the Reproduce chapter.
    times = (include / "reproduce-times.md").read_text()
    peaks = []
    for run in frame[(frame["status"] == "ok") & frame["classifier"].isna()].itertuples():
        meta = results.read_json(Path(run.run_dir) / "meta.json")
        peaks.append(meta["peak_rss_mb"])
        assert f"| {meta['wall_s']:.0f} s | {meta['peak_rss_mb'] / 1024:.1f} GiB | cpu |" in times, run.run_dir
    assert f"largest peak resident memory of a run was {max(peaks) / 1024:.1f} GiB" in times
    # Figures referenced by the snippets exist.
    for snippet in include.glob("*.md"):
        for src in re.findall(r"\{figure\} (\S+)", snippet.read_text()):
            assert (generated / src.lstrip("/")).is_file(), (snippet.name, src)


@pytest.mark.slow
def test_book_data_writes_notes_when_nothing_has_run_and_the_data_root_is_empty(tmp_path):
    root = copy_book_sources(tmp_path / "book")
    book.generate(tmp_path / "runs" / "quick", tmp_path / "no-data", root)
    include = root / book.GENERATED / "include"
    assert sorted(p.stem for p in include.glob("*.md")) == sorted(book.INCLUDES)
    assert "No finished runs in profile `quick`" in (include / "banner.md").read_text()
    for dataset in config.DATASETS:
        assert "has no usable" in (include / f"datasets-{dataset}.md").read_text()
        assert "No finished run" in (include / f"errors-{dataset}.md").read_text()
    pages = list((root / book.GENERATED / "runs").iterdir())
    assert len(pages) == len(runner.matrix()) and all("Not run yet" in p.read_text() for p in pages)
    build(root)  # the empty book builds with every warning fatal, too


# --- as a reader sees it ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_page_and_image_loads_in_chromium(browser, server, html):
    page = browser.new_page()
    broken: dict[str, list[str]] = {}
    for doc in toc_files():
        response = page.goto(f"{server}/{doc}.html", wait_until="load")
        assert response is not None and response.status == 200, doc
        assert page.locator("main h1").count() >= 1, doc
        images = page.eval_on_selector_all("main img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])")
        if bad := [src for src, width in images if not width]:
            broken[doc] = bad
    assert not broken, f"images that did not load: {broken}"


@pytest.mark.slow
def test_comparison_figure_and_reported_table_are_there_for_a_reader(browser, server, html):
    page = browser.new_page()
    page.goto(f"{server}/book/comparison.html", wait_until="load")
    figure = page.locator("img[src*='accuracy-vs-params']")
    assert figure.count() == 1 and figure.evaluate("e => e.naturalWidth") > 0
    assert figure.bounding_box()["width"] > 400  # shown at a readable size
    assert "profile smoke" in page.locator("main").inner_text().replace("\n", " ")
    shot = html.parent / "comparison.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000

    page.goto(f"{server}/book/reported.html", wait_until="load")
    table = page.locator("table#reported-table")
    study = pd.read_csv(Path(book.__file__).with_name("reported.csv"))
    assert table.locator("tbody tr").count() >= len(study)
    assert "71.95%" in table.inner_text()  # AlexNet frozen SVM on CIFAR-10, as the study reported it

    page.goto(f"{server}/book/_generated/runs/{FAILING.replace('/', '-')}.html", wait_until="load")
    assert "This run failed" in page.locator("main .admonition.error").inner_text()


@pytest.mark.slow
def test_colab_opens_the_source_notebook_of_a_run_page(html):
    text = (html / "book" / "_generated" / "runs" / "cifar10-alexnet-full.html").read_text()
    links = re.findall(r'href="(https://colab\.research\.google\.com/[^"]+)"', text)
    assert links and all(link.endswith("/notebooks/04_full_finetune.ipynb") for link in links), links
