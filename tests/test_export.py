"""Results bundles: the shared smoke study exported to one checked archive, refused when it is damaged, and the whole
book built from it in a fresh folder that has neither the data nor the runs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import test_book
from conftest import FAILING, REPO, Study
from PIL import Image
from test_book import build, copy_book_sources, toc_files

from transferstudy import book, cli, config, export, report
from transferstudy.bundle import predict_files
from transferstudy.report import chapters
from transferstudy.report import store as store_module

BIN = Path(sys.executable).parent
UNPACKED = Path("runs") / "bundle"  # where `make book RESULTS=...` unpacks a bundle, relative to the book's root
NOTES = ("has no usable", "not readable under", "No example images", "The label rules need")  # chapters.Unavailable


def read_members(bundle: Path) -> tuple[list[str], dict[str, bytes]]:
    """A bundle's member names in archive order, and each file's bytes."""
    with tarfile.open(bundle) as tar:
        members = [m for m in tar]
        return [m.name for m in members], {m.name: tar.extractfile(m).read() for m in members if m.isfile()}


def write_bundle(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A .tar.gz holding ``members`` in that order."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def store_of(smoke: Study, data_root: Path) -> report.Store:
    return report.Store.load(smoke.profile_dir, data_root)


def copy_run(smoke: Study, key: str, runs: Path, models: bool = False) -> Path:
    """One run of the smoke study in a runs store of its own: its records copied, its model bundle hard-linked
    (never written to here, so the study's files stay as they are)."""
    src = smoke.profile_dir / key
    dest = runs / "smoke" / key
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("bundle"))
    if models:
        shutil.copytree(src / "bundle", dest / "bundle", copy_function=os.link)
    return dest


# --- fixtures: one export of the smoke study, one book built from it ------------------------------------


