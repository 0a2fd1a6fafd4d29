"""transferstudy.reuse: probe points and feature collection, k-NN, minibatch CKA, weight distance, resilience,
statistics-transfer init and nested subsets (issue #12). Tiny synthetic networks; one real AlexNet (random init)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from transferstudy import reuse
from transferstudy.models import build_model


# ----------------------------------------------------------------------------- networks and helpers
class TinyAlexNet(nn.Module):
    """torchvision AlexNet's layout (features.0..12, avgpool, classifier.0..6, in-place ReLUs) with few channels."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), relu(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), relu(),
            nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), relu(), nn.Conv2d(8, 8, 3, padding=1), relu(),
            nn.Conv2d(8, 6, 3, padding=1), relu(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(24, 16), relu(), nn.Dropout(), nn.Linear(16, 16),
                                        relu(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def tiny_alexnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyAlexNet()


def tiny_vit(depth: int = 2, seed: int = 0) -> nn.Module:
    """A 2-head, 16-wide timm VisionTransformer (DeiT's layout) on 32 px images, patches of 8: 17 tokens."""
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                             embed_dim=16, num_heads=2, num_classes=3)


def finetune(model: nn.Module, scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """Add noise to every parameter (a stand-in fine-tune); returns the starting state."""
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return start


def data(n: int, size: int, seed: int = 0, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def accuracy(model: nn.Module, batches) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return right / sum(len(y) for _, y in batches)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor], skip: set[str] = frozenset()) -> None:
    current = model.state_dict()
    assert set(current) == set(state)
    for k in state:
        if k not in skip:
            assert torch.equal(current[k], state[k]), k


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run ~100x slower with 2 threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def labelled(model: nn.Module, batches, flip: int = 2):
    """``batches`` relabelled with ``model``'s own predictions, every ``flip``-th one shifted: accuracy 1 - 1/flip."""
    model.eval()
    out = []
    with torch.no_grad():
        for x, _ in batches:
            y = model(x).argmax(1)
            y[::flip] = (y[::flip] + 1) % 3
            out.append((x, y))
    return out


@pytest.fixture(scope="module")
def alexnet() -> nn.Module:
    """The one real AlexNet of this file (torchvision layout, random init)."""
    torch.manual_seed(0)
    return build_model("alexnet", 10, pretrained=False).eval()


# ----------------------------------------------------------------------------- probe points and collect
def test_probe_points_and_units_names() -> None:
    assert reuse.probe_points("alexnet") == {
        "pool1": "features.2", "pool2": "features.5", "relu3": "features.7", "relu4": "features.9",
        "pool5": "features.12", "fc6": "classifier.2", "fc7": "classifier.5"}
    deit = reuse.probe_points("deit_base")
    assert len(deit) == 26 and list(deit)[:4] == ["embed.cls", "embed.mean", "block1.cls", "block1.mean"]
    assert deit["embed.cls"] == "norm_pre" and deit["block12.mean"] == "blocks.11" and list(deit)[-1] == "block12.mean"
    assert list(reuse.units("alexnet").values()) == ["features.0", "features.3", "features.6", "features.8",
                                                      "features.10", "classifier.1", "classifier.4", "classifier.6"]
    deit_units = reuse.units("deit_base")
    assert list(deit_units)[:4] == ["patch_embed", "cls_token", "pos_embed", "block1"]
    assert deit_units["block12"] == "blocks.11" and list(deit_units)[-2:] == ["norm", "head"] and len(deit_units) == 17
    with pytest.raises(ValueError, match=r"name='resnet'"):
        reuse.probe_points("resnet")
    with pytest.raises(ValueError, match=r"depth=3.*alexnet"):
        reuse.units("alexnet", 3)
    with pytest.raises(ValueError, match=r"depth=0"):
        reuse.probe_points("deit_base", 0)


def test_paths_exist_in_the_real_architectures(alexnet: nn.Module) -> None:
    """Every probe point and unit path names a module / tensors of the real networks (DeiT-Base on the meta
    device: no memory, no weights), and the units share out every tensor, each to exactly one unit."""
    with torch.device("meta"):
        deit = build_model("deit_base", 10, pretrained=False)
    for name, model in (("alexnet", alexnet), ("deit_base", deit)):
        for path in reuse.probe_points(name).values():
            model.get_submodule(path)
        keys = list(model.state_dict())
        owned = [k for path in reuse.units(name).values() for k in reuse.unit_keys(keys, path)]
        assert sorted(owned) == sorted(keys), name
        staged = [f"{p}.{k}" if p else k for p, m in reuse.stages(model, name) for k in m.state_dict()]
        assert sorted(staged) == sorted(keys), name


def test_unit_keys_match_exact_module_paths() -> None:
    keys = ["classifier.1.weight", "classifier.1x.weight", "classifier.10.bias", "blocks.1.mlp.fc1.weight",
            "blocks.10.norm1.weight", "blocks.11.attn.qkv.bias", "fc.weight", "cls_token", "cls_token_extra"]
    assert reuse.unit_keys(keys, "classifier.1") == ["classifier.1.weight"]
    assert reuse.unit_keys(keys, "blocks.1") == ["blocks.1.mlp.fc1.weight"]
    assert reuse.unit_keys(keys, "fc") == ["fc.weight"]
    assert reuse.unit_keys(keys, "cls_token") == ["cls_token"]


def test_collect_alexnet_one_forward_per_batch(alexnet: nn.Module) -> None:
    batches = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    calls = []
    handle = alexnet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        feats = reuse.collect(alexnet, "alexnet", [(x, torch.zeros(2)) for x in batches])
    finally:
        handle.remove()
    assert len(calls) == 2
    dims = {"pool1": 64, "pool2": 192, "relu3": 384, "relu4": 256, "pool5": 256, "fc6": 4096, "fc7": 4096}
    assert {k: v.shape for k, v in feats.items()} == {k: (4, d) for k, d in dims.items()}
    assert all(v.dtype == np.float32 for v in feats.values())
    x = torch.cat(batches)
    with torch.no_grad():
        pool1 = alexnet.features[:3](x).mean((2, 3))
        relu3 = alexnet.features[:8](x).mean((2, 3))
        fc7 = alexnet.classifier[:6](torch.flatten(alexnet.avgpool(alexnet.features(x)), 1))
    for name, ref in (("pool1", pool1), ("relu3", relu3), ("fc7", fc7)):
        np.testing.assert_allclose(feats[name], ref.numpy(), rtol=1e-5, atol=1e-6)


def test_collect_deit_is_the_residual_stream() -> None:
    model = tiny_vit(depth=2).eval()
    finetune(model)  # non-zero biases and a LayerNorm away from identity
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    feats = reuse.collect(model, "deit_base", [x[:2], x[2:]])
    handle.remove()
    assert len(calls) == 2 and list(feats) == list(reuse.probe_points("deit_base", 2))
    with torch.no_grad():
        h = torch.cat([model.cls_token.expand(3, -1, -1), model.patch_embed(x)], 1) + model.pos_embed
        checks = {"embed": h}
        for i, blk in enumerate(model.blocks, 1):
            branch = blk.attn(blk.norm1(h))
            h = h + branch
            h = h + blk.mlp(blk.norm2(h))
            checks[f"block{i}"] = h
        for name, tokens in checks.items():
            np.testing.assert_allclose(feats[f"{name}.cls"], tokens[:, 0].numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(feats[f"{name}.mean"], tokens[:, 1:].mean(1).numpy(), rtol=1e-5, atol=1e-5)
        assert not np.allclose(feats["block2.cls"], branch[:, 0].numpy(), atol=1e-3), "a branch alone must differ"
    with pytest.raises(ValueError, match="batches is empty"):
        reuse.collect(model, "deit_base", [])
    with pytest.raises(ValueError, match="no module 'features.2'"):
        reuse.collect(model, "alexnet", [x])


# ----------------------------------------------------------------------------- k-NN
def brute_knn(bank: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, t: float = 0.07) -> np.ndarray:
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    preds = []
    for q in queries:
        sim = bank @ q
        nn_ = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(labels.max() + 1)
        for j in nn_:
            votes[labels[j]] += math.exp(sim[j] / t)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def test_knn_separable_tie_and_brute_force() -> None:
    rng = np.random.default_rng(0)
    centres = 10 * np.eye(4, 8)
    bank_y, query_y = np.repeat(np.arange(4), 30), np.repeat(np.arange(4), 5)
    bank = centres[bank_y] + rng.normal(size=(120, 8))
    queries = centres[query_y] + rng.normal(size=(20, 8))
    assert reuse.knn_accuracy(bank, bank_y, queries, query_y) == {20: 1.0, 200: 1.0}  # k=200 capped at 120
    # a tie of votes: two neighbours of equal similarity, classes 1 and 0 -> the smallest class wins;
    # a tie at the k-th place (k=1): the smallest bank index enters.
    tie_bank, tie_y, query = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1, 0]), np.array([[1.0, 1.0]])
    preds = reuse.knn_predict(tie_bank, tie_y, query, (1, 2))
    assert preds[2].tolist() == [0] and preds[1].tolist() == [1]
    x = rng.normal(size=(150, 6))
    y = rng.integers(0, 5, 150)
    q = rng.normal(size=(37, 6))
    got = reuse.knn_predict(x, y, q, (1, 5, 20, 200), batch_size=7)
    for k in (1, 5, 20, 200):
        np.testing.assert_array_equal(got[k], brute_knn(x, y, q, min(k, 150)))


