"""The book as a reader gets it: executable pages run against a real smoke study, built with every warning fatal,
opened in Chromium.

The slow tests share one smoke study (AlexNet's whole matrix, DeiT's frozen SVM and linear probe, and one run
made to fail) and one build of the book, run on the real data when this workplace has it and on synthetic data
otherwise.
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
from pathlib import Path

import matplotlib
import nbformat
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from PIL import Image
from conftest import ANALYSIS_CHAPTERS, BAD_WEIGHTS, CHAPTER_OF, FAILING, REPO, Study

from transferstudy import book, cli, config, figures, report, results, runner, search
from transferstudy.report.store import RUN_LABELS
from transferstudy.report import chapters, stats, tables

matplotlib.use("Agg")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ("comparison", "errors")  # pages whose screenshots the browser test keeps
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
    """``jupyter-book build --all -n -W --keep-going`` of ``root``; returns the HTML folder, failing on any warning."""
    jb = Path(sys.executable).with_name("jupyter-book")
    out = root / "out"
    result = subprocess.run([str(jb), "build", str(root), "--all", "-n", "-W", "--keep-going",
                             "--path-output", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"jupyter-book build failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return out / "_build" / "html"


# --- fixtures: one generated book, one build (the smoke study and its data root are in conftest.py) -------


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


def test_toc_lists_every_run_of_the_matrix_once_under_its_regime_or_analysis():
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    regimes_part = next(p for p in toc["parts"] if p["caption"] == "The regimes")
    analyses_part = next(p for p in toc["parts"] if p["caption"] == "How the features are reused")
    chapters = [*regimes_part["chapters"], *analyses_part["chapters"]]
    for chapter, regime in zip(chapters, config.NOTEBOOK_REGIMES + ANALYSIS_CHAPTERS, strict=True):
        assert chapter["file"] == (f"book/regimes/{regime}" if regime in config.NOTEBOOK_REGIMES else f"book/{regime}")
        listed = [regime, *(r for r, home in CHAPTER_OF.items() if home == regime)]  # its own runs first
        expected = [f"book/_generated/runs/{book.page_name(s.dataset, s.model, s.regime)}"
                    for r in listed for s in runner.matrix() if s.regime == r]
        assert [s["file"] for s in chapter["sections"]] == expected
    static = [f for f in toc_files() if not f.startswith("book/_generated/")]
    missing = [f for f in static if not (REPO / f"{f}.md").is_file()]
    assert not missing, f"_toc.yml names pages that do not exist: {missing}"


def _code_cells(text: str) -> list[str]:
    return re.findall(r"```\{code-cell\} ipython3\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("doc", [f for f in toc_files() if not f.startswith("book/_generated/")
                                 and f != "book/bibliography"])
def test_each_chapter_is_a_myst_notebook_that_loads_the_store_first(doc):
    text = (REPO / f"{doc}.md").read_text()
    front = yaml.safe_load(text.split("---", 2)[1])
    assert front["kernelspec"]["name"] == "python3" and front["jupytext"]["text_representation"]["format_name"] == "myst"
    cells = _code_cells(text)
    assert cells, f"{doc} computes nothing"
    first = [line for line in cells[0].splitlines() if line and not line.startswith(":")]
    assert first and first[0].startswith(("from ", "import ")), first  # imports first
    assert "report.load()" in "".join(cells[:2]) or doc == "book/models", doc
    assert "{include}" not in text and "_generated/include" not in text  # nothing pasted from a generator
    assert "remove-input" not in text and "remove-cell" not in text  # the code behind every number is in view
    for fence in re.finditer(r"```\{code-cell\} ipython3\n", text):  # a sentence (or a heading) before each cell
        before = text[:fence.start()].rstrip().rsplit("\n\n", 1)[-1]
        assert before.strip() and not before.startswith(("```", "---")), (doc, text[fence.end():fence.end() + 60])


def test_config_executes_the_chapters_but_never_the_run_pages():
    cfg = yaml.safe_load((REPO / "_config.yml").read_text())
    assert cfg["execute"]["execute_notebooks"] == "force" and cfg["execute"]["allow_errors"] is False
    assert cfg["execute"]["timeout"] >= 600
    from pathlib import PurePosixPath
    patterns = cfg["execute"]["exclude_patterns"]
    assert any(PurePosixPath("/x/book/_generated/runs/cifar10-alexnet-full.ipynb").match(p) for p in patterns)
    assert not any(PurePosixPath("/x/book/comparison.md").match(p) for p in patterns)
    for path in ("notebooks", "runs", "data", ".venv", "tests", "README.md"):
        assert path in cfg["exclude_patterns"]
    assert cfg["launch_buttons"]["colab_url"].startswith("https://colab.research.google.com")
    assert (REPO / cfg["bibtex_bibfiles"][0]).is_file()


def test_make_book_rebuilds_every_page_so_no_chapter_keeps_old_numbers():
    # Sphinx re-reads (and so re-executes) only pages whose source changed; a chapter's source does not change
    # when the runs do, so without --all a second `make book` would show the first one's numbers.
    build_line = next(line for line in (REPO / "Makefile").read_text().splitlines() if "jupyter-book build" in line)
    assert " --all " in build_line and "-n -W --keep-going" in build_line
    assert "jupyter-book build . --all -n -W --keep-going" in (REPO / "book" / "reproduce.md").read_text()


def test_book_data_rejects_a_folder_without_the_book(tmp_path, capsys):
    code = cli.main(["book-data", "--profile", "smoke", "--runs-dir", str(tmp_path / "runs"),
                     "--book-root", str(tmp_path / "nowhere")])
    assert code == 2
    assert "book_root=" in capsys.readouterr().err


def test_generate_rejects_a_runs_folder_that_is_not_a_profile(tmp_path):
    with pytest.raises(book.BookError, match="profile_dir=.*<runs dir>/<profile>"):
        book.generate(tmp_path / "runs", tmp_path, copy_book_sources(tmp_path))


def test_book_data_writes_a_note_page_per_run_and_the_context_the_pages_read(tmp_path):
    root = copy_book_sources(tmp_path / "book")
    book.generate(tmp_path / "runs" / "quick", tmp_path / "no-data", root)
    pages = list((root / book.GENERATED / "runs").iterdir())
    assert len(pages) == len(runner.matrix()) and all("Not run yet" in p.read_text() for p in pages)
    store = report.load(root / "book" / "regimes")  # a page executes in its own folder
    assert store.profile == "quick" and store.data_root == (tmp_path / "no-data").resolve()
    assert store.counts()["missing"] == len(runner.matrix())
    assert "No finished runs in profile `quick`" in store.banner()


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
    fig = figures.accuracy_vs_params(points, report.DATASET_LABELS, report.MODEL_LABELS, report.REGIME_LABELS, "t",
                                     ladder=report.LADDER)
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
    f1 = pd.DataFrame({"class": ["cat", "dog", "cat", "dog"], "f1": [0.9, 0.2, 0.8, 0.4], "run": ["a", "a", "b", "b"]})
    fig = figures.per_class_f1_compare(f1, "t")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["cat", "dog"]  # weakest at the bottom
    assert len(fig.axes[0].patches) >= 4 and [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a", "b"]
    _check_figure(fig)


def test_accuracy_figure_draws_each_interval_and_the_difference_figure_marks_significance():
    points = pd.DataFrame({"dataset": ["cifar10", "cifar10"], "model": ["alexnet", "deit_base"],
                           "regime": ["linear_probe", "linear_probe"], "trainable": [40_970, 7_690],
                           "test_accuracy": [0.8, 0.9], "ci_low": [0.75, 0.88], "ci_high": [0.84, 0.93]})
    fig = figures.accuracy_vs_params(points, report.DATASET_LABELS, report.MODEL_LABELS, report.REGIME_LABELS, "t")
    bars = [c for c in fig.axes[0].collections if type(c).__name__ == "LineCollection"]
    spans = sorted(tuple(np.round(seg[:, 1], 2)) for c in bars for seg in c.get_segments())
    assert spans == [(0.75, 0.84), (0.88, 0.93)]  # one error bar per run, from its interval
    _check_figure(fig)
    diffs = pd.DataFrame({"label": ["x", "y"], "difference": [0.1, 0.01], "diff_low": [0.05, -0.03],
                          "diff_high": [0.15, 0.05], "p": [0.001, 0.6]})
    fig = figures.difference_intervals(diffs, "label", "t", "difference (pp)")
    faces = [line.get_markerfacecolor() for line in fig.axes[0].lines if line.get_marker() == "o"]
    assert faces[0] != "white" and faces[1] == "white"  # filled when p < 0.05
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
def searched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A runs store holding one search per model (and no run of the profile)."""
    tmp = tmp_path_factory.mktemp("searched")
    return {m: write_search(tmp / "runs", m, SEARCH_PRETRAINED[m]) for m in config.MODELS}


