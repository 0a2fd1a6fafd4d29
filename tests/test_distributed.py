"""DistributedDataParallel on CPU with gloo: a 2-process step equals the 1-process step; torchrun end to end."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from synthetic import write_cifar_imagefolder
from torch import nn

from transferstudy import models, regimes, report, results, training
from transferstudy.preprocess import Preprocessor

N, CLASSES, WORLD = 8, 10, 2


def _split() -> SimpleNamespace:
    """N random images; pixel [0, 0, 0] of image i is i, so a rank's samples can be identified."""
    images = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, 0, 0, 0] = torch.arange(N, dtype=torch.uint8)
    return SimpleNamespace(images=images, labels=torch.arange(N) % CLASSES, soft=None)


def _net(name: str) -> tuple[nn.Module, dict[str, list[nn.Parameter]]]:
    torch.manual_seed(0)
    if name.startswith("tiny"):
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, CLASSES))
        return net, {"all": list(net.parameters())}
    net = models.build_model("alexnet", CLASSES, pretrained=False)
    regimes.apply_regime(net, "alexnet", "partial")
    for module in net.modules():  # dropout masks differ between processes; without it the step is deterministic
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return net, regimes.param_groups(net, "alexnet", "partial")


def _one_step(name: str) -> dict:
    """One SGD step of ``fit`` on the whole split as its global batch; the trained weights and the images seen."""
    torch.set_num_threads(1)
    net, groups = _net(name)
    seen: list[int] = []
    resize = Preprocessor(size=64)

    def preprocess(batch: torch.Tensor, train: bool) -> torch.Tensor:
        if train:
            seen.extend(batch[:, 0, 0, 0].tolist())
        return resize(batch, train)

    opt = training.make_optimizer(groups, name="sgd", lr=0.05, momentum=0.9)
    split = _split()
    # tiny_micro: each rank's 4 samples as micro-batches of 3 + 1, gradients synced on the last one only.
    training.fit(net, split, split, preprocess=preprocess, optimizer=opt, epochs=1, batch_size=N, device="cpu",
                 monitor="val_acc", micro_batch_size=3 if name == "tiny_micro" else None, log=lambda _: None)
    return {"state": {k: v.clone() for k, v in net.state_dict().items()}, "seen": seen}


NAMES = ("tiny", "tiny_micro", "alexnet_partial")


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.save({name: _one_step(name) for name in NAMES}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each model's step on 2 gloo processes (spawned once for all models)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    steps = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    shutil.rmtree(out, ignore_errors=True)  # two models' weights per rank, read into memory above
    return steps


@pytest.mark.parametrize("name", NAMES)
def test_two_gloo_processes_take_the_single_process_step(name, ranks):
    ranks = [r[name] for r in ranks]
    single = _one_step(name)
    initial = _net(name)[0].state_dict()
    # each rank trained on its own half of the global batch
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(N))
    assert all(len(r["seen"]) == N // WORLD for r in ranks)
    assert sorted(single["seen"]) == list(range(N))
    changed = [k for k in initial if not torch.equal(initial[k], single["state"][k])]
    assert changed, "the step changed no weight"
    for key, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(ranks[1]["state"][key], ranks[0]["state"][key])  # the replicas stay identical
    if name == "tiny_micro":  # and accumulating micro-batches took the whole-batch step
        for key, value in _one_step("tiny")["state"].items():
            torch.testing.assert_close(single["state"][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [7, 8])
def test_rank_shards_put_together_give_each_global_batch(n):
    order, batch = torch.randperm(n), 4
    shards = [training._shard(order, batch, rank, WORLD) for rank in range(WORLD)]
    assert len(shards[0]) == len(shards[1]) == -(-n // WORLD)
    local = batch // WORLD
    for step, start in enumerate(range(0, n, batch)):
        together = sorted(torch.cat([s[step * local:(step + 1) * local] for s in shards]).tolist())
        expected = order[start:start + batch].tolist()
        padding = together.copy()
        for i in expected:
            padding.remove(i)
        assert padding == sorted(order[:len(padding)].tolist())  # padded with the epoch's first samples


def test_uneven_global_batch_is_refused_with_the_fix(monkeypatch):
    net, groups = _net("tiny")
    monkeypatch.setattr(training, "_world", lambda: (0, 3))  # as under torchrun --nproc-per-node 3
    with pytest.raises(ValueError, match="batch_size 8 is the global batch .* pick a multiple of 3"):
        training.fit(net, _split(), _split(), preprocess=Preprocessor(size=32), epochs=1, batch_size=N,
                     optimizer=training.make_optimizer(groups, name="sgd", lr=0.1), device="cpu")


@pytest.mark.slow
def test_torchrun_runs_the_notebook_on_every_rank_and_a_killed_run_resumes(tmp_path):
    """torchrun executes the partial fine-tune's own notebook on 2 gloo ranks; killed after its first epoch
    (every process, kernels included), the same command takes over the lock, goes on from epoch 1 on both
    ranks and writes one run folder from rank 0."""
    import psutil

    root = tmp_path / "data"
    write_cifar_imagefolder(root / "cifar10", 5, 1)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "-m", "transferstudy.distributed", "--regime", "partial", "--model", "alexnet", "--dataset", "cifar10",
           "--profile", "smoke", "--data-root", str(root), "--runs-dir", str(runs), "-p", "pretrained", "false",
           "-p", "epochs", "2", "-p", "augment", "light"]  # augmented: trains through the network, not the cache
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    state = runs / ".cache" / "resume"
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while len(list(state.glob("*.e0001.*.pt"))) < WORLD and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()[0][-3000:]
        time.sleep(0.05)
    everyone = psutil.Process(first.pid)
    for proc in [everyone, *everyone.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    first.communicate(timeout=60)
    run = runs / "smoke" / "cifar10" / "alexnet" / "partial"
    assert not (run / "meta.json").exists()

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = results.read_json(run / "meta.json")
    assert meta["status"] == "ok" and meta["world_size"] == WORLD and meta["backend"] == "gloo"
    assert meta["resumed_from_epoch"] == 1 and meta["epochs_run"] == 2
    assert "took over the lock" in proc.stdout and "an interrupted run was left in partial.running" in proc.stdout
    assert (run / "bundle" / "checkpoint.pt").is_file() and not run.with_name("partial.running").exists()
    assert len((run / "curves.csv").read_text().splitlines()) == 3  # header + 2 epochs, the first from the state
    assert not list(state.iterdir())  # the finished run's state is gone
    nb = (run / "notebook.ipynb").read_text()
    assert "going on after epoch 1" in nb  # the notebook's own fit resumed
    table = report.collect(runs / "smoke")
    assert table[["regime", "status"]].values.tolist() == [["partial", "ok"]]
    assert proc.stdout.count("run folder:") == 1  # rank 0 alone reports and records
