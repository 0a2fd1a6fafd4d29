"""The book's generated pages: one per run of the study's matrix (`transferstudy book-data`).

``generate(profile_dir, data_root, book_root)`` rewrites ``<book_root>/book/_generated/``:

* ``runs/<dataset>-<model>-<regime>.ipynb``: each run's executed notebook, cleaned for reading
  (papermill's parameter cells hidden behind a "parameters of this run" box, its metadata and
  error cells removed). A failed, damaged or never-attempted run becomes a ``.md`` note page of the
  same name instead, so ``_toc.yml`` can list every page without an extension.
* ``context.json``: which results store and data root the book's executable pages read
  (``report.load()``). Those pages compute everything else they show when Jupyter Book executes them.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Any

import nbformat

from . import config, runner
from .report.store import Run, Store, StoreError, write_context

GENERATED = Path("book") / "_generated"
# The parameters that are paths on the machine that ran the notebook: left out of the pages.
_PATH_PARAMETERS = ("data_dir", "output_dir", "cache_dir", *sorted({n for names in config.SOURCE_NAMES.values()
                                                                   for n in names}))


class BookError(ValueError):
    """Bad input to the book generator; the message names it and the fix."""


def page_name(dataset: str, model: str, regime: str) -> str:
    """The stable name of a run's page under ``book/_generated/runs/`` (no extension)."""
    return f"{dataset}-{model}-{regime}"


def generate(profile_dir: str | Path, data_root: str | Path, book_root: str | Path,
             bundle: dict[str, Any] | None = None) -> list[Path]:
    """Write ``<book_root>/book/_generated/`` from the runs under ``profile_dir`` (= ``<runs>/<profile>``).

    ``data_root`` holds ``cifar10/`` and ``ferplus/`` (the Datasets and Errors pages read it), or is a results
    bundle's data summary; ``book_root`` holds ``_config.yml`` and ``_toc.yml``. ``bundle``: the manifest of the
    results bundle the runs were unpacked from (``export.open_results``), which the note pages of its missing
    runs name. Returns the files written.
    """
    profile_dir, data_root, book_root = Path(profile_dir), Path(data_root), Path(book_root)
    if not (book_root / "_toc.yml").is_file():
        raise BookError(f"book_root={str(book_root)!r} has no _toc.yml; pass the folder holding the book's "
                        f"_config.yml and _toc.yml (the repository root)")
    try:
        store = Store.load(profile_dir, data_root)
    except StoreError as exc:
        raise BookError(str(exc)) from exc
    out = book_root / GENERATED
    stage = out.with_name(out.name + ".new")  # the pages written beside the old ones, which stay until all are
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "runs").mkdir(parents=True)
    for run in store.every_run():
        shown = _write_run_page(store, run, stage, bundle)
        if shown.status in ("failed", "damaged"):  # said on the console too, not only on its page
            print(f"{shown.key} {shown.status}: {(shown.error or 'unknown error').splitlines()[0]}", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    stage.rename(out)
    write_context(book_root, profile_dir, data_root)
    return sorted(p for p in out.rglob("*") if p.is_file())


def _code(text: str) -> str:
    """``text`` as inline code (its own backticks become quotes)."""
    return "`" + text.replace("`", "'") + "`"


def _error_line(run: Run) -> str:
    """A failed or damaged run's error, first line only, as inline code."""
    lines = str(run.error or "unknown error").strip().splitlines()
    return _code(lines[0] if lines else "unknown error")


def _note(text: str, kind: str = "note") -> str:
    return f"```{{{kind}}}\n{text}\n```\n"


def _rerun_command(store: Store, run: Run) -> str:
    """The command that reruns this one run, with the initialisation it (or else the rest of the book) used."""
    pretrained = run.pretrained if run.pretrained is not None else store.pretrained
    extra = " -p pretrained false" if pretrained is False else ""
    return (f"transferstudy run --profile {store.profile} --data-root data "
            f"--only {run.key} --force{extra}")


def _write_run_page(store: Store, run: Run, out: Path, bundle: dict[str, Any] | None) -> Run:
    """Write the run's page; returns the run as the page shows it (``damaged`` when its notebook is unreadable)."""
    base = out / "runs" / page_name(run.dataset, run.model, run.regime)
    notebook = run.run_dir / "notebook.ipynb" if run.run_dir else None
    if run.ok and notebook is not None and notebook.is_file():
        try:
            executed = nbformat.read(notebook, as_version=4)
        except Exception as exc:  # noqa: BLE001 - a cut-off or altered file, of whatever kind
            run = dataclasses.replace(run, status="damaged", error=f"{notebook} is unreadable "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                      f"rerun it with `transferstudy run --only {run.key} --force`")
        else:
            nbformat.write(_clean_notebook(executed, run), base.with_suffix(".ipynb"))
            return run
    run_cmd = _rerun_command(store, run)
    if run.status in ("failed", "damaged"):
        partial = (f" The partial notebook, executed up to the failing cell, is `{notebook}`."
                   if run.status == "failed" and notebook is not None and notebook.is_file() else "")
        body = _note(f"This run **{run.status}**: {_error_line(run)}.{partial}", "error")
        body += (f"\nThis page shows no results, and the results tables list the run as `{run.status}`. Fix the "
                 f"cause, then rerun it alone:\n\n```bash\n{run_cmd}\n```\n")
    elif run.ok:
        body = _note(f"This run finished ({run.provenance()}), but its executed notebook is missing from "
                     f"`{run.run_dir}`. Rerun it to restore the page.") + f"\n```bash\n{run_cmd}\n```\n"
    elif bundle is not None:
        body = _note(f"**Not in the results bundle** this book was built from: the run had not run in profile "
                     f"`{store.profile}` when the bundle was exported ({str(bundle.get('created', '?'))[:10]}, "
                     f"transferstudy {bundle.get('written_by', {}).get('transferstudy', '?')}). Run it where the "
                     f"data are, then export the results again:") + (
            f"\n```bash\n{run_cmd}\ntransferstudy export-results results-{store.profile}.tar.gz "
            f"--profile {store.profile}\n```\n")
    else:
        body = _note(f"**Not run yet** in profile `{store.profile}`. Run it (or `make book`, which runs every "
                     f"missing run):") + f"\n```bash\n{run_cmd}\n```\n"
    body += (f"\nThe notebook behind this page is `notebooks/{runner.NOTEBOOKS[run.regime]}`, run with "
             f"`model={run.model}`, `dataset={run.dataset}`, `profile={store.profile}`.\n")
    base.with_suffix(".md").write_text(f"# {run.title}\n\n{store.banner()}\n{body}")
    return run


def _clean_notebook(nb: nbformat.NotebookNode, state: Run) -> nbformat.NotebookNode:
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


def _parameters_box(state: Run, injected: dict[str, Any]) -> str:
    rows = [(k, f"`{v!r}`", "set for this run" if k in injected else "profile")
            for k, v in state.params.items() if k not in _PATH_PARAMETERS]
    table = "\n".join(["| setting | value | from |", "|---|---|---|",
                       *(f"| {k} | {v.replace('|', chr(92) + '|')} | {w} |" for k, v, w in rows)])
    return (f":::{{admonition}} Parameters of this run\n:class: dropdown\n\n{state.provenance()}; notebook "
            f"`notebooks/{runner.NOTEBOOKS[state.regime]}`.\n\n{table}\n:::\n")


