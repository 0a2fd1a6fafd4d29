"""What `predict` trusts: bundles rebuilt from weights, checked against themselves, each image on its own.

Two real bundles, exported once per module: a fine-tuned AlexNet (random init, 3 classes, 64 px input)
and a frozen AlexNet "pooled" extractor + linear SVM fitted on synthetic colour images. A test that edits
a bundle works on a copy (JSON files copied, weight files hard-linked, never written through).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
import torch
from PIL import Image

from transferstudy import bundle, classical, cli, models
from transferstudy.bundle import BundleError
from transferstudy.data import read_image
from transferstudy.preprocess import Preprocessor

CLASSES = ("cat", "dog", "frog")
SIZE = 64  # the smallest round size AlexNet's convolutions take; keeps every forward cheap
# name, PIL mode, (width, height): every size and mode different
IMAGES = (("rgb.png", "RGB", (40, 30)), ("gray.png", "L", (57, 33)), ("rgba.png", "RGBA", (24, 64)),
          ("palette.png", "P", (100, 80)), ("photo.jpg", "RGB", (120, 90)))


def pixels(path: Path) -> torch.Tensor:
    """The image as predict should see it: the library's one image reader (alpha on white), uint8 [1, 3, H, W]."""
    return torch.from_numpy(read_image(path, gray=False))[None]


