"""The partial and full fine-tunes on several GPUs (or CPU processes) with DistributedDataParallel.

    torchrun --nproc-per-node 4 -m transferstudy.distributed --regime full --model deit_base \\
        --dataset cifar10 --profile full --data-root data

Every rank executes the regime's own notebook, the one `transferstudy run` executes, with the same
parameters: there is no second copy of its steps. Inside the notebook :func:`transferstudy.session.start`
joins torchrun's process group (NCCL on CUDA, gloo on CPU; the kernel inherits torchrun's environment),
and :func:`transferstudy.training.fit` trains a DDP copy, each rank on its shard of every global batch
(``batch_size`` stays the global batch). Rank 0 runs it as the runner does (:func:`runner.execute`: the
run folder's lock, recovery of what a killed run left, staging in ``.running`` and the swap into place,
``<runs-dir>/<profile>/<dataset>/<model>/<regime>/``); the other ranks write into a scratch folder that is
thrown away. A killed run resumes from its last finished epoch when the same command is started again
(every rank reads the training state from the shared feature cache). Without torchrun it is one
ordinary process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import config, runner

REGIMES = ("partial", "full")


def fine_tune(regime: str, model: str, dataset: str, profile: str, data_root: str | Path, runs_root: str | Path,
              overrides: dict[str, Any] | None = None) -> Path | None:
    """Execute the fine-tune's notebook on this rank; rank 0 returns the run folder, the others None.

    A failed run raises RuntimeError on rank 0 naming the error and the kept notebook (torchrun then
    stops the other ranks).
    """
    if regime not in REGIMES:
        raise ValueError(f"--regime {regime!r}: distributed training is for {' and '.join(REGIMES)} fine-tunes")
    spec, data_root, runs_root = runner.RunSpec(dataset, model, regime), Path(data_root), Path(runs_root)
    if int(os.environ.get("RANK", "0")) == 0:
        outcome = runner.execute(spec, profile, data_root, runs_root, dict(overrides or {}), force=True, report=print)
        if outcome.status != "ok":
            raise RuntimeError(f"{spec.key} failed: {outcome.error} (the attempt is kept in {outcome.run_dir})")
        return outcome.run_dir
    final = runner.run_dir_for(runs_root, profile, spec)
    params = runner.notebook_parameters(spec, profile, data_root, final, runs_root, dict(overrides or {}))
    with tempfile.TemporaryDirectory() as scratch:  # ranks > 0 record nothing
        params["output_dir"] = scratch
        runner.execute_notebook(runner.notebook_path(regime), Path(scratch) / "notebook.ipynb", params, Path(scratch))
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--regime", required=True, choices=REGIMES)
    parser.add_argument("--model", required=True, choices=config.MODELS)
    parser.add_argument("--dataset", required=True, choices=config.DATASETS)
    parser.add_argument("--profile", default="quick", choices=list(config.profiles()))
    parser.add_argument("--data-root", default="data", help="folder holding cifar10/ and ferplus/ (default: data)")
    parser.add_argument("--runs-dir", default="runs", help="results store (default: runs)")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="override a setting, as for `transferstudy run` (repeatable)")


def main(args: argparse.Namespace) -> int:
    """Fine-tune through the notebook on this rank (its kernel joins torchrun's process group)."""
    overrides = {key: config.parse_value(value) for key, value in args.param}
    final = fine_tune(args.regime, args.model, args.dataset, args.profile, args.data_root, args.runs_dir, overrides)
    if final is not None:
        print(f"run folder: {final}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m transferstudy.distributed",
                                      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