def test_knn_errors() -> None:
    x, y = np.ones((5, 3)), np.zeros(5, dtype=int)
    with pytest.raises(ValueError, match="bank has 3 features.*queries 4"):
        reuse.knn_predict(x, y, np.ones((2, 4)))
    with pytest.raises(ValueError, match="queries must be a non-empty"):
        reuse.knn_predict(x, y, np.ones((0, 3)))
    with pytest.raises(ValueError, match="NaN"):
        reuse.knn_predict(x, y, np.full((1, 3), np.nan))
    with pytest.raises(ValueError, match="ks="):
        reuse.knn_predict(x, y, x, (0,))
    with pytest.raises(ValueError, match="bank_labels must be 5"):
        reuse.knn_accuracy(x, y[:4], x, y)


# ----------------------------------------------------------------------------- CKA
def hsic_u_statistic(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. 2012's HSIC_1 as the U-statistic itself: the mean over ordered distinct (i, j, q, r)."""
    k, l_ = x @ x.T, y @ y.T
    terms = [k[i, j] * l_[i, j] + k[i, j] * l_[q, r] - 2 * k[i, j] * l_[i, q]
             for i, j, q, r in itertools.permutations(range(len(x)), 4)]
    return float(np.mean(terms))


def hsic_features(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC_1 for linear kernels from the features, without Gram matrices (an independent implementation)."""
    n = len(x)
    nx, ny = (x * x).sum(1), (y * y).sum(1)
    trace = ((x.T @ y) ** 2).sum() - (nx * ny).sum()
    rx, ry = x @ x.sum(0) - nx, y @ y.sum(0) - ny
    return (trace + rx.sum() * ry.sum() / ((n - 1) * (n - 2)) - 2 * (rx @ ry) / (n - 2)) / (n * (n - 3))


def full_cka(x: np.ndarray, y: np.ndarray) -> float:
    return hsic_features(x, y) / math.sqrt(hsic_features(x, x) * hsic_features(y, y))


def test_one_batch_is_the_full_batch_unbiased_estimator() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 3))
    y = x @ rng.normal(size=(3, 2)) + rng.normal(size=(7, 2))
    assert hsic_features(x, y) == pytest.approx(hsic_u_statistic(x, y), rel=1e-9)
    acc = reuse.MinibatchCKA()
    acc.update(x, y)
    expected = hsic_u_statistic(x, y) / math.sqrt(hsic_u_statistic(x, x) * hsic_u_statistic(y, y))
    assert acc.value() == pytest.approx(expected, rel=1e-9) and acc.batches == 1
    x, y = rng.normal(size=(300, 20)), rng.normal(size=(300, 5))
    y += x[:, :5]
    assert reuse.cka(x, y, batch_size=300) == pytest.approx(full_cka(x, y), rel=1e-9)


def test_cka_identity_invariances_and_independence() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 12))
    y = np.tanh(x @ rng.normal(size=(12, 6))) + rng.normal(size=(200, 6))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert reuse.cka(x, x, batch_size=50) == pytest.approx(1.0, abs=1e-12)
    base = reuse.cka(x, y, batch_size=50)
    assert 0.1 < base < 0.9
    assert reuse.cka(x @ q, y, batch_size=50) == pytest.approx(base, abs=1e-10)
    assert reuse.cka(3.7 * x, y, batch_size=50) == pytest.approx(base, abs=1e-10)
    assert reuse.cka(x + 5.0, y, batch_size=50) == pytest.approx(base, abs=1e-10)  # unbiased HSIC: no centring needed
    # independent features, n = 4000 in batches of 256: |CKA| < 0.01 (20 seeds gave at most 0.003)
    a, b = rng.normal(size=(4000, 16)), rng.normal(size=(4000, 16))
    assert abs(reuse.cka(a, b)) < 0.01


def test_minibatch_sums_hsic_and_is_not_an_average_of_batch_cka() -> None:
    rng = np.random.default_rng(3)
    x1 = 10 * rng.normal(size=(40, 5))              # batch 1: y = x, large scale, CKA 1
    x2, y2 = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))  # batch 2: independent, unit scale, CKA ~ 0
    acc = reuse.MinibatchCKA()
    acc.update(x1, x1)
    acc.update(x2, y2)
    h = hsic_features
    summed = (h(x1, x1) + h(x2, y2)) / math.sqrt((h(x1, x1) + h(x2, x2)) * (h(x1, x1) + h(y2, y2)))
    averaged = (1.0 + full_cka(x2, y2)) / 2
    assert acc.value() == pytest.approx(summed, rel=1e-9) and acc.batches == 2
    assert abs(acc.value() - averaged) > 0.3, "an average of per-batch CKA values would fail here"


def test_minibatch_cka_converges_to_the_full_batch_value() -> None:
    gaps = {}
    for n in (256, 4096):
        diffs = []
        for seed in range(5):
            rng = np.random.default_rng(seed)
            x = rng.normal(size=(n, 10))
            y = np.tanh(x @ rng.normal(size=(10, 8))) + rng.normal(size=(n, 8))
            diffs.append(abs(reuse.cka(x, y, batch_size=32) - full_cka(x, y)))
        gaps[n] = float(np.mean(diffs))
    assert gaps[4096] < 0.005 and gaps[4096] < gaps[256] / 2, gaps


def test_cka_matrix_and_bootstrap() -> None:
    rng = np.random.default_rng(4)
    a = [rng.normal(size=(120, 6))]
    a += [np.maximum(a[-1] @ rng.normal(size=(6, 6)), 0) + 0.3 * rng.normal(size=(120, 6)) for _ in range(2)]
    b = {"p": a[0] @ rng.normal(size=(6, 4)), "q": rng.normal(size=(120, 3))}
    self_m = reuse.cka_matrix(a, batch_size=40)
    assert self_m.shape == (3, 3) and np.allclose(np.diag(self_m), 1.0) and np.allclose(self_m, self_m.T)
    cross = reuse.cka_matrix(a, b, batch_size=40)
    assert cross.shape == (3, 2)
    assert cross[1, 0] == pytest.approx(reuse.cka(a[1], b["p"], batch_size=40), rel=1e-12)
    value, low, high = reuse.cka_bootstrap(a[1], b["p"], batch_size=40, n_boot=60)
    assert value == reuse.cka(a[1], b["p"], batch_size=40) and low < value < high and high - low < 0.5
    assert reuse.cka_bootstrap(a[1], b["p"], batch_size=40, n_boot=60) == (value, low, high)
    with pytest.raises(ValueError, match="n >= 4"):
        reuse.cka(a[0][:3], a[0][:3])
    # a representation no image changes (DeiT's CLS token before block 1) has no CKA: refused, or NaN on request
    constant = np.tile(rng.normal(size=(1, 5)), (120, 1))
    with pytest.raises(ValueError, match=r"xs layer\(s\) \[1\] have summed HSIC <= 0"):
        reuse.cka_matrix([a[0], constant])
    with_nan = reuse.cka_matrix([a[0], constant], undefined="nan")
    assert with_nan[0, 0] == pytest.approx(1.0) and np.isnan(with_nan[1]).all() and np.isnan(with_nan[:, 1]).all()
    assert all(np.isnan(v) for v in reuse.cka_bootstrap(constant, a[0], n_boot=5))
    with pytest.raises(ValueError, match="features_a has 120 images, features_b 100"):
        reuse.cka_matrix(a, [b["p"][:100]])
    with pytest.raises(ValueError, match="batch_size=2"):
        reuse.cka(a[0], a[1], batch_size=2)
    with pytest.raises(ValueError, match="no variance"):
        reuse.cka(np.ones((20, 3)), a[0][:20])
    with pytest.raises(ValueError, match="no batches"):
        reuse.MinibatchCKA().value()


# ----------------------------------------------------------------------------- weight distance
def test_weight_distance_per_tensor_per_unit(alexnet: nn.Module) -> None:
    real = alexnet.state_dict()
    assert reuse.weight_distance(real, real, "alexnet") == dict.fromkeys(reuse.units("alexnet"), 0.0)
    start = tiny_alexnet().state_dict()
    moved = {k: v.clone() for k, v in start.items()}
    moved["features.3.weight"] *= 1.1          # conv2: 0.1 + 0.3 = 0.4
    moved["features.3.bias"] *= 1.3
    got = reuse.weight_distance(start, moved, "alexnet")
    assert got["conv2"] == pytest.approx(0.4) and all(v == 0 for u, v in got.items() if u != "conv2")
    moved["classifier.6.weight"] *= 1.02       # head: 0.02, a different value from conv2's
    got = reuse.weight_distance(start, moved, "alexnet")
    assert got["head"] == pytest.approx(0.02) and got["conv2"] == pytest.approx(0.4)
    assert len({round(v, 6) for v in got.values()}) == 3, "one whole-model number per unit would fail here"
    vit = tiny_vit(depth=12)
    start = finetune(vit, seed=5)  # a start without zero tensors
    moved = {k: v.clone() for k, v in start.items()}
    moved["blocks.1.mlp.fc1.weight"] *= 1.5
    got = reuse.weight_distance(start, moved, "deit_base")
    assert got["block2"] == pytest.approx(0.5) and sum(got.values()) == pytest.approx(0.5)


def test_weight_distance_errors() -> None:
    vit = tiny_vit()
    start = snapshot(vit)  # timm initialises biases to zero
    finetune(vit)
    with pytest.raises(ValueError, match=r"\|\|w_0\|\| = 0.*skip_zero_norm=True"):
        reuse.weight_distance(start, vit, "deit_base")
    assert reuse.weight_distance(start, vit, "deit_base", skip_zero_norm=True)["block1"] > 0
    with pytest.raises(ValueError, match="differ in keys or shapes"):
        reuse.weight_distance(start, {k: v for k, v in start.items() if k != "norm.bias"}, "deit_base")
    with pytest.raises(ValueError, match="belong to no unit|have no tensors"):
        reuse.weight_distance(start, start, "alexnet")


# ----------------------------------------------------------------------------- resilience
def test_resilience_alexnet_layout_counts_module_calls() -> None:
    model = tiny_alexnet(seed=0)
    start = tiny_alexnet(seed=7).state_dict()  # a different start, so restoring changes predictions
    finetune(model, scale=0.5)  # weights large enough that predictions vary from image to image
    batches = labelled(model, data(12, 16, batch=4), flip=4)
    before = snapshot(model)
    paths = reuse.units("alexnet")
    calls = dict.fromkeys(paths, 0)
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda *_, u=u: calls.__setitem__(u, calls[u] + 1)) for u, p in paths.items()]
    result = reuse.resilience(model, "alexnet", start, batches, seed=3)
    for h in handles:
        h.remove()
    # unit j's module runs once per batch for the baseline and twice per batch for every unit up to j:
    # the prefix before a perturbed unit is never run again (it would be 1 + 2 x 8 per batch for conv1).
    assert calls == {u: 3 * (1 + 2 * j) for j, u in enumerate(paths, 1)}
    assert result.images == 12 and result.baseline == accuracy(model, batches)
    assert_state_equal(model, before)
    for unit in paths:
        assert result.restore[unit] == accuracy(reuse.perturbed(model, "alexnet", unit, "restore",
                                                                initial_state=start), batches)
        assert result.redraw[unit] == accuracy(reuse.perturbed(model, "alexnet", unit, "redraw", seed=3), batches)
    assert_state_equal(model, before)
    assert result.baseline == 0.75
    assert len(set(result.restore.values()) | set(result.redraw.values())) > 2, "the perturbations must matter"


def test_resilience_real_alexnet_and_tiny_deit(alexnet: nn.Module) -> None:
    batches = data(4, 64, batch=2)
    start = snapshot(alexnet)
    start["classifier.6.weight"] = torch.zeros_like(start["classifier.6.weight"])
    got = reuse.resilience(alexnet, "alexnet", start, batches, unit_names=["conv1", "head"], modes=("restore",))
    assert got.baseline == accuracy(alexnet, batches) and got.redraw == {} and set(got.restore) == {"conv1", "head"}
    vit = tiny_vit(depth=12)
    start = finetune(vit, scale=0.5)
    batches = labelled(vit, data(16, 32, batch=8))
    got = reuse.resilience(vit, "deit_base", start, batches, unit_names=["cls_token", "pos_embed", "block2", "head"])
    assert got.baseline == accuracy(vit, batches)
    assert got.baseline == 0.5
    for unit, score in got.restore.items():
        assert score == accuracy(reuse.perturbed(vit, "deit_base", unit, "restore", initial_state=start), batches)
    for unit, score in got.redraw.items():
        assert score == accuracy(reuse.perturbed(vit, "deit_base", unit, "redraw"), batches)
    assert len(set(got.restore.values()) | set(got.redraw.values())) > 1
    with pytest.raises(ValueError, match="unit='fc'.*choose one of"):
        reuse.resilience(vit, "deit_base", start, batches, unit_names=["fc"])
    with pytest.raises(ValueError, match="modes="):
        reuse.resilience(vit, "deit_base", start, batches, modes=("shuffle",))
    with pytest.raises(ValueError, match="batches is empty"):
        reuse.resilience(vit, "deit_base", start, [])


def test_restore_and_redraw_touch_exactly_their_unit() -> None:
    vit = tiny_vit(depth=12)
    start = finetune(vit)
    before = snapshot(vit)
    restored = reuse.perturbed(vit, "deit_base", "block2", "restore", initial_state=start)
    block2 = set(reuse.unit_keys(before, "blocks.1"))
    assert block2 and not any(k.startswith(("blocks.10.", "blocks.11.")) for k in block2)
    assert_state_equal(restored, before, skip=block2)
    for k in block2:
        assert torch.equal(restored.state_dict()[k], start[k])
    assert_state_equal(vit, before)
    model = tiny_alexnet()
    before = snapshot(model)
    drawn = reuse.perturbed(model, "alexnet", "fc6", "redraw", seed=1)
    assert_state_equal(drawn, before, skip={"classifier.1.weight", "classifier.1.bias"})
    for key in ("classifier.1.weight", "classifier.1.bias"):
        new, old = drawn.state_dict()[key], before[key]
        assert new.shape == old.shape and not torch.equal(new, old)
        tol = 6 * old.std(unbiased=False) / math.sqrt(old.numel())
        assert abs(new.mean() - old.mean()) < tol and abs(new.std(unbiased=False) - old.std(unbiased=False)) < tol
    again = reuse.perturbed(model, "alexnet", "fc6", "redraw", seed=1).state_dict()["classifier.1.weight"]
    other = reuse.perturbed(model, "alexnet", "fc6", "redraw", seed=2).state_dict()["classifier.1.weight"]
    assert torch.equal(again, drawn.state_dict()["classifier.1.weight"]) and not torch.equal(again, other)
    assert_state_equal(model, before)
    with pytest.raises(ValueError, match="needs initial_state"):
        reuse.perturbed(model, "alexnet", "fc6", "restore")


# ----------------------------------------------------------------------------- statistics transfer, subsets
@pytest.mark.parametrize("kind", ["alexnet", "deit"])
def test_stats_init(kind: str) -> None:
    make, name = (tiny_alexnet, "alexnet") if kind == "alexnet" else (lambda seed: tiny_vit(2, seed), "deit_base")
    source_model = make(seed=0)
    finetune(source_model, scale=0.3)
    source = snapshot(source_model)
    model = make(seed=1)
    finetune(model, scale=0.3, seed=9)  # norms away from their defaults, so resetting them shows
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    reuse.stats_init(model, source, seed=0)
    drawn = model.state_dict()
    assert {k: v.shape for k, v in drawn.items()} == shapes
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert (kind == "deit") == bool(norms)
    for n in norms:
        assert torch.equal(drawn[f"{n}.weight"], torch.ones_like(drawn[f"{n}.weight"]))
        assert torch.equal(drawn[f"{n}.bias"], torch.zeros_like(drawn[f"{n}.bias"]))
    checked = [k for k in drawn if not any(k.startswith(n + ".") for n in norms)]
    assert kind == "alexnet" or {"cls_token", "pos_embed"} <= set(checked)
    for k in checked:
        src, new = source[k].double(), drawn[k].double()
        sd = float(src.std(unbiased=False))
        tol = 6 * sd / math.sqrt(new.numel()) + 1e-12
        assert abs(float(new.mean()) - float(src.mean())) < tol, k
        assert abs(float(new.std(unbiased=False)) - sd) < tol, k
    again = reuse.stats_init(make(seed=2), source, seed=0).state_dict()
    other = reuse.stats_init(make(seed=2), source, seed=1).state_dict()
    assert all(torch.equal(again[k], drawn[k]) for k in drawn)
    assert not all(torch.equal(other[k], drawn[k]) for k in checked)
    with pytest.raises(ValueError, match="source_state has no"):
        reuse.stats_init(make(seed=2), {"x": torch.ones(2)}, seed=0)


def test_nested_subsets() -> None:
    labels = np.repeat(np.arange(5), [3, 40, 97, 200, 660])
    np.random.default_rng(0).shuffle(labels)
    subsets = reuse.nested_subsets(labels, seed=7)
    fractions = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
    assert tuple(subsets) == fractions
    np.testing.assert_array_equal(subsets[1.0], np.arange(len(labels)))
    for small, big in zip(fractions, fractions[1:]):
        assert set(subsets[small]) <= set(subsets[big])
    for f, idx in subsets.items():
        assert np.all(np.diff(idx) > 0)
        for c, n_c in enumerate(np.bincount(labels)):
            count = int((labels[idx] == c).sum())
            assert count >= 1 and abs(count - max(1, round(f * n_c))) <= 1, (f, c, count)
    again, other = reuse.nested_subsets(labels, seed=7), reuse.nested_subsets(labels, seed=8)
    assert all(np.array_equal(again[f], subsets[f]) for f in fractions)
    assert not np.array_equal(other[0.25], subsets[0.25])
    with pytest.raises(ValueError, match=r"fractions=\(0.0, 0.5\)"):
        reuse.nested_subsets(labels, (0.0, 0.5), seed=0)
    with pytest.raises(ValueError, match="labels must be a non-empty"):
        reuse.nested_subsets(np.array([]), seed=0)