def colour_images(n_per_class: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 [n, 3, 40, 40] images whose dominant channel is the class, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    y = np.repeat(np.arange(len(CLASSES)), n_per_class)
    x = torch.randint(0, 90, (len(y), 3, 40, 40), generator=gen, dtype=torch.uint8)
    x[torch.arange(len(y)), torch.from_numpy(y)] += 160
    return x, y


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for name, mode, (w, h) in IMAGES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        if mode == "RGBA":
            img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        img.save(root / name)
        paths.append(root / name)
    return paths


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = models.build_model("alexnet", len(CLASSES), pretrained=False)
    with torch.no_grad():
        net.classifier[6].weight.mul_(200)  # spread the random logits: no near-ties between classes
    out = tmp_path_factory.mktemp("finetuned") / "bundle"
    bundle.export_finetuned(out, net, "alexnet", CLASSES, Preprocessor(size=SIZE), {"regime": "full"})
    return out, net.eval()


@pytest.fixture(scope="module")
def svm(tmp_path_factory):
    torch.manual_seed(1)
    net = models.build_model("alexnet", len(CLASSES), pretrained=False)
    extractor = models.extractor(net, "alexnet", "pooled").eval()
    pre = Preprocessor(size=SIZE)
    with torch.no_grad():
        (x_train, y_train), (x_val, y_val) = colour_images(6, 0), colour_images(3, 1)
        X_train, X_val = extractor(pre(x_train, False)).numpy(), extractor(pre(x_val, False)).numpy()
    pipeline = classical.svm_pipeline(kernel="linear").fit(X_train, y_train)
    out = tmp_path_factory.mktemp("svm") / "bundle"
    bundle.export_svm(out, extractor, pipeline, "alexnet", CLASSES, pre, {"regime": "frozen_svm"}, X_val, y_val)
    return out, extractor, pipeline


class TorchScriptLoaded(BaseException):
    """Raised by the patched torch.jit.load; a BaseException, so no `except Exception` in the library hides it."""


@pytest.fixture
def no_torchscript(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise TorchScriptLoaded(f"torch.jit.load{args} was called without trust_torchscript")

    monkeypatch.setattr(torch.jit, "load", refuse)
    yield
    assert not calls


def expected_rows(kind: str, fixture, paths: list[Path]) -> list[tuple[str, float]]:
    """Class and probability of each image from the in-memory model, one image at a time."""
    pre, rows = Preprocessor(size=SIZE), []
    for path in paths:
        with torch.no_grad():
            out = fixture[1](pre(pixels(path), False))
        if kind == "finetuned":
            probs = out.softmax(1)[0]
            rows.append((CLASSES[int(probs.argmax())], float(probs.max())))
        else:
            pipeline = fixture[2]
            pred = int(pipeline.predict(out.numpy())[0])
            temperature = json.loads((fixture[0] / "meta.json").read_text())["margin_temperature"]
            probs = classical.margin_probabilities(pipeline, out.numpy(), temperature)[0]
            rows.append((CLASSES[pred], float(probs[pred])))
    return rows


def copy_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (shutil.copy if f.suffix == ".json" else os.link)(f, dst / f.name)
    return dst


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


@pytest.fixture(params=["finetuned", "svm"])
def kind(request):
    return request.param, request.getfixturevalue(request.param)


def test_each_file_gets_the_answer_it_gets_alone(kind, images, no_torchscript):
    name, fixture = kind
    assert len({pixels(p).shape for p in images}) == len(images)  # every size differs
    alone = [bundle.predict_files(fixture[0], [p])[0] for p in images]
    assert bundle.predict_files(fixture[0], images) == alone
    assert bundle.predict_files(fixture[0], images[::-1]) == alone[::-1]
    # and it is the in-memory model's answer for that image
    expected = expected_rows(name, fixture, images)
    assert [row["class"] for row in alone] == [c for c, _ in expected]
    np.testing.assert_allclose([row["probability"] for row in alone], [p for _, p in expected], rtol=1e-5)
    assert [row["image"] for row in alone] == [str(p) for p in images]


def test_trusting_torchscript_runs_the_torchscript_and_agrees_with_the_weights(kind, images, monkeypatch):
    _, fixture = kind
    default = bundle.predict_files(fixture[0], images)
    loaded, real_load = [], torch.jit.load

    def spy(path, *args, **kwargs):
        loaded.append(Path(path).name)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", spy)
    trusted = bundle.predict_files(fixture[0], images, trust_torchscript=True)
    assert loaded == [bundle.TORCHSCRIPT[json.loads((fixture[0] / "meta.json").read_text())["kind"]]]
    assert [r["class"] for r in trusted] == [r["class"] for r in default]
    np.testing.assert_allclose([r["probability"] for r in trusted], [r["probability"] for r in default], rtol=1e-4)


def test_cli_predict_runs_weights_by_default_and_torchscript_on_request(finetuned, images, capsys, monkeypatch):
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("TorchScript loaded without the flag"))
    capsys.readouterr()
    assert cli.main(["predict", "--bundle", str(finetuned[0]), str(images[1]), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(torch.jit, "load", real_load)
    assert cli.main(["predict", "--bundle", str(finetuned[0]), str(images[1]), "--json", "--trust-torchscript"]) == 0
    trusted = json.loads(capsys.readouterr().out)
    assert default[0]["class"] == trusted[0]["class"] == expected_rows("finetuned", finetuned, images[1:2])[0][0]


def test_an_svm_bundle_without_extractor_weights_needs_the_flag(svm, images, tmp_path, no_torchscript):
    old = copy_bundle(svm[0], tmp_path / "bundle")
    (old / "extractor.pt").unlink()  # as bundles were written before extractors were saved as weights
    with pytest.raises(BundleError, match=r"extractor\.pt is missing: predict rebuilds the feature extractor.*"
                                          r"--force.*--trust-torchscript.*TorchScript is code"):
        bundle.predict_files(old, images[:1])


def test_an_svm_bundle_without_extractor_weights_runs_when_trusted(svm, images, tmp_path):
    old = copy_bundle(svm[0], tmp_path / "bundle")
    (old / "extractor.pt").unlink()
    assert bundle.predict_files(old, images[:2], trust_torchscript=True) == \
        bundle.predict_files(svm[0], images[:2], trust_torchscript=True)


def test_a_checkpoint_that_is_torchscript_is_refused_as_weights(finetuned, images, tmp_path, no_torchscript):
    copy = copy_bundle(finetuned[0], tmp_path / "bundle")
    (copy / "checkpoint.pt").unlink()
    os.link(copy / "model.torchscript.pt", copy / "checkpoint.pt")
    with pytest.raises(BundleError, match=r"checkpoint\.pt is not a readable state dict"):
        bundle.predict_files(copy, images[:1])


def drop_class(meta: bool):
    def edit(b: Path) -> None:
        edit_json(b / "classes.json", lambda c: c.pop())
        if meta:
            edit_json(b / "meta.json", lambda m: m["classes"].pop())
    return edit


def preprocessing(key, value):
    return lambda b: edit_json(b / "meta.json", lambda m: m["preprocessing"].__setitem__(key, value))


def refit_on_5_features(b: Path) -> None:
    X, y = np.random.default_rng(0).normal(size=(30, 5)), np.arange(30) % len(CLASSES)
    (b / "classifier.skops").unlink()  # a hard link: replace the file, never write through it
    (b / "classifier.skops").write_bytes(sio.dumps(classical.svm_pipeline().fit(X, y)))


MISMATCHES = {
    "classes.json drops a class": ("finetuned", False, drop_class(meta=False),
                                   r"classes\.json lists 2 classes \['cat', 'dog'\], but .*meta\.json records "
                                   r"\['cat', 'dog', 'frog'\]"),
    "model output size vs classes": ("finetuned", False, drop_class(meta=True),
                                     r"checkpoint\.pt: the model's output size is 3 classes \(classifier\.6\.weight "
                                     r"\(3, 4096\)\), but classes\.json lists 2 classes"),
    "model output size vs classes, torchscript": ("finetuned", True, drop_class(meta=True),
                                                  r"model\.torchscript\.pt: the model's output size is 3, but "
                                                  r"classes\.json lists 2 classes"),
    "classifier classes_ vs classes": ("svm", False, drop_class(meta=True),
                                       r"classifier\.skops: the classifier's classes_ \[0, 1, 2\] are not all "
                                       r"indices into the 2 classes of classes\.json"),
    "extractor output vs classifier input": ("svm", False, refit_on_5_features,
                                             r"extractor\.pt: the extractor's output size is 9216 features, but "
                                             r".*classifier\.skops was fitted on 5"),
    "extractor output vs classifier input, torchscript": ("svm", True, refit_on_5_features,
                                                          r"extractor\.torchscript\.pt: the extractor's output size "
                                                          r"is 9216 features, but .*fitted on 5"),
    "recorded embedding vs extractor weights": ("svm", False,
                                                lambda b: edit_json(b / "meta.json",
                                                                    lambda m: m.__setitem__("embedding", "penultimate")),
                                                r"extractor\.pt does not fit models\.extractor\(<3-class alexnet>, "
                                                r"'alexnet', 'penultimate'\): missing 4\.bias, 4\.weight, 7\.bias"),
    "recorded size the network cannot take": ("finetuned", False, preprocessing("size", 16),
                                              r"checkpoint\.pt does not run on the recorded preprocessing "
                                              r"\(meta\.json size 16\)"),
    "recorded size the extractor cannot take": ("svm", True, preprocessing("size", 16),
                                                r"extractor\.torchscript\.pt does not run on the recorded "
                                                r"preprocessing \(meta\.json size 16\)"),
    "recorded colour order": ("finetuned", False, preprocessing("color", "BGR"),
                              r"meta\.json: preprocessing color='BGR', but predict implements color='RGB' only"),
    "recorded mode": ("svm", False, preprocessing("mode", "stretch"),
                      r"meta\.json: the recorded preprocessing .* is not usable: .*'stretch' is unknown"),
    "recorded mean": ("finetuned", False, preprocessing("mean", [0.5, 0.5]),
                      r"meta\.json: the recorded preprocessing .* is not usable: .*need 3 values"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_bundle_that_disagrees_with_itself_is_refused_naming_the_mismatch(case, request, images, tmp_path):
    name, trust, edit, message = MISMATCHES[case]
    if not trust:
        request.getfixturevalue("no_torchscript")
    copy = copy_bundle(request.getfixturevalue(name)[0], tmp_path / "bundle")
    edit(copy)
    with pytest.raises(BundleError, match=message):
        bundle.predict_files(copy, images[:1], trust_torchscript=trust)


def test_a_run_folder_is_pointed_at_its_bundle(finetuned, images, tmp_path, capsys):
    run = tmp_path / "cifar10" / "alexnet" / "full"
    copy_bundle(finetuned[0], run / "bundle")
    (run / "meta.json").write_text(json.dumps({"status": "ok", "model": "alexnet", "regime": "full"}))  # the run's
    with pytest.raises(BundleError, match=rf"{run} is a run folder, not a bundle; its bundle is {run / 'bundle'}"):
        bundle.predict_files(run, images[:1])
    with pytest.raises(BundleError, match=rf"pass the bundle folder {run / 'bundle'}$"):
        bundle.predict_files(run / "bundle" / "checkpoint.pt", images[:1])
    capsys.readouterr()
    assert cli.main(["predict", "--bundle", str(run), str(images[0])]) == 2
    assert f"pass --bundle {run / 'bundle'}" in capsys.readouterr().err
    assert bundle.predict_files(run / "bundle", images[:1]) == bundle.predict_files(finetuned[0], images[:1])


def test_a_missing_image_is_named_before_the_bundle_loads(finetuned, images, tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "open_bundle", lambda *a, **k: pytest.fail("the bundle was loaded"))
    with pytest.raises(BundleError, match=rf"no such image file: {tmp_path / 'nope.png'}"):
        bundle.predict_files(finetuned[0], [images[0], tmp_path / "nope.png"])


def test_export_svm_refuses_an_extractor_predict_could_not_rebuild(svm, tmp_path):
    _, extractor, pipeline = svm
    X = np.random.default_rng(0).normal(size=(9, pipeline.n_features_in_))
    with pytest.raises(ValueError, match=r"not transferstudy\.models\.extractor\(net, 'alexnet', kind\)"):
        bundle.export_svm(tmp_path / "b", torch.nn.Sequential(extractor, torch.nn.ReLU(), torch.nn.Linear(9216, 9216)),
                          pipeline, "alexnet", CLASSES, Preprocessor(size=SIZE), {}, X, np.arange(9) % 3)
    assert not (tmp_path / "b").exists()


def test_export_svm_records_the_embedding_and_the_extractor_weights(svm):
    meta = json.loads((svm[0] / "meta.json").read_text())
    assert meta["embedding"] == "pooled" and meta["classes"] == list(CLASSES)
    state = torch.load(svm[0] / "extractor.pt", weights_only=True)
    assert state.keys() == svm[1].state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in svm[1].state_dict().items())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the export traces timm's input-size checks
def test_a_deit_svm_bundle_is_rebuilt_from_its_weights(images, tmp_path, no_torchscript):
    """DeiT's extractor is the whole network, head included: predict rebuilds a len(classes)-way DeiT-Base."""
    torch.manual_seed(2)
    net = models.build_model("deit_base", len(CLASSES), pretrained=False)
    extractor, pre = models.extractor(net, "deit_base").eval(), Preprocessor(size=224)
    with torch.no_grad():
        (x_train, y_train), (x_val, y_val) = colour_images(2, 0), colour_images(1, 1)
        X_train, X_val = extractor(pre(x_train, False)).numpy(), extractor(pre(x_val, False)).numpy()
        expected = extractor(pre(pixels(images[3]), False)).numpy()
    pipeline = classical.svm_pipeline(kernel="linear").fit(X_train, y_train)
    bundle.export_svm(tmp_path / "bundle", extractor, pipeline, "deit_base", CLASSES, pre, {}, X_val, y_val)
    assert json.loads((tmp_path / "bundle" / "meta.json").read_text())["embedding"] == "cls"
    [row] = bundle.predict_files(tmp_path / "bundle", images[3:4])
    assert row["class"] == CLASSES[int(pipeline.predict(expected)[0])]


def test_load_finetuned_gives_the_exported_weights_and_names_a_class_count_mismatch(finetuned):
    net = bundle.load_finetuned(finetuned[0], "alexnet", len(CLASSES))
    assert all(torch.equal(v, finetuned[1].state_dict()[k]) for k, v in net.state_dict().items())
    with pytest.raises(BundleError, match=r"output size is 3 classes .* but num_classes=10 was asked for"):
        bundle.load_finetuned(finetuned[0], "alexnet", 10)


def test_a_bundle_trained_on_gray_images_reads_a_colour_file_as_its_gray_version(kind, images, tmp_path,
                                                                                   no_torchscript):
    name, fixture = kind
    gray = copy_bundle(fixture[0], tmp_path / "gray")
    edit_json(gray / "meta.json", lambda meta: meta.update(input="gray"))  # as a FERPlus run records it
    colour = [p for p in images if read_image(p, gray=False).std(axis=0).max() > 0]  # files with colour in them
    assert colour
    luma = []
    for path in colour:
        luma.append(tmp_path / f"{path.stem}-L.png")
        Image.fromarray(read_image(path, gray=True)).save(luma[-1])
    assert bundle.predict_files(gray, colour) == [
        {**row, "image": str(path)} for row, path in zip(bundle.predict_files(gray, luma), colour, strict=True)]
    # the same files through the bundle without the record are read in colour, as the RGB networks see them
    in_colour = bundle.predict_files(fixture[0], colour)
    assert [r["probability"] for r in in_colour] != [r["probability"] for r in bundle.predict_files(gray, colour)]
