"""The `transferstudy` command: one subcommand per job, each with --help."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
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


def cmd_data(args: argparse.Namespace) -> int:
    from . import data

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

    overrides = {key: config.parse_value(value) for key, value in args.param}
    outcomes = runner.run_matrix(args.profile, Path(args.data_root), Path(args.runs_dir), overrides,
                                 only=args.only, force=args.force)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    print(f"{counts['ok']} ran, {counts['skipped']} unchanged (skipped), {counts['failed']} failed; "
          f"table: {Path(args.runs_dir) / args.profile / 'results.csv'}")
    return 1 if counts["failed"] else 0


def cmd_results(args: argparse.Namespace) -> int:
    from .results import collect

    frame = collect(Path(args.runs_dir) / args.profile)
    rows = json.loads(frame.to_json(orient="records"))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runs under {Path(args.runs_dir) / args.profile}; run `transferstudy run --profile {args.profile}`")
    else:
        _print_table(rows, ["dataset", "model", "regime", "classifier", "status", "val_accuracy",
                            "test_accuracy", "test_macro_f1", "trainable", "pretrained", "wall_s"])
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .bundle import predict_files

    rows = predict_files(args.bundle, args.images)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, list(rows[0]))
    return 0


def cmd_book_data(args: argparse.Namespace) -> int:
    from . import book

    files = book.generate(Path(args.runs_dir) / args.profile, Path(args.data_root), Path(args.book_root))
    pages = sum(f.parent.name == "runs" for f in files)
    print(f"{len(files)} files ({pages} run pages) written to {Path(args.book_root) / book.GENERATED}")
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
                       description="Classes, split sizes, per-class counts and the split hash of a dataset folder.")
    p.add_argument("--dataset", required=True, choices=config.DATASETS)
    p.add_argument("--data-dir", required=True, help="that dataset's own folder, e.g. data/cifar10")
    p.add_argument("--label-rule", default=None, choices=["majority", "argmax", "votes"],
                   help="FERPlus label rule (default: majority for Microsoft's layout)")
    p.add_argument("--val-source", default="split", choices=["split", "official"],
                   help="validation: 20%% stratified split of train, or FERPlus's official Valid set")
    p.add_argument("--download", action="store_true", help="CIFAR-10 only: download with torchvision")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("run", help="execute the study's notebooks into the results store",
                       description="Execute the matrix (dataset x model x regime) with papermill. Runs whose "
                                   "settings and code are unchanged since they last succeeded are skipped.")
    p.add_argument("--profile", default="quick", choices=list(config.profiles()),
                   help="smoke | quick | full (default: quick)")
    p.add_argument("--data-root", default="data", help="folder holding cifar10/ and ferplus/ (default: data)")
    p.add_argument("--runs-dir", default="runs", help="results store (default: runs)")
    p.add_argument("--only", default=None, metavar="GLOB",
                   help="only runs whose dataset/model/regime matches, e.g. '*/alexnet/*' or 'ferplus/*/full'")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="override a notebook parameter for every run that has it (repeatable)")
    p.add_argument("--force", action="store_true", help="redo runs even when unchanged")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("results", help="the table of all runs of a profile",
                       description="One row per run (per classifier for the classical regime).")
    p.add_argument("--profile", default="quick", choices=list(config.profiles()))
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("predict", help="classify image files with an exported bundle (CPU)",
                       description="Classify image files on CPU with a fine-tuned or SVM bundle "
                                   "(<run folder>/bundle); prints class and probability.")
    p.add_argument("--bundle", required=True, help="a bundle folder, e.g. runs/quick/cifar10/alexnet/full/bundle")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
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
    p.add_argument("--profile", default="quick", choices=list(config.profiles()))
    p.add_argument("--runs-dir", default="runs", help="results store (default: runs)")
    p.add_argument("--data-root", default="data", help="folder holding cifar10/ and ferplus/ (default: data)")
    p.add_argument("--book-root", default=".", help="folder holding _config.yml and _toc.yml (default: .)")
    p.set_defaults(func=cmd_book_data)
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