@pytest.mark.parametrize("model", config.MODELS)
def test_search_chapter_shows_each_search_from_its_files(searched, model):
    folder = searched[model]
    store = report.Store.load(folder.parent.parent / "smoke", "no-data")
    assert store.searches() == sorted(searched.values())
    summary, trials, metas = chapters.read_search(folder)
    title, text = chapters.search_text(folder, summary, trials, metas)
    assert title == f"{report.MODEL_LABELS[model]} on CIFAR-10, linear probe"
    plan = SEARCH_PLANS[model]
    complete = [(n, lr, bs) for n, (lr, bs, outcome) in enumerate(plan) if outcome == "complete"]
    best, best_lr, best_bs = max(complete, key=lambda t: t[1] * 100 + t[2] / 1000)
    assert summary["best_trial"] == best
    # identity and provenance
    assert f"search `{summary['study']}`" in text and "profile `smoke`" in text and "device `cpu`" in text
    assert "SQLite file" in text and str(trials["completed"].max())[:10] in text
    assert ("{warning}" in text and "**randomly initialised**" in text) == (not SEARCH_PRETRAINED[model])
    assert ("ImageNet-pretrained" in text) == SEARCH_PRETRAINED[model]
    # the best trial: its settings, val accuracy, test accuracy labelled as not chosen on, and its command
    best_row = trials.set_index("number").loc[best]
    assert f"**Best: trial {best}**, validation accuracy **{100 * best_row['val_accuracy']:.2f}%**" in text
    assert f"test accuracy, {100 * best_row['test_accuracy']:.2f}%, is shown for reference only" in text
    assert f"`lr` = `{best_lr}`" in text and f"`batch_size` = `{best_bs}`" in text
    assert f"```bash\n{summary['run_command']}\n```" in text
    assert f"-p pretrained {str(SEARCH_PRETRAINED[model]).lower()} -p lr {best_lr} -p batch_size {best_bs}" in text
    # one table row per trial, with its state, settings, val accuracy and pruned epoch
    shown = chapters.trials_frame(trials).set_index("trial")
    assert list(shown.index) == list(range(len(plan)))
    for n, (lr, bs, outcome) in enumerate(plan):
        row = shown.loc[n]
        assert row["state"] == ("failed: CUDA out of memory" if outcome == "fail" else outcome)
        assert (row["lr"], row["batch_size"]) == (str(lr), str(bs))
        assert pd.isna(row["val accuracy"]) == (outcome == "fail")
        assert (row["pruned after epoch"] == 1) if outcome == "pruned" else pd.isna(row["pruned after epoch"])
        test = trials.set_index("number").loc[n, "test_accuracy"]  # these trial folders hold no predictions
        assert row["test accuracy [95% CI] (not used)"] == ("—" if outcome == "fail" else
                                                           f"{tables.pct(test)} (no interval: no run folder here)")
    # importances only with 2 complete trials that differ
    importances, why = chapters.importances_or_reason(folder, trials)
    assert (importances is not None) == (len(complete) >= 2)
    if len(complete) < 2:
        assert why == f"{len(complete)} complete trial; Optuna needs at least 2"
    assert chapters.has_curves(trials)


