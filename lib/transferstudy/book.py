"""The book's data-driven parts, generated from the results store and the data root (`transferstudy book-data`).

``generate(profile_dir, data_root, book_root)`` rewrites ``<book_root>/book/_generated/``:

* ``runs/<dataset>-<model>-<regime>.ipynb``: each run's executed notebook, cleaned for reading
  (papermill's parameter cells hidden behind a "parameters of this run" box, its metadata and
  error cells removed). A failed run, or one never attempted, becomes a ``.md`` note page of the
  same name instead, so ``_toc.yml`` can list every page without an extension.
* ``include/*.md``: the snippets the pages pull in with ``{include}`` (tables, figures, notes).
* ``figures/*.png``: the figures those snippets show.

The search chapter shows every hyperparameter search under ``<runs>/search/*/`` (``transferstudy search``),
whatever its profile. Every snippet in ``INCLUDES`` is always written (a note where inputs are missing), so the build
never meets a missing file. Every number says where it came from: profile, initialisation, device, date.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pandas as pd
from PIL import Image
from torch import nn

from . import config, data, figures, results, runner

GENERATED = Path("book") / "_generated"
DATASET_LABELS = {"cifar10": "CIFAR-10", "ferplus": "FERPlus"}
MODEL_LABELS = {"alexnet": "AlexNet", "deit_base": "DeiT-Base"}
REGIME_LABELS = {"frozen_svm": "Frozen features → SVM", "linear_probe": "Linear probe",
                 "partial": "Partial fine-tune", "full": "Full fine-tune",
                 "classical": "Classical classifiers on embeddings"}
STEPS = ("frozen_svm", "linear_probe", "partial", "full")  # the transfer ladder, least to most trained
EMBEDDING_METHODS = ("PCA", "t-SNE", "UMAP")
MIN_EMBED_POINTS = 5  # t-SNE and UMAP need a handful of neighbours
INCLUDES = ("banner", "models-architecture", "models-params", "comparison-figure", "comparison-cnn-vit",
            "comparison-near-far", "comparison-gains", "reported", "reproduce-profiles", "reproduce-times",
            *(f"regime-{r}" for r in config.NOTEBOOK_REGIMES),
            "search-results",
            *(f"{part}-{d}" for part in ("datasets", "embeddings", "errors") for d in config.DATASETS))
_PATH_PARAMETERS = ("data_dir", "output_dir", "cache_dir", "source_dir")
_FERPLUS_RULES = {
    "majority": "FERPlus's official rule: single votes are zeroed, the top emotion needs more than half of "
                "the remaining votes; unknown / not-a-face winners are dropped",
    "argmax": "the top vote (first on ties) unless it is unknown / not-a-face: the labels of the Kaggle "
              "FER2013Plus folders",
    "votes": "the same images as argmax, each keeping its vote distribution as a soft target",
}


class BookError(ValueError):
    """Bad input to the book generator; the message names it and the fix."""


def page_name(dataset: str, model: str, regime: str) -> str:
    """The stable name of a run's page under ``book/_generated/runs/`` (no extension)."""
    return f"{dataset}-{model}-{regime}"


@dataclass
class RunState:
    """One cell of the study's matrix as the results store has it: ok, failed, or missing (never run)."""

    dataset: str
    model: str
    regime: str
    status: str
    run_dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{REGIME_LABELS[self.regime]}: {MODEL_LABELS[self.model]} on {DATASET_LABELS[self.dataset]}"

    @property
    def doc(self) -> str:
        return f"/{GENERATED.as_posix()}/runs/{page_name(self.dataset, self.model, self.regime)}"

    @property
    def pretrained(self) -> bool | None:
        return self.meta.get("pretrained", self.params.get("pretrained"))

    def provenance(self, short: bool = False) -> str:
        """Profile, initialisation, device and date of this run, as a sentence or (``short``) a table cell."""
        if self.status == "missing":
            return "not run yet"
        if short:
            init = {True: "pretrained", False: "random init"}.get(self.pretrained, "init unknown")
            return " · ".join(str(v) for v in (self.meta.get("profile", "?"), init, self.meta.get("device"),
                                               str(self.meta.get("date", ""))[:10]) if v)
        parts = [f"profile `{self.meta.get('profile', '?')}`", _init_label(self.pretrained)]
        if self.meta.get("device"):
            parts.append(f"device `{self.meta['device']}`")
        if self.meta.get("date"):
            parts.append(str(self.meta["date"])[:10])
        return " · ".join(parts)


@dataclass
class _Book:
    profile: str
    data_root: Path
    out: Path
    table: pd.DataFrame
    runs: dict[tuple[str, str, str], RunState]

    @property
    def pretrained(self) -> bool | None:
        """The finished runs' common initialisation (None when they differ or nothing finished)."""
        values = {s.pretrained for s in self.runs.values() if s.status == "ok"}
        return values.pop() if len(values) == 1 else None

    def ok(self, dataset: str, model: str, regime: str) -> RunState | None:
        state = self.runs[(dataset, model, regime)]
        return state if state.status == "ok" else None

    def figure_path(self, name: str) -> tuple[Path, str]:
        """(file to write, the path a page uses: absolute from the book's root)."""
        return self.out / "figures" / f"{name}.png", f"/{GENERATED.as_posix()}/figures/{name}.png"


