"""transferstudy.models: building (random init, weights files, hub caches), embeddings, device and AMP."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from transferstudy.models import (
    EMBEDDING_DIMS,
    EMBEDDINGS,
    MODELS,
    WeightsUnavailable,
    autocast,
    build_model,
    embed,
    extractor,
    head,
    select_device,
)

HEAD_PREFIX = {"alexnet": "classifier.6.", "deit_base": "head."}
HEAD_IN = {"alexnet": 4096, "deit_base": 768}


@pytest.fixture(scope="module")
def built() -> dict[str, torch.nn.Module]:
    """One random-init 10-class model per name (DeiT creation takes ~1.3 s)."""
    torch.manual_seed(0)
    return {name: build_model(name, 10, pretrained=False) for name in MODELS}


def images(name: str, seed: int = 0) -> torch.Tensor:
    """A small batch of 224 px images: 2 for AlexNet, 1 for DeiT (slow on CPU)."""
    return torch.randn(2 if name == "alexnet" else 1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def imagenet_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """`model`'s state dict with a random 1000-class head, i.e. shaped like the ImageNet checkpoint."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[HEAD_PREFIX[name] + "weight"] = torch.randn(1000, HEAD_IN[name])
    state[HEAD_PREFIX[name] + "bias"] = torch.randn(1000)
    return state


def assert_backbone_equal(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    loaded = model.state_dict()
    backbone = [k for k in state if not k.startswith(HEAD_PREFIX[name])]
    assert set(loaded) == set(state)
    for key in backbone:
        assert torch.equal(loaded[key], state[key]), key


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_classes", [10, 8])
def test_random_init_has_fresh_head(name: str, num_classes: int) -> None:
    with torch.device("meta"):
        model = build_model(name, num_classes, pretrained=False)
    layer = head(model, name)
    assert isinstance(layer, torch.nn.Linear)
    assert (layer.in_features, layer.out_features) == (HEAD_IN[name], num_classes)


@pytest.mark.parametrize(("name", "kind"), list(EMBEDDING_DIMS))
def test_embedding_shape_and_head_consistency(built, name: str, kind: str) -> None:
    model = built[name].train()
    x = images(name)
    with torch.no_grad():
        features = embed(model, name, x, kind)
        assert model.training, "embed must restore the model's training mode"
        again = embed(model, name, x, kind)
        logits = model.eval()(x)
    assert features.shape == (x.shape[0], EMBEDDING_DIMS[(name, kind)])
    assert torch.isfinite(features).all()
    assert torch.equal(features, again), "embed must run with dropout off"
    with torch.no_grad():
        rebuilt = model.classifier(features) if kind == "pooled" else head(model, name)(features)
    torch.testing.assert_close(rebuilt, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_embed_default_kind(built, name: str) -> None:
    model, x = built[name].eval(), images(name, seed=1)
    default = {"alexnet": "penultimate", "deit_base": "cls"}[name]
    with torch.no_grad():
        assert torch.equal(embed(model, name, x), embed(model, name, x, default))


# parameters an extractor holds: AlexNet's conv trunk (+ fc6, fc7 for "penultimate"); DeiT all of it (the 7,690-
# parameter head rides along)
EXTRACTOR_PARAMS = {("alexnet", "pooled"): 2_469_696, ("alexnet", "penultimate"): 57_003_840,
                    ("deit_base", "cls"): 85_806_346}


@pytest.mark.parametrize(("name", "kind"), list(EMBEDDING_DIMS))
def test_extractor_holds_only_the_layers_its_features_need(built, name: str, kind: str) -> None:
    model, x = built[name].eval(), images(name, seed=2)
    module = extractor(model, name, kind)
    assert sum(p.numel() for p in module.parameters()) == EXTRACTOR_PARAMS[(name, kind)]
    assert {id(p) for p in module.parameters()} <= {id(p) for p in model.parameters()}, "shared, not copied"
    with torch.no_grad():
        assert torch.equal(module(x), embed(model, name, x, kind))


def test_bad_names(built) -> None:
    with pytest.raises(ValueError, match=r"name='resnet'.*alexnet.*deit_base"):
        build_model("resnet", 10, pretrained=False)
    with pytest.raises(ValueError, match=r"name='vit'"):
        head(built["alexnet"], "vit")
    with pytest.raises(ValueError, match=r"kind='cls'.*pooled.*penultimate"):
        embed(built["alexnet"], "alexnet", images("alexnet"), "cls")
    with pytest.raises(ValueError, match=r"kind='pooled'.*cls"):
        embed(built["deit_base"], "deit_base", images("deit_base"), "pooled")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            build_model("alexnet", bad, pretrained=False)
    with pytest.raises(ValueError, match=r"preference='tpu'.*auto.*cpu.*cuda"):
        select_device("tpu")


def test_select_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected
    assert select_device("auto").type == expected
    assert select_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert select_device("cuda").type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            select_device("cuda")


def test_autocast_is_fp32_on_cpu() -> None:
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ a).dtype == torch.float32
    with autocast("cpu"):
        assert (a @ a).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_is_fp16_on_cuda() -> None:
    a = torch.randn(4, 4, device="cuda")
    with autocast(torch.device("cuda")):
        assert (a @ a).dtype == torch.float16
    assert (a @ a).dtype == torch.float32


# DeiT's plain .pth is covered by the fine-tuned test; its official file is the {"model": ...} wrapping.
@pytest.mark.parametrize(
    ("name", "fmt"),
    [(n, f) for n in MODELS for f in ("pth", "wrapped", "safetensors") if (n, f) != ("deit_base", "pth")],
)
def test_weights_path_imagenet_checkpoint(built, tmp_path: Path, name: str, fmt: str) -> None:
    state = imagenet_state(built[name], name)
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state} if fmt == "wrapped" else state, path)
    model = build_model(name, 8, weights_path=path)
    assert (head(model, name).in_features, head(model, name).out_features) == (HEAD_IN[name], 8)
    assert_backbone_equal(model, state, name)