@pytest.mark.parametrize("summary", ["{not json", '{"study": "s"}'], ids=["bad-json", "missing-keys"])
def test_a_broken_search_folder_is_named_with_the_fix(tmp_path, summary):
    folder = tmp_path / "runs" / "search" / "broken"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(summary)
    (folder / "trials.csv").write_text("number,state\n0,complete\n")
    with pytest.raises(chapters.SearchFolderError, match=r"broken.*rerun one worker of that search"):
        chapters.read_search(folder)


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


# --- generated from a real smoke study and built ----------------------------------------------------------


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
        assert nb.cells[0].source.startswith(f"# {RUN_LABELS[spec.regime]}: ")
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
        assert text.startswith(f"# {RUN_LABELS[spec.regime]}: ") and "{warning}" in text  # random-init banner
        if state == "failed":
            assert "{error}" in text and "**failed**" in text
            if spec.key == FAILING:  # it asked for ImageNet weights (from a file that holds none)
                assert BAD_WEIGHTS in text  # the one line of its error
                assert f"--only {spec.key} --force\n" in text  # rerun as it was: pretrained, as it asked
            else:
                assert f"--only {spec.key} --force -p pretrained false" in text
        else:
            assert "**Not run yet**" in text and f"--only {spec.key} --force" in text


