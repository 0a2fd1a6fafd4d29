"""`transferstudy bench` at a tiny size (AlexNet, random init, CIFAR-10 image folders of noise)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image
from synthetic import write_cifar_pickles
from torch.utils.data import DataLoader, TensorDataset

from transferstudy import bench, config, data, features, models, regimes, training
from transferstudy.preprocess import Preprocessor

SPEC_KEYS = {"model", "dataset", "n", "naive", "cached", "probe_speedup", "matmul_peak_gflops", "forward_gflops",
             "forward_peak_fraction", "preprocess_share", "peak_rss_mb", "pretrained"}
PIPELINE_KEYS = {"extract_img_s", "probe_wall_s", "probe_test_acc", "forwards_per_image"}
# AlexNet's five convolutions at 224 px, 2 FLOPs per multiply-add: (c_in, c_out, kernel, output side).
ALEXNET_CONVS = ((3, 64, 11, 55), (64, 192, 5, 27), (192, 384, 3, 13), (384, 256, 3, 13), (256, 256, 3, 13))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="transferstudy bench")
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def noise_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 image folders of random-noise JPEGs, 3 train and 1 test per class (varied enough for the SVM)."""
    root = tmp_path_factory.mktemp("noise_cifar")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for cls in data.CLASSES["cifar10"]:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.jpg")
    return root


def test_bench_runs_both_pipelines_and_writes_every_key(tmp_path, noise_cifar, capsys):
    epochs = 2
    args = parse("--data-dir", str(noise_cifar), "--n", "20", "--epochs", str(epochs), "--batch-size", "4",
                 "--eval-batch-size", "8", "--pretrained", "false", "--device", "cpu",
                 "--json", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "RESULTS.md"))
    assert bench.main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "bench.json"]  # no temporary files left
    result = json.loads((tmp_path / "bench.json").read_text())

    assert SPEC_KEYS <= set(result)
    assert (result["model"], result["dataset"], result["n"], result["pretrained"]) == ("alexnet", "cifar10", 20, False)
    assert (result["n_val"], result["n_test"]) == (5, 5)
    naive, cached = result["naive"], result["cached"]
    assert PIPELINE_KEYS <= set(naive) and PIPELINE_KEYS <= set(cached)
    # Counted by a hook on the backbone: the cache runs it once per image, for the SVM, probe and plots alike;
    # the naive pipeline on train and val every epoch, on test after training, then once more for the SVM.
    assert cached["forwards_per_split"] == {"train": 1.0, "val": 1.0, "test": 1.0}
    assert cached["forwards_per_image"] == 1.0
    assert naive["forwards_per_split"] == {"train": epochs + 1, "val": epochs + 1, "test": 2.0}
    assert naive["forwards_per_image"] == pytest.approx(((epochs + 1) * 25 + 2 * 5) / 30)
    assert result["probe_speedup"] == pytest.approx(naive["probe_wall_s"] / cached["probe_wall_s"])
    assert result["probe_acc_diff_pp"] == pytest.approx(100 * (cached["probe_test_acc"] - naive["probe_test_acc"]))
    for pipeline in (naive, cached):
        assert pipeline["probe_test_acc"] * 5 == pytest.approx(round(pipeline["probe_test_acc"] * 5))  # of 5 images
        assert pipeline["extract_img_s"] > 0 and pipeline["probe_wall_s"] > 0
    expected_flops = sum(2 * c_in * c_out * k * k * side * side for c_in, c_out, k, side in ALEXNET_CONVS)
    assert result["forward_flops_per_image"] == expected_flops
    assert result["forward_gflops"] == pytest.approx(expected_flops * result["forward_img_s"] / 1e9)
    assert result["forward_peak_fraction"] == pytest.approx(result["forward_gflops"] / result["matmul_peak_gflops"])
    assert result["largest_layer"] == "features.3" and result["largest_layer_gflops"] > 0
    assert result["largest_layer_peak_fraction"] == pytest.approx(
        result["largest_layer_gflops"] / result["matmul_peak_gflops"])
    assert 0.0 < result["preprocess_share"] < 1.0 and result["train_step_augment"] == "cifar_full"
    assert result["preprocess_share"] == pytest.approx(
        result["preprocess_ms"] / (result["preprocess_ms"] + result["train_step_ms"]))
    assert 1 <= result["train_step_reps"] <= 10
    assert result["peak_rss_mb"] >= result["peak_rss_self_mb"] > 0
    assert result["peak_rss_children_mb"] > 0  # the naive pipeline's DataLoader workers
    assert len(result["targets"]) == 8 and all(isinstance(t["met"], bool) for t in result["targets"])
    assert next(t for t in result["targets"] if "exactly 1" in t["target"])["met"] is True
    # the layer-wise analysis: one pass per image for all 7 probe points; resilience as re-running the network
    assert result["analysis_images"] == 5 and result["analysis_passes_per_image"] == 1.0
    assert result["resilience_units"] == 8 and result["resilience_same_accuracy"] is True
    assert result["resilience_saving"] == pytest.approx(result["resilience_naive_s"] / result["resilience_cached_s"])

    shown = capsys.readouterr().out
    assert "random init (pretrained: false)" in shown and "backbone passes per image" in shown
    page = (tmp_path / "RESULTS.md").read_text()
    assert result["command"] in page and "| backbone passes per image | " in page
    assert parse(*shlex.split(result["command"])[2:]) == args  # the recorded command reproduces the run