@pytest.mark.parametrize("name", MODELS)
def test_weights_path_finetuned_checkpoint_loads_as_is(built, tmp_path: Path, name: str) -> None:
    state = built[name].state_dict()
    torch.save(state, tmp_path / "finetuned.pth")
    loaded = build_model(name, 10, weights_path=str(tmp_path / "finetuned.pth")).state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("name", MODELS)
def test_weights_path_key_mismatch_names_keys(built, tmp_path: Path, name: str) -> None:
    state = dict(built[name].state_dict())
    dropped = next(iter(state))
    del state[dropped]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        build_model(name, 10, weights_path=tmp_path / "bad.pth")
    message = str(info.value)
    assert dropped in message and "extra.weight" in message and "bad.pth" in message


def test_weights_path_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model("alexnet", 10, weights_path=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth.*torch.save"):
        build_model("alexnet", 10, weights_path=garbage)
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(ValueError, match="list.pth.*not a state dict"):
        build_model("deit_base", 10, weights_path=a_list)
    other_head = tmp_path / "seven.pth"
    torch.save({"classifier.6.weight": torch.zeros(7, 4096), "classifier.6.bias": torch.zeros(7)}, other_head)
    with pytest.raises(ValueError, match="seven.pth.*7-class head"):
        build_model("alexnet", 10, weights_path=other_head)
    with pytest.raises(ValueError, match="pretrained=False"):
        build_model("alexnet", 10, pretrained=False, weights_path=other_head)


def fail_download(*args, **kwargs) -> None:
    raise urllib.error.URLError("network disabled by the test")


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Torch hub and Hugging Face caches in an empty tmp dir; every download fails at once."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path


def test_alexnet_pretrained_reads_torch_hub_cache(built, empty_caches: Path) -> None:
    state = imagenet_state(built["alexnet"], "alexnet")
    checkpoints = empty_caches / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / "alexnet-owt-7be5be79.pth")
    model = build_model("alexnet", 10)
    assert head(model, "alexnet").out_features == 10
    assert_backbone_equal(model, state, "alexnet")


def test_alexnet_weights_unavailable_says_what_to_place(empty_caches: Path) -> None:
    with pytest.raises(WeightsUnavailable) as info:
        build_model("alexnet", 10)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert os.path.join(str(empty_caches / "torch" / "hub" / "checkpoints"), "alexnet-owt-7be5be79.pth") in message
    assert "pretrained=False" in message and "-p pretrained false" in message and "weights_path" in message


def test_deit_weights_unavailable_says_what_to_place(empty_caches: Path) -> None:
    with pytest.raises(WeightsUnavailable) as info:
        build_model("deit_base", 10)
    message = str(info.value)
    assert "timm/deit_base_patch16_224.fb_in1k" in message and str(empty_caches / "hf") in message
    assert "deit_base_patch16_224-b5f2ef4d.pth" in message and "weights_path" in message
    assert "pretrained=False" in message and "-p pretrained false" in message


# --- init: weight transfer, statistics transfer, random ------------------------------------------------


@pytest.fixture(scope="module")
def alexnet_file(built, tmp_path_factory) -> Path:
    """An ImageNet-shaped AlexNet state dict on disk: the source tensors (weights_path, as offline)."""
    path = tmp_path_factory.mktemp("weights") / "alexnet.pth"
    state = imagenet_state(built["alexnet"], "alexnet")
    with torch.no_grad():  # give each tensor its own mean and spread, so matching them is not trivial
        for i, key in enumerate(sorted(state)):
            state[key] = state[key] * (1 + i / 4) + i / 10
    torch.save(state, path)
    return path