def generate(profile_dir: str | Path, data_root: str | Path, book_root: str | Path) -> list[Path]:
    """Write ``<book_root>/book/_generated/`` from the runs under ``profile_dir`` (= ``<runs>/<profile>``).

    ``data_root`` holds ``cifar10/`` and ``ferplus/`` (the dataset chapter and the error images read it;
    a missing dataset becomes a note); ``book_root`` holds ``_config.yml`` and ``_toc.yml``. The search
    chapter reads every study under ``<profile_dir>/../search/``, of any profile. Returns the files written.
    """
    profile_dir, data_root, book_root = Path(profile_dir), Path(data_root), Path(book_root)
    if profile_dir.name not in config.profiles():
        raise BookError(f"profile_dir={str(profile_dir)!r} must be <runs dir>/<profile>, with a profile out of "
                        f"{', '.join(config.profiles())}; e.g. runs/{next(iter(config.profiles()))}")
    if not (book_root / "_toc.yml").is_file():
        raise BookError(f"book_root={str(book_root)!r} has no _toc.yml; pass the folder holding the book's "
                        f"_config.yml and _toc.yml (the repository root)")
    out = book_root / GENERATED
    shutil.rmtree(out, ignore_errors=True)
    for sub in ("runs", "include", "figures"):
        (out / sub).mkdir(parents=True)
    table = results.collect(profile_dir) if profile_dir.is_dir() else pd.DataFrame(columns=results.TABLE_COLUMNS)
    book = _Book(profile_dir.name, data_root, out, table, _run_states(table))

    for state in book.runs.values():
        _write_run_page(book, state)
    snippets = {"banner": _banner(book), **_models(), **_comparison(book), "reported": _reported(book),
                "reproduce-profiles": _profiles(book), "reproduce-times": _times(book),
                "search-results": _searches(book, profile_dir.parent / "search")}
    for regime in config.NOTEBOOK_REGIMES:
        snippets[f"regime-{regime}"] = _regime_table(book, regime)
    for dataset in config.DATASETS:
        snippets[f"datasets-{dataset}"] = _dataset_section(book, dataset)
        snippets[f"embeddings-{dataset}"] = _embeddings_section(book, dataset)
        snippets[f"errors-{dataset}"] = _errors_section(book, dataset)
    for name, text in snippets.items():
        (out / "include" / f"{name}.md").write_text(text.rstrip() + "\n")
    return sorted(p for p in out.rglob("*") if p.is_file())


# --- the results store ----------------------------------------------------------------------


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    return results.read_json(path) if path.is_file() else {}


def _run_states(table: pd.DataFrame) -> dict[tuple[str, str, str], RunState]:
    states = {}
    for spec in runner.matrix():
        rows = table[(table["dataset"] == spec.dataset) & (table["model"] == spec.model)
                     & (table["regime"] == spec.regime)]
        if rows.empty:
            states[(spec.dataset, spec.model, spec.regime)] = RunState(spec.dataset, spec.model, spec.regime, "missing")
            continue
        run_dir = Path(rows.iloc[0]["run_dir"])
        states[(spec.dataset, spec.model, spec.regime)] = RunState(
            spec.dataset, spec.model, spec.regime, str(rows.iloc[0]["status"]), run_dir,
            _read_json_or_empty(run_dir / "meta.json"), _read_json_or_empty(run_dir / "params.json"))
    return states


def _code(text: str) -> str:
    """``text`` as inline code (its own backticks become quotes)."""
    return "`" + text.replace("`", "'") + "`"


def _error_line(meta: dict[str, Any]) -> str:
    """A failed run's error, first line only, as inline code."""
    lines = str(meta.get("error") or "unknown error").strip().splitlines()
    return _code(lines[0] if lines else "unknown error")


def _init_label(pretrained: bool | None) -> str:
    return {True: "ImageNet-pretrained", False: "**random initialisation**"}.get(pretrained, "initialisation unknown")


def _pct(value: Any) -> str:
    return "—" if value is None or pd.isna(value) else f"{100 * float(value):.2f}%"


def _pp(value: float | None) -> str:
    return "—" if value is None or pd.isna(value) else f"{100 * value:+.2f} pp"


def _cell(value: Any) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "—"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: Iterable[Iterable[Any]], name: str | None = None,
           caption: str | None = None) -> str:
    """A MyST pipe table; with ``name`` wrapped in a ``{table}`` directive (the HTML table gets that id)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    body = "\n".join(lines)
    if name is None:
        return body + "\n"
    return f":::{{table}} {caption or ''}\n:name: {name}\n\n{body}\n:::\n"  # a colon fence: the caption may hold `code`


def _note(text: str, kind: str = "note") -> str:
    return f"```{{{kind}}}\n{text}\n```\n"


def _figure(book: _Book, fig, name: str, caption: str, alt: str) -> str:
    """Save ``fig`` and return the ``{figure}`` directive showing it."""
    file, src = book.figure_path(name)
    fig.savefig(file, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return f"```{{figure}} {src}\n:name: fig-{name}\n:alt: {alt}\n:width: 100%\n\n{caption}\n```\n"


def _source(book: _Book, states: Iterable[RunState]) -> str:
    """'Source: ...' naming the runs' profile, initialisation, device and dates."""
    states = [s for s in states if s.status == "ok"]
    if not states:
        return f"Source: no finished run of profile `{book.profile}`."
    inits = sorted({_init_label(s.pretrained) for s in states})
    devices = sorted({str(s.meta.get("device", "?")) for s in states})
    days = sorted({str(s.meta.get("date", "?"))[:10] for s in states})
    when = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
    return (f"Source: profile `{book.profile}` · {' and '.join(inits)} · device {', '.join(f'`{d}`' for d in devices)}"
            f" · {when}.")


def _rerun_command(book: _Book, state: RunState) -> str:
    """The command that reruns this one run, with the initialisation it (or else the rest of the book) used."""
    pretrained = state.pretrained if state.pretrained is not None else book.pretrained
    extra = " -p pretrained false" if pretrained is False else ""
    return (f"transferstudy run --profile {book.profile} --data-root data "
            f"--only {state.dataset}/{state.model}/{state.regime} --force{extra}")


# --- the run pages --------------------------------------------------------------------------


def _write_run_page(book: _Book, state: RunState) -> None:
    base = book.out / "runs" / page_name(state.dataset, state.model, state.regime)
    notebook = state.run_dir / "notebook.ipynb" if state.run_dir else None
    if state.status == "ok" and notebook is not None and notebook.is_file():
        nbformat.write(_clean_notebook(nbformat.read(notebook, as_version=4), state), base.with_suffix(".ipynb"))
        return
    run_cmd = _rerun_command(book, state)
    if state.status == "failed":
        partial = (f" The partial notebook, executed up to the failing cell, is `{state.run_dir / 'notebook.ipynb'}`."
                   if notebook is not None and notebook.is_file() else "")
        body = _note(f"This run **failed**: {_error_line(state.meta)}.{partial}", "error")
        body += (f"\nThe run stopped before it finished, so this page shows no results, and the results "
                 f"tables list it as `failed`. Fix the cause, then rerun it alone:\n\n```bash\n{run_cmd}\n```\n")
    elif state.status == "ok":
        body = _note(f"This run finished ({state.provenance()}), but its executed notebook is missing from "
                     f"`{state.run_dir}`. Rerun it to restore the page.") + f"\n```bash\n{run_cmd}\n```\n"
    else:
        body = _note(f"**Not run yet** in profile `{book.profile}`. Run it (or `make book`, which runs every "
                     f"missing run):") + f"\n```bash\n{run_cmd}\n```\n"
    notebook_file = runner.NOTEBOOKS[state.regime]
    body += (f"\nThe notebook behind this page is `notebooks/{notebook_file}`, run with "
             f"`model={state.model}`, `dataset={state.dataset}`, `profile={book.profile}`.\n")
    base.with_suffix(".md").write_text(f"# {state.title}\n\n{_banner(book)}\n{body}")


