"""transferstudy.models.BACKBONES: every backbone record's facts hold for the network it builds (timm-style: the
tests iterate over the records), the library's per-model tables are views of the records, and a third record
works through building, heads, embeddings, regimes and the feature-reuse tables without a code change."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferstudy import bench, config, features, figures, models, regimes, reuse
from transferstudy.models import BACKBONES, Backbone, Embedding, WeightSource, build_model, embed, extractor, head
from transferstudy.report import store as report_store

RECORDS = pytest.mark.parametrize("record", list(BACKBONES.values()), ids=list(BACKBONES))


def meta_model(record: Backbone, num_classes: int = 10) -> nn.Module:
    """The record's network on the meta device: shapes without memory or compute (DeiT-Base in ~0.3 s)."""
    with torch.device("meta"):
        return build_model(record.name, num_classes, pretrained=False)


def image_size(record: Backbone) -> int:
    return record.image_sizes[0] if record.image_sizes else 224


@pytest.fixture(scope="module")
def real() -> dict[str, nn.Module]:
    """Random-init 10-class networks, built on first use (DeiT-Base ~1.3 s)."""
    built: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in built:
            torch.manual_seed(0)
            built[name] = build_model(name, 10, pretrained=False)
        return built[name]

    return get


def state_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


# --- the records' facts, on the networks they build ---------------------------------------------------


@RECORDS
@pytest.mark.parametrize("num_classes", [10, 7])
def test_head_path_is_a_linear_with_num_classes_outputs(record: Backbone, num_classes: int) -> None:
    model = meta_model(record, num_classes)
    layer = model.get_submodule(record.head)
    assert isinstance(layer, nn.Linear) and layer.out_features == num_classes
    assert head(model, record.name) is layer
    assert model.state_dict()[record.head_key].shape == (num_classes, layer.in_features)
    assert layer.in_features == record.embeddings[record.default_embedding].dim == list(record.dims.values())[-1]


@RECORDS
def test_every_embedding_kind_has_its_recorded_size(record: Backbone) -> None:
    model = meta_model(record).eval()
    size = image_size(record)
    x = torch.empty(2, 3, size, size, device="meta")
    for kind, emb in record.embeddings.items():
        assert extractor(model, record.name, kind)(x).shape == (2, emb.dim), kind
        if emb.derived_from is not None:  # the tail computes it from the kind it derives from
            source = extractor(model, record.name, emb.derived_from)(x)
            assert emb.tail(model)(source).shape == (2, emb.dim), kind
    assert embed(model, record.name, x).shape == (2, record.dims[record.default_embedding])


@RECORDS
def test_paths_name_modules_of_the_network(record: Backbone) -> None:
    model = meta_model(record)
    for path in (*record.probe_points().values(), record.largest_layer, record.partial_head):
        model.get_submodule(path)
    models.module_at(model, record.partial_split)
    keys = list(model.state_dict())
    owned = [k for path in record.unit_paths().values() for k in reuse.unit_keys(keys, path)]
    assert sorted(owned) == sorted(keys), "every tensor belongs to exactly one unit"
    staged = [f"{p}.{k}" if p else k for p, m in record.stages(model) for k in m.state_dict()]
    assert sorted(staged) == sorted(keys), "the stages hold every tensor once"
    assert record.depth_of(model) == record.keys_depth(keys) == record.depth
    assert reuse.probe_points(record.name) == record.probe_points() and reuse.units(record.name) == record.unit_paths()