def _text(page) -> str:
    return " ".join(page.locator("main").inner_text().split())


@pytest.mark.slow
def test_every_page_and_image_loads_in_chromium_with_no_error_shown(browser, server, html):
    page = browser.new_page()
    broken: dict[str, list[str]] = {}
    for doc in toc_files():
        response = page.goto(f"{server}/{doc}.html", wait_until="load")
        assert response is not None and response.status == 200, doc
        assert page.locator("main h1").count() >= 1, doc
        images = page.eval_on_selector_all("main img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])")
        if bad := [src for src, width in images if not width]:
            broken[doc] = bad
        text = _text(page)
        assert "Traceback" not in text and "An Exception was encountered" not in text, doc  # no error output
        assert page.locator("main .pasted-text").evaluate_all("els => els.filter(e => !e.textContent.trim()).length") == 0
        if not doc.startswith("book/_generated/") and doc != "book/bibliography":
            assert "randomly initialised" in text or doc in ("book/models", "book/datasets", "book/search"), doc
    assert not broken, f"images that did not load: {broken}"


@pytest.mark.slow
def test_comparison_shows_its_code_intervals_and_sentences_computed_from_the_store(browser, server, html, smoke, data_root):
    store = report.Store.load(smoke.profile_dir, data_root)
    page = browser.new_page()
    page.goto(f"{server}/book/comparison.html", wait_until="load")
    assert page.locator("main div.cell div.cell_input").count() >= 4  # the code behind the numbers, in view
    figure = page.locator("#fig-accuracy-vs-params img")
    assert figure.count() == 1 and figure.evaluate("e => e.naturalWidth") > 0
    assert figure.bounding_box()["width"] > 400  # shown at a readable size
    text = _text(page)
    # every finished run's accuracy with its interval, as the store computes it
    for row in tables.accuracy(store).itertuples():
        assert tables.pct_ci(row.test_accuracy, row.ci_low, row.ci_high) in text, row
    # the CNN-vs-ViT sentence is the one the data choose
    cnn_vit = tables.cnn_vs_vit(store)
    assert len(cnn_vit) == 2  # frozen SVM and linear probe on CIFAR-10 both finished for both models
    sentence = report.count_sentence(tables.tally(cnn_vit), "DeiT-Base", "AlexNet", "regimes")
    assert sentence in [" ".join(t.split()) for t in page.locator("main .pasted-text").all_inner_texts()]
    for verdict in cnn_vit["verdict"]:
        assert verdict in text
    assert "profile smoke" in text
    for name in SHOTS:
        page.goto(f"{server}/book/{name}.html", wait_until="load")
        shot = html.parent / f"{name}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 20_000

    page.goto(f"{server}/book/reported.html", wait_until="load")
    study = pd.read_csv(Path(book.__file__).with_name("reported.csv"))
    assert page.locator("main table").first.locator("tbody tr").count() >= len(study)
    text = _text(page)
    assert "71.95%" in text  # AlexNet frozen SVM on CIFAR-10, as the study reported it
    assert "did not use the original" in text or "No FERPlus run has finished" in text  # (smart quotes in HTML)

    page.goto(f"{server}/book/_generated/runs/{FAILING.replace('/', '-')}.html", wait_until="load")
    assert "This run failed" in page.locator("main .admonition.error").inner_text()


@pytest.mark.slow
def test_an_empty_store_and_no_data_still_build_with_notes(tmp_path):
    root = copy_book_sources(tmp_path / "book")
    book.generate(tmp_path / "runs" / "quick", tmp_path / "no-data", root)
    html = build(root)  # every warning fatal, every page executed
    text = " ".join((html / "book" / "comparison.html").read_text().split())
    assert "No regimes have finished on both sides yet" in text
    datasets = " ".join((html / "book" / "datasets.html").read_text().split())
    assert "has no usable" in datasets
    assert f"read from the data root that transferstudy book-data was given ({tmp_path / 'no-data'})" in datasets


@pytest.mark.slow
def test_colab_opens_the_source_notebook_of_a_run_page(html):
    text = (html / "book" / "_generated" / "runs" / "cifar10-alexnet-full.html").read_text()
    links = re.findall(r'href="(https://colab\.research\.google\.com/[^"]+)"', text)
    assert links and all(link.endswith("/notebooks/04_full_finetune.ipynb") for link in links), links