def test_statistics_transfer_draws_every_tensor_from_its_source_tensors_mean_and_std(alexnet_file) -> None:
    source = torch.load(alexnet_file, weights_only=True)
    def build(init: str, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(0)  # the fresh head's initialisation, as the session seeds it
        return build_model("alexnet", 10, weights_path=alexnet_file, init=init, seed=seed)

    wt, st, again, other = build("imagenet"), build("stats", 3), build("stats", 3), build("stats", 4)
    for key, drawn in st.state_dict().items():
        assert torch.equal(drawn, again.state_dict()[key])  # one draw per seed
        assert not torch.equal(drawn, other.state_dict()[key])
        if key.startswith("classifier.6."):
            continue  # the fresh 10-way head has no ImageNet tensor; it is drawn from its own statistics
        assert not torch.equal(drawn, wt.state_dict()[key])  # not the weights themselves
        ref = source[key].double()
        tol = 4 * ref.std().item() / drawn.numel() ** 0.5 + 1e-6  # the sampling error of a mean of n draws
        assert abs(drawn.double().mean().item() - ref.mean().item()) < tol, key
        assert drawn.double().std().item() == pytest.approx(ref.std().item(), rel=0.1 if drawn.numel() < 1000 else 0.02)


def test_random_init_is_the_architectures_own_and_ignores_pretrained(alexnet_file) -> None:
    torch.manual_seed(5)
    expected = build_model("alexnet", 10, pretrained=False).state_dict()
    torch.manual_seed(5)
    got = build_model("alexnet", 10, pretrained=True, init="random").state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_statistics_transfer_without_imagenet_weights_draws_from_the_random_initialisations_statistics(
        alexnet_file) -> None:
    torch.manual_seed(7)  # the session seeds the same generator before either start
    source = build_model("alexnet", 10, pretrained=False).state_dict()
    torch.manual_seed(7)
    drawn = build_model("alexnet", 10, pretrained=False, init="stats", seed=3).state_dict()
    for key in ("features.0.weight", "features.10.weight", "classifier.1.weight"):
        assert not torch.equal(drawn[key], source[key])  # redrawn, not the random start itself
        assert drawn[key].double().std().item() == pytest.approx(source[key].double().std().item(), rel=0.05)
        assert abs(drawn[key].double().mean().item() - source[key].double().mean().item()) < (
            4 * source[key].double().std().item() / drawn[key].numel() ** 0.5)
    with pytest.raises(ValueError, match="given with pretrained=False"):  # no file is read without pretrained
        build_model("alexnet", 10, pretrained=False, weights_path=alexnet_file, init="stats")
    with pytest.raises(ValueError, match="init='transfer' is unknown"):
        build_model("alexnet", 10, pretrained=False, init="transfer")


def test_init_settings_that_cannot_apply_are_refused_before_a_run(alexnet_file) -> None:
    from transferstudy import config

    assert config.resolve("full", "alexnet", "cifar10", "smoke")["init"] == "imagenet"
    # without ImageNet weights statistics transfer draws from the random initialisation's statistics: applied
    assert config.start_weights(config.resolve("full", "alexnet", "cifar10", "smoke",
                                               {"init": "stats", "pretrained": False})) == "stats"
    with pytest.raises(config.ConfigError, match="pretrained is false: .* would not be read"):
        config.resolve("full", "alexnet", "cifar10", "smoke",
                       {"init": "stats", "pretrained": False, "weights_path": str(alexnet_file)})
    with pytest.raises(config.ConfigError, match="weights_path=.* would not be read"):
        config.resolve("partial", "alexnet", "cifar10", "smoke", {"init": "random", "weights_path": str(alexnet_file)})
    with pytest.raises(config.ConfigError, match="pretrained is false: .* would not be read"):
        config.resolve("linear_probe", "deit_base", "ferplus", "smoke",
                       {"pretrained": False, "weights_path": str(alexnet_file)})
    with pytest.raises(ValueError, match="given with init='random', which would not read it"):
        build_model("alexnet", 10, weights_path=alexnet_file, init="random")
    with pytest.raises(config.ConfigError, match="not a setting of the linear_probe regime"):
        config.resolve("linear_probe", "alexnet", "cifar10", "smoke", {"init": "stats"})
    cfg = config.resolve("full", "alexnet", "cifar10", "smoke", {"pretrained": False})
    assert config.start_weights(cfg) == "random"  # pretrained false is init random
    assert config.start_weights(config.resolve("frozen_svm", "alexnet", "cifar10", "smoke")) == "imagenet"