def forward_order(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The modules of ``model`` in the order the forward pass enters them."""
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, args: order.append(m)) for m in model.modules()]
    model(x)
    for handle in handles:
        handle.remove()
    return order


@RECORDS
def test_partial_trains_exactly_what_the_forward_runs_from_the_split_point_on(record: Backbone) -> None:
    """Counted from the forward pass itself, not from the record's stages: a parameter trains in the partial
    regime iff the module holding it first runs at or after the split module."""
    model = meta_model(record).eval()
    size = image_size(record)
    order = forward_order(model, torch.empty(1, 3, size, size, device="meta"))
    split = order.index(models.module_at(model, record.partial_split))
    after = {id(m) for m in order[split:]} - {id(m) for m in order[:split]}
    expected = {f"{path}.{n}" if path else n for path, m in model.named_modules() if id(m) in after
                for n, _ in m.named_parameters(recurse=False)}
    regimes.apply_regime(model, record.name, "partial")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    groups = regimes.param_groups(model, record.name, "partial")
    names = state_names(model)
    head_prefix = record.partial_head + "."
    assert {names[id(p)] for p in groups["head"]} == {n for n in expected if n.startswith(head_prefix)}
    assert {names[id(p)] for p in groups["backbone"]} == {n for n in expected if not n.startswith(head_prefix)}


@RECORDS
@pytest.mark.parametrize("regime", regimes.REGIMES)
def test_a_step_has_no_nan_and_grads_reach_exactly_the_trainable_parameters(real, record: Backbone,
                                                                             regime: str) -> None:
    model = regimes.apply_regime(real(record.name), record.name, regime).train()
    model.zero_grad(set_to_none=True)
    size = image_size(record)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 9])).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    model.zero_grad(set_to_none=True)


# --- the per-model tables elsewhere are the records' ------------------------------------------------


def test_the_librarys_tables_are_views_of_the_records() -> None:
    assert models.MODELS == tuple(BACKBONES) == config.MODELS  # config keeps its own tuple: it imports no torch
    assert models.EMBEDDINGS == {n: tuple(b.embeddings) for n, b in BACKBONES.items()}
    assert dict(config.SCHEMA["embedding"].per_model) == models.EMBEDDINGS
    assert set(config.SCHEMA["embedding"].choices) == {k for b in BACKBONES.values() for k in b.embeddings}
    assert dict(config.SCHEMA["image_size"].per_model) == {n: b.image_sizes for n, b in BACKBONES.items()
                                                            if b.image_sizes is not None}
    assert models.EMBEDDING_DIMS == {(n, k): d for n, b in BACKBONES.items() for k, d in b.dims.items()}
    assert models.DEFAULT_EMBEDDING == {n: b.default_embedding for n, b in BACKBONES.items()}
    assert figures.MODEL_COLOURS == {n: b.colour for n, b in BACKBONES.items()}  # figures imports no torch either
    assert report_store.MODEL_LABELS == {n: b.label for n, b in BACKBONES.items()}  # nor does the results store
    assert bench.LARGEST_LAYER == {n: b.largest_layer for n, b in BACKBONES.items()}
    assert all(models.channels_last(n) == b.channels_last for n, b in BACKBONES.items())
    assert all(name == b.name for name, b in BACKBONES.items())


# --- a third backbone is one record ------------------------------------------------------------------


class TinyNet(nn.Module):
    """A small CNN in no way named like the study's backbones: stem, body, pooling, a neck (as AlexNet's fc6 and
    fc7), a head called fc."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.neck = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.neck(self.pool(self.body(self.stem(x)))))


def _tiny_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [("stem", model.stem), *((f"body.{i}", m) for i, m in enumerate(model.body)), ("pool", model.pool),
            ("neck", model.neck), ("fc", model.fc)]


def _tiny_pooled(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.stem, model.body, model.pool)


def _tiny_neck(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.stem, model.body, model.pool, model.neck)


TINY = Backbone(
    name="tiny", label="TinyNet",
    architecture=TinyNet,
    weights=WeightSource("https://example.invalid/tinynet-0123abcd.pth"),
    imagenet=models.torch_hub_imagenet,
    head="fc",
    embeddings={"pooled": Embedding(8, _tiny_pooled),
                "neck": Embedding(8, _tiny_neck, derived_from="pooled", tail=lambda m: m.neck)},
    default_embedding="neck",
    stages=_tiny_stages,
    partial_split="body.-2",  # the last conv on: conv3, neck, fc
    partial_head="fc",
    probes={"stem": "stem", "conv2": "body.1", "conv3": "body.3", "neck": "neck"},
    units={"stem": "stem", "conv2": "body.0", "conv3": "body.2", "neck": "neck", "fc": "fc"},
    largest_layer="body.2", min_forward_peak_fraction=0.5,
    image_sizes=(16, 32), colour="#123456",
)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> Backbone:
    monkeypatch.setitem(BACKBONES, TINY.name, TINY)
    return TINY


