"""The `transferstudy` command: one subcommand per job, each with --help."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return "" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) if v[:1].isdigit() else v.ljust(w) for v, w in zip(row, widths)))


def cmd_params(args: argparse.Namespace) -> int:
    from . import data, regimes

    rows = [{"dataset": args.dataset, **row}
            for row in regimes.param_table(args.model, len(data.CLASSES[args.dataset]))]
    rows = [{k: r[k] for k in ("model", "dataset", "regime", "trainable", "total")} for r in rows]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, ["model", "dataset", "regime", "trainable", "total"])
    return 0


def _print_check(check: Any, record: bool, recorded: Path | None) -> None:
    """``data --check``'s text report: each bad file, the groups across splits, the summary, the checksum list."""
    from . import data

    for file, reason in check.bad:
        print(f"bad  {file}  {reason}")
    shown = 10
    for group in check.across_splits[:shown]:
        print(f"same pixels in two splits  {'  '.join(group)}")
    if len(check.across_splits) > shown:
        print(f"... and {len(check.across_splits) - shown} more groups across splits (--json lists them all)")
    rule = f", label rule {check.label_rule}" if check.label_rule else ""
    print(f"checked {check.n_images:,} images of {check.name} in {check.data_dir} ({check.layout} layout{rule}): "
          f"{len(check.bad):,} bad; {len(check.duplicates):,} groups of identical images, "
          f"{len(check.across_splits):,} of them across splits")
    if check.checksums != "none":
        print(f"bytes checked against {check.checksums}")
    elif check.layout != "torchvision" and not record:
        print(f"no checksum list ({data.CHECKSUMS}): a JPEG or PNG whose bytes rot later may decode to other "
              f"pixels without an error; add --record to write one, so later checks and runs catch it")
    if recorded:
        print(f"recorded {recorded} (any earlier list replaced): every run of this folder now checks the bytes of "
              f"the images it reads")


def cmd_data(args: argparse.Namespace) -> int:
    from . import data

    if args.record and not args.check:
        raise data.DataError("--record writes the checksum list after a check: add --check")
    if args.check:  # decode every image; list each bad one; exit 1 if any is bad
        check = data.check_images(args.dataset, args.data_dir, label_rule=args.label_rule, download=args.download,
                                  checksums=not args.record)  # --record vouches for the files anew
        recorded = data.record_dataset_checksums(check) if args.record and not check.bad else None
        if args.json:
            print(json.dumps({
                "dataset": check.name, "data_dir": check.data_dir, "layout": check.layout,
                "label_rule": check.label_rule, "images": check.n_images,
                "bad": [{"file": f, "reason": r} for f, r in check.bad],
                "duplicates_across_splits": check.across_splits, "duplicate_groups": len(check.duplicates),
                "checksums": check.checksums, "recorded": str(recorded) if recorded else None,
            }, indent=2))
        else:
            _print_check(check, args.record, recorded)
        if args.record and check.bad:
            data.record_dataset_checksums(check)  # refuses, naming the bad files' count (listed above)
        return 1 if check.bad else 0
    ds = data.load_dataset(args.dataset, args.data_dir, label_rule=args.label_rule, val_source=args.val_source,
                           download=args.download, decode=False)
    summary = data.summarize(ds)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"dataset {summary['dataset']}  ({args.data_dir})")
    if args.dataset == "ferplus":
        print(f"label rule {summary.get('label_rule')}, validation from {summary.get('val_source')}")
    print(f"split hash {summary['split_hash']}")
    splits = summary["splits"]
    rows = [{"class": c, **{s: splits[s]["per_class"].get(c, 0) for s in splits}} for c in summary["classes"]]
    rows.append({"class": "total", **{s: splits[s]["n"] for s in splits}})
    _print_table(rows, ["class", *splits])
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from . import config, runner

    overrides: dict[str, Any] = {}
    for key, value in args.param:
        if key in overrides and overrides[key] != config.parse_value(value):
            raise config.ConfigError(f"-p {key} is given twice ({overrides[key]!r} and {value!r}); give it once")
        overrides[key] = config.parse_value(value)
    if args.wait < 0:
        raise runner.RunnerError(f"--wait {args.wait:g}: give the seconds to wait for a busy run, 0 or more")
    outcomes = runner.run_matrix(args.profile, Path(args.data_root), Path(args.runs_dir), overrides,
                                 only=args.only, force=args.force, wait=args.wait)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    print(f"{counts['ok']} ran, {counts['skipped']} unchanged (skipped), {counts['failed']} failed; "
          f"table: {Path(args.runs_dir) / args.profile / 'results.csv'}")
    return 1 if counts["failed"] else 0


