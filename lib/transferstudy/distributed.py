"""The partial and full fine-tunes on several GPUs (or CPU processes) with DistributedDataParallel.

    torchrun --nproc-per-node 4 -m transferstudy.distributed --regime full --model deit_base \\
        --dataset cifar10 --profile full --data-root data

Every process loads the same split and runs the notebook's steps through the same session and
training code; :func:`transferstudy.training.fit` sees the process group and trains a DDP copy,
each rank on its shard of every global batch (``batch_size`` stays the global batch), NCCL on CUDA
and gloo on CPU. Metrics are reduced over the ranks; rank 0 scores val and test and writes the run
folder, ``<runs-dir>/<profile>/<dataset>/<model>/<regime>/`` as `transferstudy run` does (staged in
``.running`` and swapped in when complete). Without torchrun it is one ordinary process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import bundle, config, features, models, regimes, runner, session
from .results import swap_into_place

REGIMES = ("partial", "full")


def fine_tune(regime: str, model: str, dataset: str, profile: str, data_root: str | Path, runs_root: str | Path,
              overrides: dict[str, Any] | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """Run one fine-tune in this process group (or alone); rank 0 returns the run folder, the others None."""
    if regime not in REGIMES:
        raise ValueError(f"--regime {regime!r}: distributed training is for {' and '.join(REGIMES)} fine-tunes")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    final = runner.run_dir_for(Path(runs_root), profile, runner.RunSpec(dataset, model, regime))
    stage = final.with_name(final.name + ".running")
    with tempfile.TemporaryDirectory() as scratch:  # ranks > 0 record nothing
        if rank == 0:
            shutil.rmtree(stage, ignore_errors=True)
        run = session.start(regime, model=model, dataset=dataset, data_dir=Path(data_root) / dataset,
                            profile=profile, output_dir=stage if rank == 0 else scratch,
                            cache_dir=cache_dir or Path(runs_root) / ".cache", overrides=overrides,
                            log=print if rank == 0 else lambda _: None)
        net = run.build_model()
        regimes.apply_regime(net, model, regime)
        trainable, total = regimes.count_params(net)
        if run.cfg["augment"] == "none":  # as the notebook: train the rest on the frozen prefix's cached activations
            if rank > 0:
                dist.barrier()  # rank 0 fills the feature cache first; the others read it
            acts, rest = run.prefix_features(net)
            if rank == 0 and world > 1:
                dist.barrier()
            run.fit(net, acts["train"], acts["val"], preprocess=features.identity, module=rest)
        else:
            run.fit(net)
        if rank > 0:
            return None
    run.evaluate(run.predict(net, "val"), run.predict(net, "test"))
    kind = models.EMBEDDINGS[model][-1]
    run.save_plot_embeddings("finetuned", run.embeddings(net, kind, weights_id=None, splits=("test",))["test"])
    bundle.export_finetuned(run.output_dir / "bundle", net, model, run.classes, run.preprocessor("none"),
                            {"regime": regime, **run.recorder.meta})
    run.finish(trainable=trainable, total=total, world_size=world,
               backend=dist.get_backend() if world > 1 else None)
    swap_into_place(stage, final)
    return final


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
    """Join torchrun's process group when there is one (NCCL on CUDA, gloo on CPU), fine-tune, leave it."""
    overrides = {key: config.parse_value(value) for key, value in args.param}
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        final = fine_tune(args.regime, args.model, args.dataset, args.profile, args.data_root, args.runs_dir,
                          overrides)
    finally:
        if distributed:
            dist.destroy_process_group()
    if final is not None:
        print(f"run folder: {final}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m transferstudy.distributed",
                                      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