@pytest.fixture(scope="module")
def bundle(smoke: Study, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "results-smoke.tar.gz"
    code = cli.main(["export-results", str(path), "--profile", "smoke", "--runs-dir", str(smoke.profile_dir.parent),
                     "--data-root", str(data_root)])
    assert code == 0 and path.is_file()
    return path


@pytest.fixture(scope="module")
def bundle_book(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The book's sources in a fresh folder, with the bundle unpacked and book/_generated written as `make book
    RESULTS=...` does it (the same commands, run from that folder): no data root, no runs, nothing run."""
    root = copy_book_sources(tmp_path_factory.mktemp("bundle-book"))
    for args in (["import-results", str(bundle), "--to", str(UNPACKED)], ["book-data", "--results", str(UNPACKED)]):
        result = subprocess.run([str(BIN / "transferstudy"), *args], cwd=root, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert not (root / "data").exists() and sorted(p.name for p in (root / "runs").iterdir()) == ["bundle"]
    return root


@pytest.fixture(scope="module")
def html(bundle_book: Path) -> Path:
    """The book built from the bundle alone, every warning fatal (the browser test's ``server`` serves it)."""
    return build(bundle_book)


browser, server = test_book.browser, test_book.server  # the browser test's Chromium, serving this module's ``html``


# --- what a bundle holds ----------------------------------------------------------------------------------


def test_the_bundle_holds_what_the_book_reads_each_member_checked_by_the_manifest(bundle, smoke, data_root):
    names, files = read_members(bundle)
    assert names[0] == export.MANIFEST and len(names) == len(set(names))
    manifest = json.loads(files[export.MANIFEST])
    assert manifest["format"] == export.FORMAT and manifest["format_version"] == export.FORMAT_VERSION
    assert manifest["written_by"]["transferstudy"] == metadata.version("transferstudy")
    assert manifest["profile"] == "smoke" and manifest["with_models"] is False
    # every member listed with its size and SHA-256, and nothing else in the archive
    assert sorted(manifest["members"]) == sorted(names[1:])
    for name, record in manifest["members"].items():
        assert record == {"sha256": hashlib.sha256(files[name]).hexdigest(), "size": len(files[name])}, name
    # every run with a record, as the store reads it (a failed run as its .failed folder), and the others listed
    store = store_of(smoke, data_root)
    had = {k: s for k, s in smoke.status.items() if s != "missing"}
    assert {r["key"]: r["status"] for r in manifest["runs"]} == had
    assert manifest["not_run"] == sorted(k for k, s in smoke.status.items() if s == "missing")
    cells = {run.key: run for run in store.every_run()}
    for entry in manifest["runs"]:
        run = cells[entry["key"]]
        assert entry["path"] == f"runs/{run.run_dir.relative_to(smoke.profile_dir.parent).as_posix()}"
        expected = {f.name for f in run.run_dir.iterdir() if f.name in export.RUN_FILES
                    or re.fullmatch(r"embeddings-.*\.npz", f.name)}
        packed = {n.removeprefix(entry["path"] + "/") for n in names if n.startswith(entry["path"] + "/")}
        assert packed == expected and "meta.json" in packed, entry["key"]
        assert all(files[f"{entry['path']}/{n}"] == (run.run_dir / n).read_bytes() for n in packed)
        kept = ("predictions.npz",) if run.regime in store_module.SCORED else (  # regimes, statistics transfer
            store_module.ANALYSIS_TABLES[run.regime][0],)  # the other analyses keep their table, which the book reads
        assert ("notebook.ipynb" in packed and all(k in packed for k in kept)) == (entry["status"] == "ok")
    assert next(r["path"] for r in manifest["runs"] if r["key"] == FAILING).endswith("linear_probe.failed")
    assert not [n for n in names if "/bundle/" in n or "/.cache/" in n or n.endswith(".lock")]  # no models, caches


def test_the_data_summary_holds_what_the_pages_show_of_the_data_and_never_the_dataset(bundle, smoke, data_root):
    names, files = read_members(bundle)
    summary = json.loads(files[f"{export.DATA_SUMMARY}/{chapters.SUMMARY_FILE}"])
    store = store_of(smoke, data_root)
    pictures = {n.removeprefix(f"{export.DATA_SUMMARY}/{chapters.PICTURES}/") for n in names
                if n.startswith(f"{export.DATA_SUMMARY}/{chapters.PICTURES}/")}
    wanted = set()
    for dataset in config.DATASETS:
        computed = chapters.dataset_summary(store, dataset)
        entry = summary["datasets"][dataset]
        assert (entry["split_hash"], entry["seed"], entry["layout"]) == (computed.split_hash, computed.seed,
                                                                         computed.layout)
        assert entry["counts"] == computed.counts
        pd.testing.assert_frame_equal(pd.DataFrame(entry["sizes"]), computed.sizes)
        assert isinstance(computed.examples, dict)  # individual image files: the page pictures some
        wanted |= {f"{dataset}/{f}.png" for files_ in computed.examples.values() for f in files_}
    for run in store.finished():
        pred = run.predictions
        wanted |= {f"{run.dataset}/{pred.files[i]}.png"
                   for i in np.flatnonzero(~pred.correct)[:chapters.MISCLASSIFIED_SHOWN]}
    assert pictures == wanted  # the pictured images only
    for name in sorted(pictures)[::7]:  # each one the pixels the page shows from the data root
        dataset, file = name.split("/", 1)
        shown = np.asarray(Image.open(io.BytesIO(files[f"{export.DATA_SUMMARY}/{chapters.PICTURES}/{name}"])))
        original = data_root / dataset / file.removesuffix(".png")
        assert np.array_equal(shown, chapters._picture(original)), name


def command(capsys, *args: str) -> tuple[int, str]:
    """``transferstudy ARGS``: its exit status and what it wrote to stderr."""
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def test_export_refuses_bad_input_and_damaged_runs_before_writing(smoke, data_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = copy_run(smoke, "cifar10/alexnet/linear_probe", runs)

    def refused(*extra: str, bundle: Path = tmp_path / "out.tar.gz") -> str:
        code, err = command(capsys, "export-results", str(bundle), "--runs-dir", str(runs), *extra)
        assert code == 2 and not bundle.exists() and not list(bundle.parent.glob(f".{bundle.name}*")), err
        return err

    assert "--data-root 'nowhere' does not exist" in refused("--profile", "smoke", "--data-root", "nowhere")
    assert "must be a .tar.gz" in refused("--profile", "smoke", bundle=tmp_path / "out.zip")
    assert "has no quick/ folder" in refused("--data-root", str(data_root))  # quick: the default profile
    (run_dir / "metrics.json").write_text("{not json")
    err = refused("--profile", "smoke", "--data-root", str(data_root))
    assert "cifar10/alexnet/linear_probe" in err and "metrics.json is unreadable" in err and "damaged" in err


def test_with_models_the_model_bundles_travel_and_still_predict(smoke, data_root, tmp_path):
    runs = tmp_path / "runs"
    run_dir = copy_run(smoke, "cifar10/alexnet/frozen_svm", runs, models=True)
    out = tmp_path / "models.tar.gz"
    manifest = export.export(out, "smoke", runs, data_root, with_models=True)
    models = sorted(n for n in manifest["members"] if "/bundle/" in n)
    prefix = "runs/smoke/cifar10/alexnet/frozen_svm/bundle/"
    assert models == sorted(prefix + f.relative_to(run_dir / "bundle").as_posix()
                            for f in (run_dir / "bundle").rglob("*") if f.is_file())
    assert manifest["with_models"] is True and manifest["not_run"] == sorted(
        k for k in (f"{d}/{m}/{r}" for d in config.DATASETS for m in config.MODELS for r in config.NOTEBOOKS)
        if k != "cifar10/alexnet/frozen_svm")
    unpacked = tmp_path / "unpacked"
    export.import_bundle(out, unpacked)
    image = next((data_root / "cifar10" / "test").rglob("*.jpg"))
    before = predict_files(run_dir / "bundle", [image])
    after = predict_files(unpacked / prefix, [image])
    assert [(r["class"], r["probability"]) for r in after] == [(r["class"], r["probability"]) for r in before]


def test_the_searches_travel_with_their_trials_and_read_the_same_from_the_bundle(smoke, data_root, tmp_path):
    runs = tmp_path / "runs"
    copy_run(smoke, "cifar10/alexnet/linear_probe", runs)
    folder = test_book.write_search(runs, "alexnet", False)  # a real Optuna study, as `transferstudy search` leaves it
    manifest = export.export(tmp_path / "b.tar.gz", "smoke", runs, data_root)
    arc = f"runs/search/{folder.name}"
    assert manifest["searches"] == [arc]
    expected = {f"{arc}/{f.relative_to(folder).as_posix()}" for f in folder.rglob("*") if f.is_file()
                and (f.name in export.SEARCH_FILES or "trials" in f.relative_to(folder).parts)}
    assert {n for n in manifest["members"] if n.startswith(arc + "/")} == expected and f"{arc}/study.db" in expected
    unpacked = tmp_path / "unpacked"
    export.import_bundle(tmp_path / "b.tar.gz", unpacked)
    moved = unpacked / arc
    (summary, trials, metas), (summary_b, trials_b, metas_b) = chapters.read_search(folder), chapters.read_search(moved)
    assert (summary, metas) == (summary_b, metas_b)
    assert chapters.search_text(folder, summary, trials, metas) == chapters.search_text(moved, summary_b, trials_b,
                                                                                       metas_b)
    pd.testing.assert_frame_equal(trials.drop(columns="run_dir"), trials_b.drop(columns="run_dir"))
    assert [Path(d).relative_to(moved) for d in trials_b["run_dir"]] == [Path(d).relative_to(folder)
                                                                         for d in trials["run_dir"]]


# --- refused bundles ----------------------------------------------------------------------------------------

VICTIM = "runs/smoke/cifar10/alexnet/linear_probe/metrics.json"


def _alter(manifest: dict, files: dict[str, bytes]) -> str:
    payload = bytearray(files[VICTIM])
    payload[len(payload) // 2] ^= 1  # one bit, same size
    files[VICTIM] = bytes(payload)
    return f"{VICTIM}: checksum mismatch"


def _drop(manifest: dict, files: dict[str, bytes]) -> str:
    del files[VICTIM]
    return f"{VICTIM}: missing"


def _extra(manifest: dict, files: dict[str, bytes]) -> str:
    files["runs/smoke/cifar10/alexnet/full.failed/meta.json"] = b'{"status": "failed"}'
    return "runs/smoke/cifar10/alexnet/full.failed/meta.json: not in the manifest"


def _version(manifest: dict, files: dict[str, bytes]) -> str:
    manifest["format_version"] = export.FORMAT_VERSION + 1
    return f"bundle format version {export.FORMAT_VERSION + 1}"


def _leaves(manifest: dict, files: dict[str, bytes]) -> str:
    files["runs/../../escaped.txt"] = b"x"
    return "runs/../../escaped.txt: a path that leaves the bundle"


def _absolute(manifest: dict, files: dict[str, bytes]) -> str:
    files["/tmp/absolute.txt"] = b"x"
    return "/tmp/absolute.txt: an absolute path"


def _listed_outside(manifest: dict, files: dict[str, bytes]) -> str:
    files["../outside.txt"] = b"x"
    manifest["members"]["../outside.txt"] = {"sha256": hashlib.sha256(b"x").hexdigest(), "size": 1}
    return "lists ../outside.txt: a path that leaves the bundle"


@pytest.mark.parametrize("damage", [_alter, _drop, _extra, _version, _leaves, _absolute, _listed_outside],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_or_foreign_bundle_is_refused_naming_it_and_nothing_is_unpacked(
        bundle, tmp_path, capsys, damage: Callable[[dict, dict], str]):
    names, files = read_members(bundle)
    manifest = json.loads(files.pop(export.MANIFEST))
    expected = damage(manifest, files)
    bad = write_bundle(tmp_path / "bad.tar.gz", [(export.MANIFEST, json.dumps(manifest).encode()), *files.items()])
    # an earlier import in the target folder stays as it was
    target = tmp_path / "results"
    before = export.import_bundle(bundle, target)
    assert cli.main(["import-results", str(bad), "--to", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and expected in err, err
    assert export.open_results(target)[0] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz", "results"]  # nothing else unpacked


def test_what_is_not_a_bundle_is_refused(tmp_path, capsys):
    plain = write_bundle(tmp_path / "plain.tar.gz", [("runs/readme.txt", b"hello")])
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip")
    for path, expected in ((plain, "its first member is 'runs/readme.txt', not manifest.json"),
                           (junk, "is not a results bundle (not a tar archive"),
                           (tmp_path / "absent.tar.gz", "does not exist")):
        assert cli.main(["import-results", str(path), "--to", str(tmp_path / "results")]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and expected in err, err
        assert not (tmp_path / "results").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert cli.main(["import-results", str(plain), "--to", str(tmp_path / "mine")]) == 2
    assert "is not an unpacked results bundle" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_book_data_checks_the_unpacked_bundle_again(bundle, tmp_path, capsys):
    target = tmp_path / "results"
    export.import_bundle(bundle, target)
    root = copy_book_sources(tmp_path / "book")
    book_data = ("book-data", "--results", str(target), "--book-root", str(root))
    cache = target / "runs" / ".cache" / "projections"  # what the book build writes there is no member
    cache.mkdir(parents=True)
    (cache / "pca-1.npy").write_bytes(b"x")
    assert command(capsys, *book_data)[0] == 0
    code, err = command(capsys, *book_data, "--profile", "quick")
    assert code == 2 and "--profile quick, but the bundle" in err and "holds profile smoke" in err
    code, err = command(capsys, *book_data, "--runs-dir", "runs")
    assert code == 2 and "drop --runs-dir" in err
    (target / VICTIM).write_text("{}")
    extra = target / "runs" / "smoke" / "ferplus" / "deit_base" / "full" / "meta.json"
    extra.parent.mkdir(parents=True)
    extra.write_text('{"status": "ok"}')
    code, err = command(capsys, *book_data)
    assert code == 2 and f"{VICTIM}: checksum mismatch" in err
    assert "runs/smoke/ferplus/deit_base/full/meta.json: not in the manifest" in err


def test_make_book_with_results_unpacks_and_builds_without_running_anything():
    def recipe(*args: str) -> str:
        result = subprocess.run(["make", "-n", "-C", str(REPO), "book", *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    from_bundle = recipe("RESULTS=some/results.tar.gz")
    assert f'transferstudy import-results "some/results.tar.gz" --to {UNPACKED}' in from_bundle
    assert f"transferstudy book-data --results {UNPACKED}" in from_bundle
    assert "jupyter-book build . --all -n -W --keep-going" in from_bundle
    assert "transferstudy run " not in from_bundle and "extract.sh" not in from_bundle
    assert "transferstudy run " in recipe()  # without RESULTS the study runs as before


# --- the book built from the bundle alone --------------------------------------------------------------------


def cells(path: Path) -> list[tuple]:
    """A notebook's cells as the reader sees them: kind, source, outputs and tags."""
    nb = nbformat.read(path, as_version=4)
    return [(c.cell_type, c.source, c.get("outputs"), c.metadata.get("tags")) for c in nb.cells]


def test_the_bundle_book_has_the_same_pages_as_the_book_from_the_runs(bundle_book, smoke, data_root, tmp_path):
    from_runs = copy_book_sources(tmp_path / "from-runs")
    book.generate(smoke.profile_dir, data_root, from_runs)
    pages = {p.name: p for p in (bundle_book / book.GENERATED / "runs").iterdir()}
    assert sorted(pages) == sorted(p.name for p in (from_runs / book.GENERATED / "runs").iterdir())
    for name, page in pages.items():
        if page.suffix == ".ipynb":  # a finished run: its executed notebook, as the runs give it (but new cell ids)
            assert cells(page) == cells(from_runs / book.GENERATED / "runs" / name), name
    for key, state in smoke.status.items():
        page = pages[f"{key.replace('/', '-')}{'.ipynb' if state == 'ok' else '.md'}"]
        if state == "missing":  # a run the bundle lacks: its note page says so
            assert "**Not in the results bundle**" in page.read_text() and f"--only {key} --force" in page.read_text()
    context = json.loads((bundle_book / book.GENERATED / "context.json").read_text())
    assert all(Path(v).is_relative_to(bundle_book / UNPACKED) for v in context.values())


def test_the_bundle_stands_in_for_the_data_root_with_the_same_numbers_and_pictures(bundle_book, smoke, data_root):
    unpacked = report.load(bundle_book / "book")
    direct = store_of(smoke, data_root)
    assert unpacked.data_root == (bundle_book / UNPACKED / export.DATA_SUMMARY).resolve()
    for dataset in config.DATASETS:
        a, b = chapters.dataset_summary(direct, dataset), chapters.dataset_summary(unpacked, dataset)
        pd.testing.assert_frame_equal(a.sizes, b.sizes)
        assert (a.split_hash, a.seed, a.layout, a.counts, a.examples) == (b.split_hash, b.seed, b.layout, b.counts,
                                                                          b.examples)
        shown_a, shown_b = chapters.examples(direct, a), chapters.examples(unpacked, b)
        assert {c: len(v) for c, v in shown_a.items()} == {c: len(v) for c, v in shown_b.items()}
        assert all(np.array_equal(x, y) for c in shown_a for x, y in zip(shown_a[c], shown_b[c]))
        for model in config.MODELS:
            run = chapters.error_run(direct, dataset, model)
            if run is not None:
                (images_a, captions_a), (images_b, captions_b) = (
                    chapters.misclassified(run, direct), chapters.misclassified(unpacked.run(*run.key.split("/")),
                                                                                unpacked))
                assert captions_a == captions_b and all(np.array_equal(x, y) for x, y in zip(images_a, images_b))
    for frame_a, frame_b in zip(chapters.label_rules(direct), chapters.label_rules(unpacked)):
        pd.testing.assert_frame_equal(frame_a, frame_b)


@pytest.mark.slow
def test_the_whole_book_builds_from_the_bundle_with_no_warning(html, smoke, data_root):
    built = {p.relative_to(html).with_suffix("").as_posix() for p in html.rglob("*.html")}
    assert set(toc_files()) <= built  # every page of the book, the run pages included
    for doc in ("book/datasets", "book/errors"):  # the data's pages show the data, from the bundle
        text = (html / f"{doc}.html").read_text()
        assert not [note for note in NOTES if note in text], doc
    for dataset in config.DATASETS:
        summary = chapters.dataset_summary(store_of(smoke, data_root), dataset)
        assert f"split hash {summary.split_hash} (seed {summary.seed}, {summary.layout} layout)" in (
            html / "book" / "datasets.html").read_text()
    chapters_text = " ".join(p.read_text() for p in (html / "book").rglob("*.html") if "_generated" not in p.parts)
    assert str(smoke.profile_dir.parent) not in chapters_text and str(data_root) not in chapters_text
    assert "data summary, computed from the data root by the same loader" in (
        html / "book" / "datasets.html").read_text()  # the page says where its data comes from


@pytest.mark.slow
def test_every_page_and_image_of_the_bundle_book_loads_in_chromium(browser, server, html):
    test_book.test_every_page_and_image_loads_in_chromium_with_no_error_shown(browser, server, html)
