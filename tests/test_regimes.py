"""transferstudy.regimes: which parameters each regime trains, their groups, counts and the frozen prefix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transferstudy.models import EMBEDDING_DIMS, MODELS, build_model, embed
from transferstudy.regimes import REGIMES, apply_regime, count_params, frozen_prefix, param_groups, param_table

NUM_CLASSES = (10, 8)


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


# AlexNet: features = conv1..conv5 (conv5 is features[10]), classifier = 9216 -> 4096 -> 4096 -> C.
ALEXNET_CONVS = conv(3, 64, 11) + conv(64, 192, 5) + conv(192, 384, 3) + conv(384, 256, 3)
ALEXNET_CONV5 = conv(256, 256, 3)
ALEXNET_FC67 = linear(9216, 4096) + linear(4096, 4096)
# DeiT-Base: 16 px patches, 197 tokens of width 768, 12 blocks of MLP width 3072.
DEIT_BLOCK = 2 * 2 * 768 + linear(768, 3 * 768) + linear(768, 768) + linear(768, 3072) + linear(3072, 768)
DEIT_STEM = conv(3, 768, 16) + 768 + 197 * 768


def expected_counts(name: str, c: int) -> dict[str, int]:
    """Trainable parameters per regime (and "total"), from the layer sizes."""
    if name == "alexnet":
        total = ALEXNET_CONVS + ALEXNET_CONV5 + ALEXNET_FC67 + linear(4096, c)
        partial = ALEXNET_CONV5 + ALEXNET_FC67 + linear(4096, c)
        return {"linear_probe": linear(4096, c), "partial": partial, "full": total}
    total = DEIT_STEM + 12 * DEIT_BLOCK + 2 * 768 + linear(768, c)
    return {"linear_probe": linear(768, c), "partial": DEIT_BLOCK + 2 * 768 + linear(768, c), "full": total}


# The trainable parameters' name prefixes, as in the study.
TRAINABLE_PREFIXES = {
    ("alexnet", "linear_probe"): ("classifier.6.",),
    ("alexnet", "partial"): ("features.10.", "classifier."),
    ("deit_base", "linear_probe"): ("head.",),
    ("deit_base", "partial"): ("blocks.11.", "norm.", "head."),
}


@pytest.fixture(scope="module")
def built() -> dict[tuple[str, int], torch.nn.Module]:
    """One random-init model per (name, num_classes); DeiT creation takes ~1.3 s."""
    torch.manual_seed(0)
    return {(name, c): build_model(name, c, pretrained=False) for name in MODELS for c in NUM_CLASSES}


def images(name: str, batch: int | None = None) -> torch.Tensor:
    batch = batch or (2 if name == "alexnet" else 1)
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_study_parameter_counts() -> None:
    """The counts the original study reports (10 classes)."""
    deit = {row["regime"]: row for row in param_table("deit_base", 10)}
    assert deit["full"]["total"] == 85_806_346 and deit["full"]["trainable"] == 85_806_346
    assert deit["linear_probe"]["trainable"] == 7_690
    assert deit["partial"]["trainable"] == 7_097_098
    alexnet = {row["regime"]: row for row in param_table("alexnet", 10)}
    assert alexnet["full"]["total"] == 57_044_810
    assert expected_counts("deit_base", 10)["full"] == 85_806_346
    assert expected_counts("alexnet", 10)["full"] == 57_044_810


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_classes", NUM_CLASSES)
def test_param_table_matches_layer_sizes(name: str, num_classes: int) -> None:
    expected = expected_counts(name, num_classes)
    rows = param_table(name, num_classes)
    assert [row["regime"] for row in rows] == list(REGIMES)
    for row in rows:
        assert row == {
            "model": name,
            "regime": row["regime"],
            "trainable": expected[row["regime"]],
            "total": expected["full"],
        }


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_classes", NUM_CLASSES)
@pytest.mark.parametrize("regime", REGIMES)
def test_forward_backward_trains_only_the_regime(built, name: str, num_classes: int, regime: str) -> None:
    model = apply_regime(built[(name, num_classes)], name, regime).train()
    model.zero_grad(set_to_none=True)
    expected = expected_counts(name, num_classes)
    assert count_params(model) == (expected[regime], expected["full"])
    x = images(name, batch=2)
    logits = model(x)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, num_classes - 1])).backward()
    for param_name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), param_name
        else:
            assert p.grad is None, param_name
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("regime", REGIMES)
def test_trainable_parameters_are_the_studys(built, name: str, regime: str) -> None:
    model = built[(name, 10)]
    apply_regime(model, name, "full" if regime != "full" else "linear_probe")  # regimes must not stack
    trainable = {n for n, p in apply_regime(model, name, regime).named_parameters() if p.requires_grad}
    everything = {n for n, _ in model.named_parameters()}
    if regime == "full":
        assert trainable == everything
    else:
        assert trainable == {n for n in everything if n.startswith(TRAINABLE_PREFIXES[(name, regime)])}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("regime", REGIMES)
def test_param_groups_cover_trainable_disjointly(built, name: str, regime: str) -> None:
    model = apply_regime(built[(name, 10)], name, regime)
    groups = param_groups(model, name, regime)
    assert set(groups) == ({"head"} if regime == "linear_probe" else {"backbone", "head"})
    group_ids = [ids(params) for params in groups.values()]
    assert all(len(g) == len(params) and g for g, params in zip(group_ids, groups.values()))
    assert sum(len(g) for g in group_ids) == len(set().union(*group_ids)), "groups overlap"
    assert set().union(*group_ids) == ids(p for p in model.parameters() if p.requires_grad)
    head_names = {n for n, p in model.named_parameters() if id(p) in ids(groups["head"])}
    if name == "alexnet" and regime == "partial":
        assert head_names == {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    else:
        assert head_names == {n for n, _ in model.named_parameters() if n.startswith(("classifier.6.", "head."))}


@pytest.mark.parametrize("name", MODELS)
def test_param_groups_requires_applied_regime(built, name: str) -> None:
    model = apply_regime(built[(name, 10)], name, "full")
    with pytest.raises(ValueError, match="apply_regime"):
        param_groups(model, name, "partial")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("regime", ["linear_probe", "partial"])
def test_frozen_prefix_composes_to_the_model(built, name: str, regime: str) -> None:
    model = apply_regime(built[(name, 10)], name, regime).eval()
    prefix, rest = frozen_prefix(model, name, regime)
    x = images(name)
    with torch.no_grad():
        cached = prefix(x)
        torch.testing.assert_close(rest(cached), model(x), rtol=1e-4, atol=1e-5)
        if regime == "linear_probe":
            assert cached.shape == (x.shape[0], EMBEDDING_DIMS[(name, "penultimate" if name == "alexnet" else "cls")])
            torch.testing.assert_close(cached, embed(model, name, x))
    prefix_ids, rest_ids = ids(prefix.parameters()), ids(rest.parameters())
    assert not prefix_ids & rest_ids
    assert prefix_ids | rest_ids == ids(model.parameters())
    assert rest_ids == ids(p for p in model.parameters() if p.requires_grad)


def test_bad_names(built) -> None:
    model = built[("alexnet", 10)]
    with pytest.raises(ValueError, match=r"regime='half'.*linear_probe.*partial.*full"):
        apply_regime(model, "alexnet", "half")
    with pytest.raises(ValueError, match=r"regime='probe'"):
        param_groups(model, "alexnet", "probe")
    with pytest.raises(ValueError, match=r"name='vgg'.*alexnet.*deit_base"):
        apply_regime(model, "vgg", "full")
    with pytest.raises(ValueError, match=r"name='vgg'"):
        param_table("vgg", 10)
    with pytest.raises(ValueError, match=r"regime='full'.*no frozen prefix"):
        frozen_prefix(model, "alexnet", "full")
    with pytest.raises(ValueError, match=r"regime='head'"):
        frozen_prefix(model, "alexnet", "head")