def cmd_results(args: argparse.Namespace) -> int:
    from .report.store import collect

    frame = collect(Path(args.runs_dir) / args.profile)
    rows = json.loads(frame.to_json(orient="records"))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runs under {Path(args.runs_dir) / args.profile}; run `transferstudy run --profile {args.profile}`")
    else:
        _print_table(rows, ["dataset", "model", "regime", "classifier", "status", "val_accuracy",
                            "test_accuracy", "test_macro_f1", "trainable", "pretrained", "wall_s"])
        for row in rows:  # what went wrong, for each run that did not finish: the table has no room for it
            if row["status"] in ("failed", "damaged") and row.get("error"):
                print(f"{row['dataset']}/{row['model']}/{row['regime']} {row['status']}: "
                      f"{str(row['error']).splitlines()[0]}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .report import read_run, stats, tables

    a, b = read_run(Path(args.run_a)), read_run(Path(args.run_b))
    result = tables.compare(a, b)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    for name, run, iv in (("A", a, result.a), ("B", b, result.b)):
        print(f"{name}  {run.run_dir}  ({run.label}, {run.best})\n   test accuracy "
              f"{tables.pct_ci(iv.value, iv.low, iv.high, 2)}  (95% bootstrap interval, {result.n:,} images)")
    d = result.difference
    print(f"B - A  {tables.pp_ci(d.value, d.low, d.high)}  (paired bootstrap)")
    print(f"discordant images: {result.a_only} right only by A, {result.b_only} right only by B; "
          f"McNemar exact {stats.format_p(result.p)}")
    print(stats.comparison_sentence("B", "A", d.value, result.p) + ".")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .bundle import predict_files

    rows = predict_files(args.bundle, args.images, trust_torchscript=args.trust_torchscript)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, list(rows[0]))
    return 0


def cmd_book_data(args: argparse.Namespace) -> int:
    from . import book

    if args.results is not None:  # an unpacked results bundle: its runs, its data summary, its profile
        from . import export

        given = [f"--{k.replace('_', '-')}" for k in ("runs_dir", "data_root") if getattr(args, k) is not None]
        if given:
            raise export.ResultsError(f"--results takes the runs and the data from the bundle: drop "
                                      f"{' and '.join(given)}")
        manifest, profile_dir, data_root = export.open_results(args.results)
        if args.profile not in (None, manifest["profile"]):
            raise export.ResultsError(f"--profile {args.profile}, but the bundle in {args.results} holds profile "
                                      f"{manifest['profile']}: drop --profile")
        files = book.generate(profile_dir, data_root, Path(args.book_root), bundle=manifest)
    else:
        files = book.generate(Path(args.runs_dir or "runs") / (args.profile or "quick"), Path(args.data_root or "data"),
                              Path(args.book_root))
    pages = sum(f.parent.name == "runs" for f in files)
    print(f"{len(files)} files ({pages} run pages) written to {Path(args.book_root) / book.GENERATED}")
    return 0