@pytest.mark.parametrize("model", models.MODELS)
def test_largest_layer_is_the_one_with_the_most_flops(model):
    # Counted, not assumed: every leaf module's FLOPs in one extraction forward at 224 px.
    torch.manual_seed(0)
    net = models.build_model(model, 10, pretrained=False).eval()
    kind = "pooled" if model == "alexnet" else None
    x = torch.randn(1, 3, 224, 224)
    leaves = {name: m for name, m in net.named_modules() if name and not list(m.children())}
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module, args, output) -> None:
            inputs[name] = args[0].clone()  # a copy: later in-place ops must not change it
        return hook

    handles = [m.register_forward_hook(keep_input(name)) for name, m in leaves.items()]
    with torch.no_grad():
        models.embed(net, model, x, kind)
    for handle in handles:
        handle.remove()
    flops = {name: bench._flops(lambda: leaves[name](x_in)) for name, x_in in inputs.items()}
    assert flops[bench.LARGEST_LAYER[model]] == max(flops.values()) > 0


def test_naive_probe_trains_the_head_as_the_cached_probe_does():
    # Given the same inputs (here the batched preprocessing in both), the naive loop and training.fit on
    # cached features take the same batches and optimiser steps, so the heads end up equal.
    torch.manual_seed(0)
    net = regimes.apply_regime(models.build_model("alexnet", 3, pretrained=False), "alexnet", "linear_probe")
    head = models.head(net, "alexnet")
    g = torch.Generator().manual_seed(1)
    images = {s: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
              for s, n in (("train", 4), ("val", 2))}
    labels = {s: torch.randint(0, 3, (len(x),), generator=g) for s, x in images.items()}
    args = argparse.Namespace(model="alexnet", epochs=2, batch_size=2, n=4, seed=42)
    setup = bench._Setup(args, torch.device("cpu"), net, head, copy.deepcopy(head.state_dict()),
                         bench._ForwardCounter(bench._backbone(net, "alexnet")),
                         config.resolve("linear_probe", "alexnet", "cifar10"), {}, {"probe": "penultimate"}, False)
    pre = Preprocessor()
    tensors = {s: TensorDataset(pre(images[s], False), labels[s]) for s in images}
    # A worker process, as in the bench: its iterator prefetches, so an extra iterator per epoch (tqdm.auto
    # makes one eagerly) would draw a second order from SeededOrder and the batches would differ.
    train = DataLoader(tensors["train"], batch_size=2, sampler=bench.SeededOrder(4, args.seed), num_workers=1)
    opt, sched = setup.fresh_head()
    bench._naive_probe(setup, train, lambda: DataLoader(tensors["val"], batch_size=2), opt, sched)
    naive = copy.deepcopy(head.state_dict())

    X = features.embeddings(net, "alexnet", "penultimate", {s: _Split(images[s], labels[s]) for s in images},
                            weights_id=None, cache_dir=None, preprocess=pre, batch_size=2, device="cpu")
    splits = {s: features.FeatureSplit(X[s], labels[s]) for s in images}
    opt, sched = setup.fresh_head()
    training.fit(head, splits["train"], splits["val"], preprocess=features.identity, optimizer=opt, scheduler=sched,
                 epochs=2, batch_size=2, device="cpu", monitor=setup.probe_cfg["monitor"], seed=args.seed,
                 log=lambda line: None)
    for name, value in head.state_dict().items():
        assert not torch.equal(value, setup.head_init[name])
        torch.testing.assert_close(value, naive[name], rtol=1e-4, atol=1e-6)


class _Split:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels, self.soft = images, labels, None
        self.files = [f"{i}.png" for i in range(len(images))]


@pytest.mark.parametrize("argv, message", [
    (("--n", "2"), "--n must be >= 4"),
    (("--epochs", "0"), "--epochs must be >= 1"),
    (("--workers", "-1"), "--workers must be >= 0"),
    (("--pretrained", "false", "--weights-path", "w.pth"), "--weights-path"),
])
def test_bad_arguments_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        bench.main(parse(*argv))


def test_pickled_cifar_is_refused_before_any_work(tmp_path, monkeypatch):
    # torchvision checks md5 sums, which the synthetic pickles do not match.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    write_cifar_pickles(tmp_path)
    args = parse("--data-dir", str(tmp_path), "--n", "8", "--pretrained", "false", "--device", "cpu")
    with pytest.raises(ValueError, match="pickled CIFAR-10.*--data-dir"):
        bench.main(args)