def test_a_third_record_works_through_the_library(tiny: Backbone, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 3, pretrained=False)
    assert isinstance(model, TinyNet) and head(model, "tiny") is model.fc and model.fc.out_features == 3
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert embed(model, "tiny", x).shape == (4, 8)
        torch.testing.assert_close(embed(model, "tiny", x), model.neck(embed(model, "tiny", x, "pooled")))
    with pytest.raises(ValueError, match=r"kind='cls'.*pooled.*neck"):
        extractor(model, "tiny", "cls")
    assert not models.channels_last("tiny")

    # a 1000-class (ImageNet-shaped) state dict from a file gets a fresh 3-way head
    imagenet = TinyNet(models.IMAGENET_CLASSES)
    torch.save(imagenet.state_dict(), tmp_path / "tiny.pth")
    loaded = build_model("tiny", 3, weights_path=tmp_path / "tiny.pth")
    assert loaded.fc.out_features == 3 and torch.equal(loaded.stem[0].weight, imagenet.stem[0].weight)

    expected = {"linear_probe": {"fc.weight", "fc.bias"}, "full": {n for n, _ in model.named_parameters()},
                "partial": {"body.2.weight", "body.2.bias", "neck.0.weight", "neck.0.bias", "fc.weight", "fc.bias"}}
    for regime in regimes.REGIMES:
        net = regimes.apply_regime(model, "tiny", regime)
        assert {n for n, p in net.named_parameters() if p.requires_grad} == expected[regime], regime
        groups = regimes.param_groups(net, "tiny", regime)
        assert {state_names(net)[id(p)] for p in groups["head"]} == {"fc.weight", "fc.bias"}
        if regime == "full":
            continue
        prefix, rest = regimes.frozen_prefix(net.eval(), "tiny", regime)
        with torch.no_grad():
            torch.testing.assert_close(rest(prefix(x)), net(x))
        assert {id(p) for p in rest.parameters()} == {id(p) for p in net.parameters() if p.requires_grad}
    assert [row["trainable"] for row in regimes.param_table("tiny", 3)] == [27, 683, 1099]

    assert list(reuse.probe_points("tiny")) == ["stem", "conv2", "conv3", "neck"]
    collected = reuse.collect(model, "tiny", [x])
    assert {k: v.shape for k, v in collected.items()} == {"stem": (4, 4), "conv2": (4, 8), "conv3": (4, 8),
                                                          "neck": (4, 8)}
    assert set(reuse.weight_distance(model, model, "tiny")) == set(tiny.units)
    scored = reuse.resilience(model, "tiny", model.state_dict(), [(x, torch.zeros(4, dtype=torch.long))],
                              modes=("restore",))
    assert set(scored.restore) == set(tiny.units) and set(scored.restore.values()) == {scored.baseline}


def offline(*args, **kwargs) -> None:
    raise OSError("network disabled by the test")


def test_a_third_record_without_weights_says_what_to_place(tiny: Backbone, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(models.WeightsUnavailable, match=r"TinyNet ImageNet weights.*tinynet-0123abcd\.pth"):
        build_model("tiny", 3)


def to_float(images: torch.Tensor, train: bool) -> torch.Tensor:
    return images.float() / 255


def test_a_derived_embedding_costs_no_second_backbone_pass(tiny: Backbone, tmp_path) -> None:
    """A kind with ``derived_from`` is computed from that kind's cached features (as AlexNet's penultimate)."""
    assert tiny.stored_kind("neck") == "pooled" == tiny.stored_kind("pooled")
    model = build_model("tiny", 3, pretrained=False)
    passes = []
    model.stem.register_forward_hook(lambda m, i, o: passes.append(len(i[0])))
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = SimpleNamespace(images=images, labels=torch.zeros(5, dtype=torch.long), files=[f"{i}.png" for i in range(5)])
    common = dict(weights_id="w", cache_dir=tmp_path, preprocess=to_float, batch_size=2, device="cpu",
                  log=lambda line: None)
    neck = features.embeddings(model, "tiny", "neck", {"test": split}, **common)["test"]
    assert neck.shape == (5, 8) and passes == [2, 2, 1]  # one pass, for the cached pooled features
    with torch.no_grad():
        direct = embed(model, "tiny", to_float(images, False)).numpy()
    assert abs(neck - direct).max() < 1e-2  # through the float16 cache


def test_a_record_is_checked_when_it_is_made() -> None:
    fields = {f: getattr(TINY, f) for f in TINY.__dataclass_fields__}
    with pytest.raises(ValueError, match="default_embedding='cls'"):
        Backbone(**{**fields, "default_embedding": "cls"})
    with pytest.raises(ValueError, match="derived_from"):
        Backbone(**{**fields, "embeddings": {"neck": Embedding(8, _tiny_neck, derived_from="nothing")}})
    with pytest.raises(ValueError, match="blocks and depth together"):
        Backbone(**{**fields, "depth": 3})
    with pytest.raises(ValueError, match=r"name='tiny'.*alexnet.*deit_base"):
        build_model("tiny", 3, pretrained=False)  # registered only inside the fixture