def cmd_export_results(args: argparse.Namespace) -> int:
    from . import export

    manifest = export.export(args.bundle, args.profile, args.runs_dir, args.data_root, with_models=args.with_models)
    states = [run["status"] for run in manifest["runs"]]
    size = Path(args.bundle).stat().st_size
    print(f"wrote {args.bundle} ({size / 2**20:.1f} MiB, {len(manifest['members'])} files): profile {args.profile}, "
          f"{states.count('ok')} finished and {states.count('failed')} failed runs ({len(manifest['not_run'])} not "
          f"run), {len(manifest['searches'])} searches, the data summary"
          + ("" if args.with_models else "; no model bundles (--with-models adds them)"))
    return 0


def cmd_import_results(args: argparse.Namespace) -> int:
    from . import export

    manifest = export.import_bundle(args.bundle, args.to)
    print(f"unpacked {args.bundle} into {args.to}: profile {manifest['profile']}, {len(manifest['runs'])} runs, "
          f"{len(manifest['members'])} files checked (written by transferstudy "
          f"{manifest['written_by']['transferstudy']} on {manifest['created'][:10]}). Build the book from it with "
          f"`transferstudy book-data --results {args.to}` and `jupyter-book build . --all`")
    return 0


def cmd_classroom_pack(args: argparse.Namespace) -> int:
    from . import classroom

    manifest = classroom.build(args.profile, Path(args.runs_dir), Path(args.data_root), Path(args.out))
    size = Path(args.out).stat().st_size
    print(f"{args.out}: {size / 2**20:.1f} MiB; {', '.join(manifest['entries'])}; {len(manifest['members'])} files, "
          f"each with its SHA-256 in manifest.json")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``command`` (the subcommand about to run) loads that subcommand's heavy options."""
    from . import config

    parser = argparse.ArgumentParser(prog="transferstudy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="total and trainable parameters of every regime",
                       description="Total and trainable parameters of every regime, counted on the real model.")
    p.add_argument("--model", required=True, choices=config.MODELS)
    p.add_argument("--dataset", required=True, choices=config.DATASETS)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("data", help="classes, split sizes, per-class counts and the split hash",
                       description="Classes, split sizes, per-class counts and the split hash of a dataset folder; "
                                   "with --check, decode every image and list the files that are bad.")
    p.add_argument("--dataset", required=True, choices=config.DATASETS)
    p.add_argument("--data-dir", required=True, help="that dataset's own folder, e.g. data/cifar10")
    p.add_argument("--label-rule", default=None, choices=["majority", "argmax", "votes"],
                   help="FERPlus label rule (default: majority for Microsoft's layout)")
    p.add_argument("--val-source", default="split", choices=["split", "official"],
                   help="validation: 20%% stratified split of train, or FERPlus's official Valid set")
    p.add_argument("--download", action="store_true", help="CIFAR-10 only: download with torchvision")
    p.add_argument("--check", action="store_true",
                   help="decode every image of every split instead; list each bad file (path and reason) and "
                        "images with identical pixels in two splits; exit 1 if any file is bad")
    p.add_argument("--record", action="store_true",
                   help="with --check, when nothing is bad: write SHA256SUMS (sha256sum's format) into the "
                        "dataset folder, replacing any earlier list; later checks and every run then check each "
                        "image's bytes against it, which catches the bit rot that decodes to other pixels without "
                        "an error")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("run", help="execute the study's notebooks into the results store",
                       description=textwrap.fill(
                           "Execute the matrix (dataset x model x regime) with papermill. Runs whose settings and "
                           "code are unchanged since they last succeeded are skipped. The -p settings are checked "
                           "for every selected run before any starts; a run folder another runner is working on "
                           "stops this one at once (or after --wait seconds), naming that runner.", 88),
                       epilog=textwrap.fill(
                           "-p VALUE is read as YAML (1e-3, true, false, [a, b]). null keeps the profile's value, "
                           "like a notebook parameter left at None, so -p KEY null is refused where that value is "
                           "not null. The word none sets no value where a setting has one: -p n_train none (or "
                           "all) uses the whole split, -p patience none turns early stopping off. model, dataset, "
                           "regime and profile are not settings: choose runs with --only and --profile.", 88)
                       + "\n\nsettings: what each takes [the regimes that read it; -p passes it to those only]\n"
                       + config.settings_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick", choices=list(config.profiles()),
                   help="smoke | quick | full (default: quick)")
    p.add_argument("--data-root", default="data", help="folder holding cifar10/ and ferplus/ (default: data)")
    p.add_argument("--runs-dir", default="runs", help="results store (default: runs)")
    p.add_argument("--only", default=None, metavar="GLOB",
                   help="only runs whose dataset/model/regime matches, e.g. '*/alexnet/*' or 'ferplus/*/full'")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="set a setting for every selected run that reads it (repeatable); see the settings "
                        "below; none = no value (-p n_train none: the whole split), null = the profile's value")
    p.add_argument("--force", action="store_true", help="redo runs even when unchanged")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for runs another runner holds (default: 0, stop at once)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("results", help="the table of all runs of a profile",
                       description="One row per run (per classifier for the classical regime).")
    p.add_argument("--profile", default="quick", choices=list(config.profiles()))
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("compare", help="compare two runs on the same test images, with intervals and McNemar's test",
                       description="Both runs' test accuracies with 95%% bootstrap intervals, the paired difference "
                                   "B - A with its interval, the discordant images and McNemar's exact p. Runs "
                                   "scored on different test images (other subsets or label rules) are refused.")
    p.add_argument("run_a", metavar="RUN_DIR_A", help="a run folder, e.g. runs/quick/cifar10/alexnet/linear_probe")
    p.add_argument("run_b", metavar="RUN_DIR_B", help="another run folder scored on the same test images")
    p.add_argument("--json", action="store_true", help="print JSON: a, b, difference, difference_ci, n, a_only, "
                                                       "b_only, mcnemar_p")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("predict", help="classify image files with an exported bundle (CPU)",
                       description="Classify image files on CPU with a fine-tuned or SVM bundle "
                                   "(<run folder>/bundle); prints class and probability. Each image is "
                                   "preprocessed and classified on its own. The network is rebuilt from the "
                                   "bundle's weights (read as data); its TorchScript, which is code, runs only "
                                   "with --trust-torchscript.")
    p.add_argument("--bundle", required=True, help="a bundle folder, e.g. runs/quick/cifar10/alexnet/full/bundle")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="run the bundle's TorchScript (model.torchscript.pt / extractor.torchscript.pt) instead "
                        "of rebuilding from its weights; TorchScript is code: only for a bundle you trust")
    p.set_defaults(func=cmd_predict)

    # These two import torch / optuna to declare their options: only when asked for, so that
    # `transferstudy --help` and the other commands start quickly.
    for name, help_text, description in (
        ("bench", "benchmark the cached pipeline against the original per-image one",
         "Feature extraction, a 10-epoch linear probe and the SVM, run both the original study's way "
         "(PIL per image, backbone every epoch) and this build's (batched tensors, feature cache), on the "
         "same real-data subset."),
        ("search", "hyperparameter search of one regime on Optuna",
         "Hyperparameter search on Optuna: the author's grids, each trial one `transferstudy run` of a notebook."),
    ):
        p = sub.add_parser(name, help=help_text, description=description)
        if name == command:
            module = importlib.import_module(f"{__package__}.{name}")
            module.add_arguments(p)
            p.set_defaults(func=module.main)

    p = sub.add_parser("book-data", help="write the book's generated pages, figures and tables",
                       description="Write book/_generated/ from a profile's runs and the data root: the executed "
                                   "notebooks as pages (a note page for a failed or missing run), the figures and "
                                   "the tables the book's pages include.")
    p.add_argument("--profile", default=None, choices=list(config.profiles()), help="(default: quick)")
    p.add_argument("--runs-dir", default=None, help="results store (default: runs)")
    p.add_argument("--data-root", default=None, help="folder holding cifar10/ and ferplus/ (default: data)")
    p.add_argument("--book-root", default=".", help="folder holding _config.yml and _toc.yml (default: .)")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="build from a results bundle unpacked by `transferstudy import-results` into DIR (checked "
                        "again here) instead of --runs-dir and --data-root; the profile is the bundle's")
    p.set_defaults(func=cmd_book_data)

    p = sub.add_parser("export-results", help="pack a profile's results (what the book reads) into one checked archive",
                       description="Write BUNDLE.tar.gz from a profile's runs: each run's records (metrics, curves, "
                                   "predictions, plot embeddings, split, the executed notebook, meta.json with its "
                                   "provenance), the searches, and what the Datasets and Errors chapters show of the "
                                   "data (counts, split sizes, the pictured images as small PNGs; never the dataset), "
                                   "with manifest.json listing the SHA-256 and size of every file. `make book "
                                   "RESULTS=BUNDLE.tar.gz` builds the book from it on a machine without the data or "
                                   "the runs.")
    p.add_argument("bundle", metavar="BUNDLE.tar.gz", help="the archive to write (replaced whole, or not at all)")
    p.add_argument("--profile", default="quick", choices=list(config.profiles()), help="(default: quick)")
    p.add_argument("--runs-dir", default="runs", help="results store (default: runs)")
    p.add_argument("--data-root", default="data",
                   help="the data root the runs used, holding cifar10/ and ferplus/ (default: data)")
    p.add_argument("--with-models", action="store_true",
                   help="also pack each run's fine-tuned model bundle (bundle/: checkpoints, TorchScript, skops; "
                        "hundreds of MB per run)")
    p.set_defaults(func=cmd_export_results)

    p = sub.add_parser("import-results", help="check and unpack a results bundle",
                       description="Check BUNDLE.tar.gz (written by export-results) against its manifest and unpack "
                                   "it into DIR, replacing an earlier import there. A bundle with a member altered, "
                                   "missing or extra, from another bundle format version, or that is no bundle, is "
                                   "refused, naming the member, and nothing is unpacked.")
    p.add_argument("bundle", metavar="BUNDLE.tar.gz")
    p.add_argument("--to", required=True, metavar="DIR", help="the folder to unpack into, e.g. runs/bundle")
    p.set_defaults(func=cmd_import_results)

    p = sub.add_parser("classroom-pack", help="export a profile's frozen features for a class: no images, no backbone",
                       description=textwrap.fill(
                           "Write one .tar.gz with, for each dataset x model whose frozen_svm or linear_probe run "
                           "the profile holds, the frozen backbone's embeddings those two regimes train on (float16, "
                           "train / val / test), the labels, classes, split hash and provenance, and a manifest "
                           "with every file's SHA-256. The features are read from the runs' feature cache "
                           "(<runs-dir>/.cache) with the runs' own settings; an entry missing there is computed "
                           "from the images under --data-root and stored. The frozen_svm and linear_probe notebooks "
                           "train from the pack with papermill -p features_pack OUT.tar.gz.", 88))
    p.add_argument("out", metavar="OUT.tar.gz", help="the pack to write (atomically)")
    p.add_argument("--profile", default="quick", choices=list(config.profiles()),
                   help="whose runs (default: quick)")
    p.add_argument("--runs-dir", default="runs", help="results store (default: runs)")
    p.add_argument("--data-root", default="data",
                   help="folder holding the runs' cifar10/ and ferplus/ (default: data)")
    p.set_defaults(func=cmd_classroom_pack)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # as a command: end quietly when the reader of a pipe stops (| head)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    words = sys.argv[1:] if argv is None else list(argv)
    command = next((w for w in words if not w.startswith("-")), None)
    args = build_parser(command).parse_args(words)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Library errors carry a message naming the file or parameter and the fix.
        print(f"transferstudy {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