def _clean_notebook(nb: nbformat.NotebookNode, state: RunState) -> nbformat.NotebookNode:
    """The executed notebook as the book shows it: retitled, parameter cells hidden, papermill's traces gone."""
    injected = dict(nb.metadata.get("papermill", {}).get("parameters", {}))
    nb.metadata.pop("papermill", None)
    cells = []
    for cell in nb.cells:
        tags = list(cell.metadata.get("tags", []))
        if "papermill-error-cell-tag" in tags:
            continue
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if "injected-parameters" in tags:
            # Keep the downloaded notebook re-runnable as this run, minus this machine's paths.
            kept = {k: v for k, v in injected.items() if k not in _PATH_PARAMETERS}
            cell.source = "# Parameters of this run (paths left to their defaults)\n" + "".join(
                f"{k} = {v!r}\n" for k, v in kept.items())
            cell.outputs = []
        if {"parameters", "injected-parameters"} & set(tags):
            tags.append("remove-cell")
        if tags:
            cell.metadata["tags"] = tags
        else:
            cell.metadata.pop("tags", None)
        cells.append(cell)
    title = next((c for c in cells if c.cell_type == "markdown"), None)
    if title is not None and title.source.startswith("# "):
        title.source = f"# {state.title}\n" + title.source.partition("\n")[2]
        at = cells.index(title) + 1
    else:
        cells.insert(0, nbformat.v4.new_markdown_cell(f"# {state.title}"))
        at = 1
    cells.insert(at, nbformat.v4.new_markdown_cell(_parameters_box(state, injected)))
    nb.cells = cells
    return nb


def _parameters_box(state: RunState, injected: dict[str, Any]) -> str:
    rows = [(k, f"`{v!r}`", "set for this run" if k in injected else "profile")
            for k, v in state.params.items() if k not in _PATH_PARAMETERS]
    return (f":::{{admonition}} Parameters of this run\n:class: dropdown\n\n{state.provenance()}; notebook "
            f"`notebooks/{runner.NOTEBOOKS[state.regime]}`.\n\n"
            + _table(["setting", "value", "from"], rows) + ":::\n")


# --- banner and tables of runs --------------------------------------------------------------


def _banner(book: _Book) -> str:
    states = list(book.runs.values())
    done = [s for s in states if s.status == "ok"]
    if not done:
        return _note(f"No finished runs in profile `{book.profile}` yet, so this book shows no results. "
                     f"Run the study with `make book PROFILE={book.profile}`.")
    text = ""
    random = [s for s in done if s.pretrained is False]
    if random:
        which = "every run" if len(random) == len(done) else f"{len(random)} of the {len(done)} finished runs"
        text += _note(f"This book was built from **randomly initialised** backbones (`pretrained: false`) in "
                      f"{which}, not from ImageNet weights: the numbers show that the pipeline runs, not what "
                      f"transfer learning achieves.", "warning") + "\n"
    counts = {k: sum(s.status == k for s in states) for k in ("ok", "failed", "missing")}
    text += (f"**Results in this book:** {_source(book, done).removeprefix('Source: ').rstrip('.')} · "
             f"{counts['ok']} of {len(states)} runs finished, {counts['failed']} failed, "
             f"{counts['missing']} not run yet.")
    if book.profile == "smoke":
        text += " The smoke profile trains on a handful of images: its numbers mean nothing."
    return text + "\n"


def _best_classical(state: RunState) -> tuple[str | None, dict[str, Any]]:
    """(classifier, its metrics) of a finished run: the classical regime's best-on-validation classifier."""
    metrics = _read_json_or_empty(state.run_dir / "metrics.json") if state.run_dir else {}
    if "classifiers" in metrics:
        name = metrics.get("best") or max(metrics["classifiers"], key=lambda k: metrics["classifiers"][k]["val"]["accuracy"])
        return name, metrics["classifiers"][name]
    return metrics.get("classifier"), metrics


def _summary(book: _Book) -> pd.DataFrame:
    """One row per finished run: dataset, model, regime, classifier, trainable, val/test accuracy."""
    rows = []
    for state in book.runs.values():
        if state.status != "ok":
            continue
        classifier, metrics = _best_classical(state)
        test = metrics.get("test", {}).get("accuracy")
        if test is None:
            continue
        rows.append({"dataset": state.dataset, "model": state.model, "regime": state.regime,
                     "classifier": classifier, "trainable": state.meta.get("trainable"),
                     "val_accuracy": metrics.get("val", {}).get("accuracy"), "test_accuracy": test})
    return pd.DataFrame(rows, columns=["dataset", "model", "regime", "classifier", "trainable", "val_accuracy",
                                       "test_accuracy"])


def _regime_table(book: _Book, regime: str) -> str:
    rows = []
    for (dataset, model, r), state in book.runs.items():
        if r != regime:
            continue
        classifier, metrics = _best_classical(state) if state.status == "ok" else (None, {})
        status = f"{{doc}}`{state.status if state.status != 'missing' else 'not run yet'} <{state.doc}>`"
        if state.status == "failed":
            status += f": {_error_line(state.meta)}"
        rows.append((DATASET_LABELS[dataset], MODEL_LABELS[model], status,
                     _pct(metrics.get("val", {}).get("accuracy")), _pct(metrics.get("test", {}).get("accuracy")),
                     classifier, state.meta.get("trainable"), state.provenance(short=True)))
    return _table(["dataset", "model", "run", "val acc", "test acc", "classifier", "trainable", "provenance"], rows)


