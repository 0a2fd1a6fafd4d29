"""The feature cache (hits, invalidation, float16 on disk, atomic writes) and training from cached activations.

Training on cached embeddings / prefix activations must give the weights that training through the
frozen layers gives on the same batches: checked on both study architectures (random init, 224 px,
a few images; DeiT-Base runs ~3.5 img/s on 2 CPU cores).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from transferstudy import features, models, regimes, results
from transferstudy import session
from transferstudy.data import Split
from transferstudy.preprocess import Preprocessor
from transferstudy.training import fit, make_optimizer

PRE = Preprocessor()


class ImageCounter:
    """Counts the images that enter ``module`` (a forward hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.n = 0
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.n += len(inputs[0])

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def backbone(net: nn.Module, model: str) -> nn.Module:
    """The module each backbone forward pass enters once."""
    return net.features[0] if model == "alexnet" else net.patch_embed


@functools.cache
def _built(model: str) -> nn.Module:
    torch.manual_seed(0)
    return models.build_model(model, 3, pretrained=False)


def fresh(model: str) -> nn.Module:
    """A randomly initialised ``model`` with a 3-way head, the same in every test (built once)."""
    return copy.deepcopy(_built(model))


def random_split(n: int, seed: int, classes: int = 3) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return Split(images, labels, None, [f"img{seed}_{i}.png" for i in range(n)])


def smoke_session(tmp_path: Path, cifar_dir: Path, regime: str = "frozen_svm", **overrides) -> session.Session:
    """A smoke-profile run of AlexNet (random init) on 6 train / 4 val / 4 test synthetic CIFAR images."""
    settings = {"pretrained": False, "n_train": 6, "n_val": 4, "n_test": 4, "eval_batch_size": 4, **overrides}
    return session.start(regime, model="alexnet", dataset="cifar10", data_dir=cifar_dir, profile="smoke",
                         output_dir=tmp_path / "run", cache_dir=tmp_path / "cache", overrides=settings,
                         log=lambda line: None)


def stored(cache: Path) -> list[Path]:
    return sorted((cache / "features").iterdir())


# --- the cache ---------------------------------------------------------------------------------


def test_cache_key_ignores_argument_order_and_changes_with_every_part():
    parts = dict(model="alexnet", weights="random:alexnet", kind="pooled", files="ab12", preprocess="P()")
    key = features.cache_key(**parts)
    assert key == features.cache_key(**dict(reversed(parts.items())))
    for name in parts:
        assert features.cache_key(**{**parts, name: parts[name] + "x"}) != key, name
    assert features.split_digest(["a", "b"]) != features.split_digest(["b", "a"])


def test_embeddings_are_computed_once_per_weights_split_and_preprocessing(tmp_path, cifar_dir):
    run = smoke_session(tmp_path, cifar_dir, eval_mode="resize")
    net = run.build_model()
    counter = ImageCounter(net.features[0])
    weights = run.weights_id()

    first = run.embeddings(net, "pooled", weights, splits=("train", "val"))
    assert counter.take() == 6 + 4
    files = stored(run.cache_dir)
    assert [f.suffix for f in files] == [".npy", ".npy"]  # one file per split, no temporary files left
    on_disk = {np.load(f).shape[0]: np.load(f) for f in files}
    assert all(a.dtype == np.float16 and a.shape[1] == 9216 for a in on_disk.values())
    assert first["train"].dtype == np.float32 and first["train"].shape == (6, 9216)
    np.testing.assert_array_equal(first["train"], on_disk[6].astype(np.float32))

    again = run.embeddings(net, "pooled", weights, splits=("train", "val"))
    assert counter.take() == 0  # nothing changed: reused
    for split in first:
        np.testing.assert_array_equal(again[split], first[split])  # a hit returns exactly what the miss did

    run.data.val = dataclasses.replace(run.data.val, images=run.data.val.images[:2], labels=run.data.val.labels[:2],
                                       files=run.data.val.files[:2])
    run.embeddings(net, "pooled", weights, splits=("train", "val"))
    assert counter.take() == 2  # the changed split only

    run.cfg["eval_mode"] = "resize_crop"
    run.embeddings(net, "pooled", weights, splits=("train", "val"))
    assert counter.take() == 6 + 2  # other preprocessing: every split again
    assert len(stored(run.cache_dir)) == 5  # (train, val, val of 2) resized + (train, val of 2) cropped


def test_other_weights_are_recomputed_and_the_same_weights_reused(tmp_path, cifar_dir):
    run = smoke_session(tmp_path, cifar_dir)
    net = run.build_model()
    counter = ImageCounter(net.features[0])
    run.cfg.update(pretrained=True, weights_path=str(tmp_path / "a.pth"))  # weights_id() hashes this file
    torch.save(net.state_dict(), tmp_path / "a.pth")
    first = run.embeddings(net, "pooled", run.weights_id(), splits=("val",))["val"]
    assert counter.take() == 4

    with torch.no_grad():
        net.features[0].weight.mul_(2)
    torch.save(net.state_dict(), tmp_path / "a.pth")
    changed = run.embeddings(net, "pooled", run.weights_id(), splits=("val",))["val"]
    assert counter.take() == 4 and not np.allclose(changed, first)

    shutil.copy(tmp_path / "a.pth", tmp_path / "b.pth")  # the same weights file elsewhere: the same key
    run.cfg["weights_path"] = str(tmp_path / "b.pth")
    np.testing.assert_array_equal(run.embeddings(net, "pooled", run.weights_id(), splits=("val",))["val"], changed)
    assert counter.take() == 0


def test_without_weights_id_nothing_is_cached(tmp_path, cifar_dir):
    run = smoke_session(tmp_path, cifar_dir)
    net = run.build_model()
    counter = ImageCounter(net.features[0])
    for _ in range(2):
        run.embeddings(net, "pooled", None, splits=("val",))
    assert counter.take() == 8
    assert not (run.cache_dir / "features").exists()


def test_alexnet_penultimate_comes_from_the_cached_pooled_pass(tmp_path, cifar_dir):
    run = smoke_session(tmp_path, cifar_dir)
    net = run.build_model()
    counter = ImageCounter(net.features[0])
    pooled = run.embeddings(net, "pooled", run.weights_id(), splits=("val",))["val"]
    assert counter.take() == 4
    penultimate = run.embeddings(net, "penultimate", run.weights_id(), splits=("val",))["val"]
    assert counter.take() == 0 and penultimate.shape == (4, 4096)
    net.eval()
    with torch.no_grad():
        np.testing.assert_allclose(penultimate, net.classifier[:6](torch.from_numpy(pooled)).numpy(), atol=1e-6)
        x = run.preprocessor("none")(run.data.val.images, False)
        direct = models.embed(net, "alexnet", x, "penultimate").numpy()
    np.testing.assert_allclose(penultimate, direct, rtol=1e-2, atol=1e-4)  # up to the float16 storage


def test_a_failed_write_leaves_no_file_and_a_failed_compute_writes_nothing(tmp_path, monkeypatch):
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    def replace_fails(src, dst):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(results.os, "replace", replace_fails)
        with pytest.raises(OSError, match="disk full"):
            features.cached(tmp_path, "k", compute, log=lambda line: None)
    assert list((tmp_path / "features").iterdir()) == []  # the temporary file is gone too

    def broken() -> np.ndarray:
        raise RuntimeError("backbone failed")

    with pytest.raises(RuntimeError, match="backbone failed"):
        features.cached(tmp_path, "k", broken, log=lambda line: None)
    assert list((tmp_path / "features").iterdir()) == []

    out = features.cached(tmp_path, "k", compute, log=lambda line: None)
    assert len(calls) == 2 and os.listdir(tmp_path / "features") == ["k.npy"]
    np.testing.assert_array_equal(out, compute())


# --- training from cached activations ------------------------------------------------------------


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal up to float rounding (a cheap check: AlexNet has 57M trainable parameters in the partial regime)."""
    for name, value in actual.items():
        bound = 1e-6 + 1e-4 * expected[name].abs().max().item()
        assert (value - expected[name]).abs().max().item() <= bound, name


def _adamw(params, lr) -> torch.optim.Optimizer:
    return make_optimizer(params, name="adamw", lr=lr, weight_decay=1e-4)


def _fit(module, train, val, preprocess, optimizer) -> None:
    """One epoch of two steps in a seeded shuffled order (2 images, batch 1: DeiT-Base is slow on CPU)."""
    fit(module, train, val, preprocess=preprocess, optimizer=optimizer, epochs=1, batch_size=1, device="cpu",
        seed=7, log=lambda line: None)


@pytest.mark.parametrize("model", models.MODELS)
def test_probe_on_cached_features_equals_probe_through_the_frozen_backbone(model):
    net = regimes.apply_regime(fresh(model), model, "linear_probe")
    for module in net.modules():  # AlexNet's classifier dropout: train mode would differ from the cached eval-mode
        if isinstance(module, nn.Dropout):  # embedding, so switch it off for the comparison
            module.p = 0.0
    twin = copy.deepcopy(net)
    train, val = random_split(2, 1), random_split(1, 2)
    head, twin_head = models.head(net, model), models.head(twin, model)
    init = copy.deepcopy(head.state_dict())

    kind = models.EMBEDDINGS[model][-1]
    X = features.embeddings(net, model, kind, {"train": train, "val": val}, weights_id=None, cache_dir=None,
                            preprocess=PRE, batch_size=1, device="cpu")
    cached = {s: features.FeatureSplit(X[s], split.labels) for s, split in (("train", train), ("val", val))}
    _fit(head, cached["train"], cached["val"], features.identity, _adamw({"head": list(head.parameters())}, 1e-2))
    _fit(twin, train, val, PRE, _adamw({"head": list(twin_head.parameters())}, 1e-2))

    assert all(not torch.equal(value, init[name]) for name, value in head.state_dict().items())  # it trained
    assert_same_weights(head.state_dict(), twin_head.state_dict())


@pytest.mark.parametrize("model", models.MODELS)
def test_partial_from_cached_prefix_equals_partial_through_the_whole_network(model):
    net = regimes.apply_regime(fresh(model), model, "partial")
    twin = copy.deepcopy(net)
    before = copy.deepcopy(net.state_dict())
    train, val = random_split(2, 1), random_split(1, 2)
    counter = ImageCounter(backbone(net, model))

    acts, rest = features.prefix_splits(net, model, "partial", {"train": train, "val": val}, weights_id=None,
                                        cache_dir=None, preprocess=PRE, batch_size=1, device="cpu")
    assert counter.take() == 2 + 1
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for p in rest.parameters() if p.requires_grad} == trainable  # net's own layers
    # AlexNet's classifier dropout stays in train mode in `rest`; both runs draw the same masks, since
    # nothing else draws from the seeded global RNG between fit's seeding and each dropout call.
    modes = []
    for module in rest.modules():
        if isinstance(module, nn.Dropout):
            module.register_forward_hook(lambda m, i, o: modes.append((torch.is_grad_enabled(), m.training)))
    lrs = {"backbone": 1e-3, "head": 1e-2}
    _fit(rest, acts["train"], acts["val"], features.identity, _adamw(regimes.param_groups(net, model, "partial"), lrs))
    _fit(twin, train, val, PRE, _adamw(regimes.param_groups(twin, model, "partial"), lrs))
    assert counter.take() == 0  # trained from the cached activations only
    training_steps = [mode for grad, mode in modes if grad]
    assert training_steps and all(training_steps)  # rest's dropout layers (DeiT's have p=0) trained in train mode

    assert_same_weights(net.state_dict(), twin.state_dict())
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert all(torch.equal(value, before[name]) == (name not in trained) for name, value in net.state_dict().items())


def test_session_prefix_features_are_cached_in_float16_and_train_the_network(tmp_path, cifar_dir):
    run = smoke_session(tmp_path, cifar_dir, regime="partial", augment="none")
    net = regimes.apply_regime(run.build_model(), "alexnet", "partial")
    counter = ImageCounter(net.features[0])
    acts, rest = run.prefix_features(net)
    assert counter.take() == 6 + 4
    assert {np.load(f).dtype for f in stored(run.cache_dir)} == {np.dtype(np.float16)}
    assert sorted(np.load(f).shape for f in stored(run.cache_dir)) == [(4, 256, 13, 13), (6, 256, 13, 13)]
    assert acts["train"].images.shape == (6, 256 * 13 * 13)

    again, _ = run.prefix_features(net)
    assert counter.take() == 0
    torch.testing.assert_close(again["val"].images, acts["val"].images, rtol=0, atol=0)

    conv5 = net.features[10].weight.clone()
    run.fit(net, acts["train"], acts["val"], preprocess=features.identity, module=rest)
    assert counter.take() == 0 and not torch.equal(net.features[10].weight, conv5)


def test_session_prefix_features_refuse_augmentation(tmp_path, cifar_dir):
    run = smoke_session(tmp_path, cifar_dir, regime="partial", augment="light")
    with pytest.raises(ValueError, match="augment 'none'.*run.fit"):
        run.prefix_features(run.build_model())


def test_prefix_splits_need_a_split():
    net = fresh("alexnet")
    with pytest.raises(ValueError, match="at least one split"):
        features.prefix_splits(net, "alexnet", "partial", {}, weights_id=None, cache_dir=None, preprocess=PRE,
                               batch_size=2, device="cpu")


def test_each_starting_point_has_its_own_cache_key_and_the_run_records_it(tmp_path, cifar_dir):
    weights = tmp_path / "w.pth"
    torch.save(smoke_session(tmp_path / "a", cifar_dir).build_model().state_dict(), weights)
    keys, inits = set(), []
    for init in ("imagenet", "stats", "random"):
        run = smoke_session(tmp_path / init, cifar_dir, regime="partial", pretrained=init != "random",
                            weights_path=str(weights) if init != "random" else None, init=init)
        keys.add(run.weights_id())
        run.build_model()
        inits.append(run.recorder.meta["init"])
    assert len(keys) == 3 and inits == ["imagenet", "stats", "random"]