# --- datasets -------------------------------------------------------------------------------


def _dataset_section(book: _Book, dataset: str) -> str:
    cfg = config.resolve("full", config.MODELS[0], dataset, book.profile)
    data_dir = book.data_root / dataset
    rule = cfg["label_rule"] if dataset == "ferplus" else None
    try:
        ds = data.load_dataset(dataset, data_dir, label_rule=rule, val_source=cfg["val_source"],
                               seed=cfg["seed"], decode=False)
    except data.DataError as exc:
        return _note(f"No figures for {DATASET_LABELS[dataset]}: the data root `{book.data_root}` has no usable "
                     f"`{dataset}/` folder: {_code(str(exc))}. Run `make data` (or pass `--data-root`) and rerun "
                     f"`transferstudy book-data`.")
    full = data.summarize(ds)
    try:
        sub = data.summarize(data.load_dataset(dataset, data_dir, label_rule=rule, val_source=cfg["val_source"],
                                               n_train=cfg["n_train"], n_val=cfg["n_val"], n_test=cfg["n_test"],
                                               seed=cfg["seed"], decode=False))
    except data.DataError as exc:  # the profile asks for more images than this copy has
        sub = {"split_hash": f"none: {exc}", "splits": {s: {"n": None} for s in ("train", "val", "test")}}
    where = f"Source: `{data_dir}`, {full['dataset']} in the `{ds.info['layout']}` layout"
    where += f", label rule `{full['label_rule']}`." if dataset == "ferplus" else "."
    text = "### Split sizes\n\n"
    text += (f"The training folder is split 80/20 into train and validation, stratified by class with seed "
             f"{cfg['seed']} (split hash `{full['split_hash']}`); profile `{book.profile}` then draws stratified "
             f"subsets (split hash `{sub['split_hash']}`).\n\n")
    text += _table(["split", "whole dataset", f"profile `{book.profile}`"],
                   [(s, full["splits"][s]["n"], sub["splits"][s]["n"]) for s in ("train", "val", "test")])
    text += "\n### Class balance\n\n"
    per_split = {s: full["splits"][s]["per_class"] for s in ("train", "val", "test")}
    fig = figures.class_balance(per_split, f"{DATASET_LABELS[dataset]}: images per class and split")
    text += _figure(book, fig, f"balance-{dataset}", f"Images per class in each split of the whole dataset. {where}",
                    f"bar chart of {DATASET_LABELS[dataset]} images per class")
    text += "\n### Examples of each class\n\n" + _samples(book, ds, data_dir, where)
    if dataset == "ferplus":
        text += "\n### Label rules\n\n" + _label_rules(data_dir, ds.info["layout"])
    return text


def _read_image(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    with Image.open(path) as img:
        return np.asarray(img.convert("L") if img.mode in ("L", "LA", "I", "I;16") else img.convert("RGB"))


def _samples(book: _Book, ds: data.DatasetSplits, data_dir: Path, where: str, per_class: int = 6) -> str:
    rng = np.random.default_rng(0)
    labels = ds.train.labels.numpy()
    images: dict[str, list[np.ndarray]] = {}
    for k, cls in enumerate(ds.classes):
        picked = rng.permutation(np.flatnonzero(labels == k))[:per_class]
        images[cls] = [img for i in picked if (img := _read_image(data_dir / ds.train.files[i])) is not None]
    if not any(images.values()):
        return _note(f"No example images: the {ds.name} files under `{data_dir}` are not individual image files "
                     f"(e.g. torchvision's pickled CIFAR-10).")
    fig = figures.sample_grid(images, f"{DATASET_LABELS[ds.name]}: random training images per class")
    return _figure(book, fig, f"samples-{ds.name}", f"Up to {per_class} random training images per class, at their "
                   f"native size. {where}", f"grid of {DATASET_LABELS[ds.name]} example images, one row per class")


def _label_rules(data_dir: Path, layout: str) -> str:
    if layout != "microsoft":
        return _note(f"This FERPlus copy (`{layout}` layout) carries one label per image in its folder names (the "
                     f"argmax rule); the vote-based rules need Microsoft's `label.csv` files.")
    counts, per_class = [], {}
    for rule, keeps in _FERPLUS_RULES.items():
        ds = data.load_dataset("ferplus", data_dir, label_rule=rule, val_source="official", decode=False)
        n = {s: len(getattr(ds, s)) for s in ("train", "val", "test")}
        counts.append((f"`{rule}`", keeps, n["train"], n["val"], n["test"], sum(n.values())))
        per_class[rule] = data.summarize(ds)["splits"]["train"]["per_class"]
    text = ("Each image has ten crowd votes; a label rule turns them into a class and decides which images to keep. "
            "Counts per official folder (FER2013Train / Valid / Test), computed from `label.csv`:\n\n")
    text += _table(["rule", "what it keeps", "train", "valid", "test", "total"], counts)
    text += "\nImages per class in FER2013Train under each rule (the rare classes are the hard ones):\n\n"
    classes = list(next(iter(per_class.values())))
    text += _table(["class", *[f"`{r}`" for r in per_class]], [(c, *[per_class[r][c] for r in per_class]) for c in classes])
    return text


# --- models ---------------------------------------------------------------------------------


def _describe(module: nn.Module) -> str:
    """A layer in a few words: its shape for a leaf, counts of its direct children's types otherwise."""
    children = [c for c in module.children() if not isinstance(c, nn.Identity)]
    if not children:
        if isinstance(module, nn.Linear):
            return f"Linear({module.in_features} → {module.out_features})"
        if isinstance(module, nn.Conv2d):
            return f"Conv2d({module.in_channels} → {module.out_channels}, {module.kernel_size[0]}×{module.kernel_size[1]})"
        return type(module).__name__
    counts: dict[str, int] = {}
    for child in children:
        counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
    return ", ".join(f"{n} × {kind}" for kind, n in counts.items())


def _models() -> dict[str, str]:
    import torch

    from . import models, regimes

    text = ""
    for name in config.MODELS:
        with torch.device("meta"):
            net = models.build_model(name, len(data.CLASSES["cifar10"]), pretrained=False)
        rows = [(f"`{child}`", _describe(module), sum(p.numel() for p in module.parameters()))
                for child, module in net.named_children() if not isinstance(module, nn.Identity)]
        own = sum(p.numel() for p in net.parameters(recurse=False))
        if own:
            names = ", ".join(f"`{k}`" for k, _ in net.named_parameters(recurse=False))
            rows.append((names, "learned tokens / embeddings", own))
        rows.append(("**total**", "", sum(p.numel() for p in net.parameters())))
        text += f"### {MODEL_LABELS[name]}\n\n"
        text += (f"Top-level modules of `{name}` as the library builds it (10-class head), what each holds "
                 f"and its parameters:\n\n")
        text += _table(["module", "layers", "parameters"], rows) + "\n"
    rows = []
    for dataset in config.DATASETS:
        for name in config.MODELS:
            for row in regimes.param_table(name, len(data.CLASSES[dataset])):
                rows.append((DATASET_LABELS[dataset], MODEL_LABELS[name], REGIME_LABELS[row["regime"]],
                             row["trainable"], row["total"], f"{100 * row['trainable'] / row['total']:.3f}%"))
    params = _table(["dataset", "model", "regime", "trainable", "total", "share trained"], rows, name="param-table",
                    caption="Trainable and total parameters, counted by `regimes.param_table` on the real modules")
    return {"models-architecture": text, "models-params": params}


# --- comparison -----------------------------------------------------------------------------


def _comparison(book: _Book) -> dict[str, str]:
    summary = _summary(book)
    source = _source(book, book.runs.values())
    points = summary.dropna(subset=["trainable"])
    fig = figures.accuracy_vs_params(points, DATASET_LABELS, MODEL_LABELS, REGIME_LABELS,
                                     "Test accuracy against trainable parameters", ladder=STEPS)
    parts = {}
    parts["comparison-figure"] = _figure(book, fig, "accuracy-vs-params",
                   "Test accuracy against the number of trained parameters (log scale), one marker per model and "
                   "regime; lines join each model's frozen SVM, linear probe, partial and full fine-tune. The "
                   "classical regime shows its best classifier on validation; the SVM regime counts the SVM's own "
                   f"parameters. Missing markers are runs that failed or have not run. {source}",
                   "scatter plot of test accuracy against trainable parameters, one panel per dataset")
    acc = {(r.dataset, r.model, r.regime): r.test_accuracy for r in summary.itertuples()}
    get = acc.get

    rows = [(DATASET_LABELS[d], REGIME_LABELS[r], _pct(get((d, "alexnet", r))), _pct(get((d, "deit_base", r))),
             _pp(get((d, "deit_base", r)) - get((d, "alexnet", r))
                 if (d, "alexnet", r) in acc and (d, "deit_base", r) in acc else None))
            for d in config.DATASETS for r in config.NOTEBOOK_REGIMES]
    parts["comparison-cnn-vit"] = _table(["dataset", "regime", "AlexNet", "DeiT-Base", "DeiT − AlexNet"], rows) + f"\n{source}\n"
    rows = [(MODEL_LABELS[m], REGIME_LABELS[r], _pct(get(("cifar10", m, r))), _pct(get(("ferplus", m, r))),
             _pp(get(("ferplus", m, r)) - get(("cifar10", m, r))
                 if ("cifar10", m, r) in acc and ("ferplus", m, r) in acc else None))
            for m in config.MODELS for r in config.NOTEBOOK_REGIMES]
    parts["comparison-near-far"] = (_table(["model", "regime", "CIFAR-10 (near)", "FERPlus (far)", "far − near"], rows)
                                    + f"\n{source}\n")
    header = ["dataset", "model", REGIME_LABELS[STEPS[0]]] + [f"→ {REGIME_LABELS[s]}" for s in STEPS[1:]]
    rows = []
    for d in config.DATASETS:
        for m in config.MODELS:
            steps = [get((d, m, s)) for s in STEPS]
            gains = [_pp(b - a) if a is not None and b is not None else "—" for a, b in zip(steps, steps[1:])]
            rows.append((DATASET_LABELS[d], MODEL_LABELS[m], _pct(steps[0]), *gains))
    parts["comparison-gains"] = (f"Test accuracy of the frozen-feature SVM, then what each further step of training "
                                 f"adds (percentage points; — where either run is missing):\n\n"
                                 + _table(header, rows) + f"\n{source}\n")
    return parts


# --- embeddings -----------------------------------------------------------------------------


def _project(X: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    reduced = PCA(n_components=min(50, n - 1, X.shape[1]), random_state=seed).fit_transform(X)
    if method == "PCA":
        return reduced[:, :2]
    if method == "t-SNE":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=min(30.0, max(1.0, (n - 1) / 3)), init="pca", random_state=seed,
                    method="exact" if n < 500 else "barnes_hut").fit_transform(reduced)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap: "n_jobs overridden by random_state", numba deprecations
        import umap

        return umap.UMAP(n_neighbors=min(15, n - 1), init="pca", random_state=seed).fit_transform(reduced)


def _embeddings_section(book: _Book, dataset: str) -> str:
    classes = list(data.CLASSES[dataset])
    text = ""
    for model in config.MODELS:
        text += f"### {MODEL_LABELS[model]}\n\n"
        sources = {"frozen (before training)": (book.ok(dataset, model, "frozen_svm"), "embeddings-frozen.npz"),
                   "fine-tuned (full)": (book.ok(dataset, model, "full"), "embeddings-finetuned.npz")}
        loaded, missing = {}, []
        for label, (state, file) in sources.items():
            path = state.run_dir / file if state else None
            if path is not None and path.is_file():
                arrays = np.load(path)
                if len(arrays["y"]) >= MIN_EMBED_POINTS:
                    loaded[label] = (arrays["X"], arrays["y"], state)
                    continue
                missing.append(f"{label}: only {len(arrays['y'])} embeddings kept (t-SNE and UMAP need at least "
                               f"{MIN_EMBED_POINTS}; raise `n_embed_plot`)")
            else:
                missing.append(f"{label}: no `{file}` (its run has not finished)")
        if missing:
            text += _note("Not shown: " + "; ".join(missing) + ".")
        if not loaded:
            text += "\n"
            continue
        source = _source(book, [s for _, _, s in loaded.values()])
        for method in EMBEDDING_METHODS:
            panels = {label: (_project(X, method), y) for label, (X, y, _) in loaded.items()}
            fig = figures.embedding_scatter(panels, classes, method, f"{MODEL_LABELS[model]} on "
                                            f"{DATASET_LABELS[dataset]}: {method} of test embeddings")
            n = ", ".join(f"{len(y)} {label}" for label, (_, y) in panels.items())
            text += _figure(book, fig, f"embeddings-{dataset}-{model}-{method.lower().replace('-', '')}",
                            f"{method} of the test images' embeddings ({n}), coloured by class. {source}",
                            f"{method} scatter of {MODEL_LABELS[model]} embeddings coloured by class")
        text += "\n"
    return text


# --- errors ---------------------------------------------------------------------------------


def _error_run(book: _Book, dataset: str, model: str) -> RunState | None:
    """The run whose errors a model's section shows: the full fine-tune, else its best finished run."""
    full = book.ok(dataset, model, "full")
    if full is not None:
        return full
    summary = _summary(book)
    mine = summary[(summary["dataset"] == dataset) & (summary["model"] == model) & (summary["regime"] != "classical")]
    if mine.empty:
        return None
    return book.runs[(dataset, model, mine.sort_values("test_accuracy").iloc[-1]["regime"])]


def _errors_section(book: _Book, dataset: str) -> str:
    classes = list(data.CLASSES[dataset])
    chosen = {m: s for m in config.MODELS if (s := _error_run(book, dataset, m)) is not None}
    if not chosen:
        return _note(f"No finished run on {DATASET_LABELS[dataset]} yet: no errors to show.")
    metrics = {m: _read_json_or_empty(s.run_dir / "metrics.json") for m, s in chosen.items()}
    source = _source(book, chosen.values())
    label = {m: f"{MODEL_LABELS[m]}, {REGIME_LABELS[s.regime].lower()}" for m, s in chosen.items()}

    fig, axes = plt.subplots(1, len(chosen), figsize=(6.2 * len(chosen), 5.6), squeeze=False)
    for ax, m in zip(axes[0], chosen):
        figures.confusion_matrix(metrics[m]["test"]["confusion_matrix"], classes, label[m], ax=ax)
    fig.suptitle(f"{DATASET_LABELS[dataset]}: test confusion matrices (rows: true class, normalised)")
    fig.tight_layout()
    text = "### Confusion matrices\n\n" + _figure(
        book, fig, f"confusion-{dataset}", f"Each row is a true class; the diagonal is its recall. Runs shown: the "
        f"full fine-tune, or each model's best finished run. {source}", "confusion matrices side by side")

    f1 = pd.DataFrame({label[m]: {c: metrics[m]["test"]["per_class"][c]["f1"] for c in classes} for m in chosen})
    fig = figures.per_class_f1_compare(f1, f"{DATASET_LABELS[dataset]}: per-class test F1")
    text += "\n### Per-class F1\n\n" + _figure(book, fig, f"f1-{dataset}", f"Per-class F1 on the test set, weakest "
                                               f"classes at the bottom. {source}", "per-class F1 bars")
    text += _f1_table(book, dataset, classes)
    text += "\n### Misclassified test images\n\n"
    for m, state in chosen.items():
        text += f"**{label[m]}.**\n\n" + _misclassified(book, state, classes, label[m])
    return text


def _f1_table(book: _Book, dataset: str, classes: list[str]) -> str:
    columns, values = [], []
    for (d, m, r), state in book.runs.items():
        if d != dataset or state.status != "ok":
            continue
        _, metrics = _best_classical(state)
        per_class = metrics.get("test", {}).get("per_class")
        if per_class:
            columns.append(f"{MODEL_LABELS[m]} {r}")
            values.append([per_class.get(c, {}).get("f1") for c in classes])
    if not columns:
        return ""
    rows = [(c, *[f"{v[i]:.2f}" if v[i] is not None else "—" for v in values]) for i, c in enumerate(classes)]
    return ("\nPer-class test F1 of every finished run (classical: its best classifier):\n\n"
            + _table(["class", *columns], rows) + "\n")


def _misclassified(book: _Book, state: RunState, classes: list[str], label: str, limit: int = 12) -> str:
    path = state.run_dir / "predictions.npz"
    if not path.is_file():
        return _note(f"No `predictions.npz` in `{state.run_dir}`.")
    pred = np.load(path)
    wrong = np.flatnonzero(pred["y_true"] != pred["y_pred"])[:limit]
    if len(wrong) == 0:
        return f"No test image was misclassified ({len(pred['y_true'])} images).\n\n"
    data_dir = book.data_root / state.dataset
    images, captions = [], []
    for i in wrong:
        image = _read_image(data_dir / str(pred["files"][i]))
        if image is not None:
            images.append(image)
            captions.append(f"true: {classes[pred['y_true'][i]]}\npredicted: {classes[pred['y_pred'][i]]}")
    if not images:
        return _note(f"The misclassified images are not readable under `{data_dir}` (the data root lacks them, or "
                     f"they are not individual files); pass the data root the runs used.")
    fig = figures.captioned_grid(images, captions, f"{label}: misclassified test images")
    return _figure(book, fig, f"misclassified-{state.dataset}-{state.model}",
                   f"The first {len(images)} misclassified test images of {len(pred['y_true'])}, with true and "
                   f"predicted class. {_source(book, [state])}", "grid of misclassified test images")


# --- reported vs reproduced ---------------------------------------------------------------------


def _reported(book: _Book) -> str:
    with resources.files("transferstudy").joinpath("reported.csv").open() as fh:
        reported = pd.read_csv(fh)
    keys = ["model", "dataset", "regime", "classifier"]
    reported["classifier"] = reported["classifier"].fillna("")
    ours = book.table[book.table["status"] == "ok"].copy()
    ours["classifier"] = ours["classifier"].fillna("").astype(str)
    merged = reported[[*keys, "val_accuracy", "test_accuracy"]].merge(
        ours[[*keys, "val_accuracy", "test_accuracy"]], on=keys, how="outer", suffixes=("_reported", "_here"))
    listed = set(zip(merged["dataset"], merged["model"], merged["regime"]))
    extra = [{"dataset": d, "model": m, "regime": r, "classifier": ""}
             for (d, m, r), s in book.runs.items() if s.status != "ok" and (d, m, r) not in listed]
    merged = pd.concat([merged, pd.DataFrame(extra, columns=keys)], ignore_index=True)
    order = {name: i for i, name in enumerate(config.NOTEBOOK_REGIMES)}
    merged = merged.sort_values(["dataset", "model", "regime", "classifier"],
                                key=lambda s: s.map(order) if s.name == "regime" else s)
    rows = []
    for r in merged.itertuples():
        state = book.runs[(r.dataset, r.model, r.regime)]
        if state.status == "failed":
            here = f"failed: {_error_line(state.meta)}"
        elif state.status == "missing":
            here = "not run yet"
        elif pd.isna(r.test_accuracy_here):
            here = "not among this build's classifiers"
        else:
            here = f"{_pct(r.val_accuracy_here)} / {_pct(r.test_accuracy_here)}"
        reported_cell = ("—" if pd.isna(r.test_accuracy_reported)
                         else f"{_pct(r.val_accuracy_reported)} / {_pct(r.test_accuracy_reported)}")
        rows.append((DATASET_LABELS[r.dataset], MODEL_LABELS[r.model], r.regime.replace("_", " "),
                     r.classifier.replace("_", " ") or "—", reported_cell, here))
    header = ["dataset", "model", "regime", "classifier", "reported val / test", "this build val / test"]
    text = _table(header, rows, name="reported-table",
                  caption=f"The original study's numbers beside this build's (profile `{book.profile}`)")
    runs = [(DATASET_LABELS[s.dataset], MODEL_LABELS[s.model], f"{{doc}}`{s.regime.replace('_', ' ')} <{s.doc}>`",
             s.status if s.status != "missing" else "not run yet",
             {True: "pretrained", False: "random init"}.get(s.pretrained, "—"), s.meta.get("device", "—"),
             str(s.meta.get("date", "—"))[:10],
             f"{s.meta['torch']} / {s.meta.get('timm', '?')}" if s.meta.get("torch") else "—")
            for s in book.runs.values()]
    return text + "\n" + _table(["dataset", "model", "regime", "status", "weights", "device", "date",
                                 "torch / timm"], runs, name="provenance-table",
                                caption=f"Where each number of this build came from: its runs of profile "
                                        f"`{book.profile}`")


# --- reproduce ------------------------------------------------------------------------------


def _profiles(book: _Book) -> str:
    rows = [(f"`{name}`" + (" (this build)" if name == book.profile else ""), text)
            for name, text in config.profiles().items()]
    return _table(["profile", "what it runs"], rows)


def _times(book: _Book) -> str:
    ran = [((d, m, r), s) for (d, m, r), s in book.runs.items() if s.status != "missing"]
    rows = [(DATASET_LABELS[d], MODEL_LABELS[m], REGIME_LABELS[r], s.status,
             f"{float(s.meta['wall_s']):.0f} s" if s.meta.get("wall_s") is not None else "—",
             f"{s.meta['peak_rss_mb'] / 1024:.1f} GiB" if s.meta.get("peak_rss_mb") is not None else "—",
             s.meta.get("device", "—"))
            for (d, m, r), s in ran]
    if not rows:
        return _note(f"No run of profile `{book.profile}` has been timed yet.")
    total = sum(float(s.meta.get("wall_s") or 0) for _, s in ran)
    peaks = [s.meta["peak_rss_mb"] for _, s in ran if s.meta.get("peak_rss_mb") is not None]
    peak = f"; the largest peak resident memory of a run was {max(peaks) / 1024:.1f} GiB" if peaks else ""
    return (f"Measured: the wall time of each run of this build (profile `{book.profile}`), notebook start to "
            f"finish, and the peak resident memory of its notebook's process; {total / 60:.1f} minutes in all"
            f"{peak}.\n\n"
            + _table(["dataset", "model", "regime", "status", "wall time", "peak memory", "device"], rows)
            + f"\n{_source(book, book.runs.values())}\n")




# --- hyperparameter searches ----------------------------------------------------------------

SEARCH_EXAMPLE = ("transferstudy search --model alexnet --dataset cifar10 --regime linear_probe --profile quick "
                  "--trials 4 -p pretrained false")
_SUMMARY_KEYS = ("study", "dataset", "model", "regime", "profile", "states")


def _searches(book: _Book, search_dir: Path) -> str:
    """One section per study under ``search_dir`` (``<runs>/search``), or a note saying how to run one."""
    folders = sorted(p.parent for p in search_dir.glob("*/summary.json"))
    if not folders:
        return (f":::{{note}}\nNo hyperparameter search has run yet: `{search_dir}` holds no `*/summary.json`. "
                f"Run one, for example\n\n```bash\n{SEARCH_EXAMPLE}\n```\n\nand the next `make book` (or "
                f"`transferstudy book-data` then `jupyter-book build .`) shows its results here.\n:::\n")
    return "\n".join(_study_section(book, folder) for folder in folders)


def _read_study(folder: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """A search folder's ``summary.json`` and ``trials.csv`` (parameters kept as the text the search wrote)."""
    fix = (f"rerun one worker of that search (`transferstudy search` with the same options) to rewrite it, "
           f"or remove {folder}")
    try:
        summary = results.read_json(folder / "summary.json")
        columns = pd.read_csv(folder / "trials.csv", nrows=0).columns
        trials = pd.read_csv(folder / "trials.csv", dtype={c: str for c in columns if c.startswith("param_")})
    except (ValueError, FileNotFoundError) as exc:  # bad JSON, an empty or missing trials.csv
        raise BookError(f"search folder {folder}: {exc}; {fix}") from exc
    missing = [k for k in _SUMMARY_KEYS if k not in summary]
    if missing:
        raise BookError(f"{folder / 'summary.json'} lacks {', '.join(missing)}: not written by "
                        f"`transferstudy search`; {fix}")
    return summary, trials


def _study_pretrained(summary: dict[str, Any], metas: list[dict[str, Any]]) -> bool | None:
    """Whether the trials started from ImageNet weights: their run records, else the profile with the best overrides."""
    values = {m["pretrained"] for m in metas if "pretrained" in m}
    if values:
        return values.pop() if len(values) == 1 else None
    if "best_overrides" in summary:
        return config.resolve(summary["regime"], summary["model"], summary["dataset"], summary["profile"],
                              summary["best_overrides"]).get("pretrained")
    return None


def _trial_state(row: pd.Series) -> str:
    if row.get("surplus") in (True, "True"):
        return "not run (surplus)"
    if row["state"] == "fail":
        return "failed" + (f": {_error_line({'error': row['error']})}" if isinstance(row.get("error"), str) else "")
    return str(row["state"])


def _study_section(book: _Book, folder: Path) -> str:
    summary, trials = _read_study(folder)
    trials = trials.sort_values("number")
    metas = [results.read_json(p) for p in sorted(folder.glob("trials/*/*/*/*/*/meta.json"))]
    pretrained = _study_pretrained(summary, metas)
    model, dataset, regime = summary["model"], summary["dataset"], summary["regime"]
    title = (f"{MODEL_LABELS.get(model, model)} on {DATASET_LABELS.get(dataset, dataset)}, "
             f"{REGIME_LABELS.get(regime, regime).lower()}")
    days = sorted(str(d)[:10] for d in trials["completed"].dropna())
    when = "no trial finished" if not days else days[0] if days[0] == days[-1] else f"{days[0]} to {days[-1]}"
    devices = sorted({str(m["device"]) for m in metas if m.get("device")})
    source = " · ".join([f"study `{summary['study']}`", f"profile `{summary['profile']}`", _init_label(pretrained),
                         *(f"device `{d}`" for d in devices), when])
    storage = ("a SQLite file, `study.db` in the search folder" if (folder / "study.db").is_file()
               else "a shared database (`--storage`) outside the search folder")
    counts = ", ".join(f"{n} {'failed' if s == 'fail' else s}" for s, n in summary["states"].items() if n)

    text = f"### {title}\n\n"
    if pretrained is False:
        text += _note("This search ran from **randomly initialised** backbones (`pretrained: false`), not from "
                      "ImageNet weights: its numbers show that the search runs, not which settings transfer "
                      "best.", "warning") + "\n"
    text += f"**Where these numbers come from:** {source} · storage: {storage} · trials: {counts}.\n\n"
    if "best_trial" in summary:
        best = trials[trials["number"] == summary["best_trial"]]
        test = best["test_accuracy"].iloc[0] if len(best) else None
        text += (f"**Best: trial {summary['best_trial']}**, validation accuracy **{_pct(summary['best_value'])}** "
                 f"(the score the search maximised). Its test accuracy, {_pct(test)}, is shown for reference only: "
                 f"it was never used to choose.\n\n")
        text += _table(["searched setting", "best choice"],
                       [(f"`{k}`", f"`{v}`") for k, v in summary["best_params"].items()])
        text += (f"\nRe-run the best trial (with every setting it overrode, pinned ones included):\n\n"
                 f"```bash\n{summary['run_command']}\n```\n\n")
    else:
        text += _note("No trial of this study completed, so it has no best settings: the table shows what became "
                      "of each trial.") + "\n"

    params = [c for c in trials.columns if c.startswith("param_")]
    rows = [(row["number"], _trial_state(row), *(row[c] for c in params), _pct(row["val_accuracy"]),
             "—" if pd.isna(row["pruned_epoch"]) else int(row["pruned_epoch"]), _pct(row["test_accuracy"]))
            for _, row in trials.iterrows()]
    text += ("Every trial: its settings, what became of it, and its validation accuracy (a pruned trial's is the "
             "last it reported).\n\n")
    text += _table(["trial", "state", *(f"`{c.removeprefix('param_')}`" for c in params), "val accuracy",
                    "pruned after epoch", "test accuracy (not used)"], rows) + "\n"
    return text + _study_figures(book, folder, trials, title, source)


def _study_figures(book: _Book, folder: Path, trials: pd.DataFrame, title: str, source: str) -> str:
    """The optimisation history, the per-epoch curves and the parameter importances of one study (or notes)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", folder.name)
    text = ""
    if trials["state"].isin(["complete", "pruned"]).any():
        text += _figure(book, figures.search_history(trials, f"{title}: optimisation history"),
                        f"search-{slug}-history", f"Validation accuracy of each trial, in the order the trials "
                        f"were created (a pruned trial at the last value it reported), and the best complete "
                        f"trial so far. Source: {source}.",
                        "scatter of validation accuracy per trial with a step line of the best so far")
    else:
        text += _note("No trial finished with a validation accuracy: no optimisation history to draw.")
    if trials["reported"].map(lambda s: bool(json.loads(s)) if isinstance(s, str) else False).any():
        text += "\n" + _figure(book, figures.search_curves(trials, f"{title}: per-epoch validation accuracy"),
                               f"search-{slug}-curves", f"The validation accuracy each trial reported after every "
                               f"epoch: the values the pruner compared. Dashed: pruned at its last point. "
                               f"Source: {source}.", "validation accuracy per epoch, one line per trial")
    importances = pd.read_csv(folder / "importances.csv") if (folder / "importances.csv").is_file() else None
    scores = trials.loc[trials["state"] == "complete", "val_accuracy"]
    if importances is not None and len(importances) and scores.nunique() > 1:
        text += "\n" + _figure(book, figures.param_importances(importances, f"{title}: parameter importances"),
                               f"search-{slug}-importances", f"How much of the variation in validation accuracy "
                               f"over the complete trials each searched setting explains (Optuna's default "
                               f"estimate): a rough guide with this few trials. Source: {source}.",
                               "bar chart of parameter importances")
    else:
        if len(scores) < 2:
            why = f"{len(scores)} complete trial{'s' if len(scores) != 1 else ''}; Optuna needs at least 2"
        elif scores.nunique() == 1:
            why = f"its {len(scores)} complete trials all reached the same validation accuracy: nothing to explain"
        else:
            why = f"its {len(scores)} complete trials do not differ in any searched setting"
        text += "\n" + _note(f"No parameter importances for this study: {why}.")
    return text
