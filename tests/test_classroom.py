"""The classroom pack: a profile's frozen features exported, checked, and trained from without images or backbone.

The runs are made through the library's session (AlexNet, random init, 224 px, 6 train / 4 val / 4 test synthetic
CIFAR images), as a notebook makes them; the pack is made from their feature cache like
``transferstudy classroom-pack`` makes it.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from transferstudy import classical, classroom, cli, config, features, models, regimes, runner, session, training

SMALL = {"pretrained": False, "n_train": 6, "n_val": 4, "n_test": 4, "eval_batch_size": 4}
ENTRY = "cifar10/alexnet"
# float16 keeps 11 significant bits: each stored feature is within 2**-11 of its float32 value, relatively.
FP16 = 2.0**-11


def quiet(_line: str) -> None:
    pass


def make_runs(runs: Path, data_root: Path, regimes_: tuple[str, ...] = classroom.REGIMES, dataset: str = "cifar10",
              **settings) -> None:
    """Finished frozen_svm / linear_probe runs of <dataset>/alexnet (profile smoke), features in ``runs/.cache``."""
    for regime in regimes_:
        run = session.start(regime, model="alexnet", dataset=dataset, data_dir=data_root / dataset, profile="smoke",
                            output_dir=runs / "smoke" / dataset / "alexnet" / regime, cache_dir=runs / ".cache",
                            overrides={**SMALL, **settings}, log=quiet)
        run.embeddings(run.build_model(), "pooled", run.weights_id())  # what the frozen SVM's notebook caches
        run.finish(trainable=0, total=0)


@pytest.fixture(scope="module")
def data_root(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "cifar10").symlink_to(cifar_dir)
    return root


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    make_runs(runs, data_root)
    return runs


@pytest.fixture(scope="module")
def pack(runs: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "classroom-smoke.tar.gz"
    classroom.build("smoke", runs, data_root, out, log=quiet)
    return out


def resolved(regime: str = "linear_probe", model: str = "alexnet", dataset: str = "cifar10", **settings) -> dict:
    return config.resolve(regime, model, dataset, "smoke", {**SMALL, **settings})


def rewrite(pack: Path, out: Path, change) -> Path:
    """A copy of ``pack`` whose members go through ``change(name, payload)``: new bytes, or None to drop the member."""
    with tarfile.open(pack, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            payload = change(member.name, src.extractfile(member).read())
            if payload is not None:
                info = tarfile.TarInfo(member.name)
                info.size = len(payload)
                dst.addfile(info, io.BytesIO(payload))
    return out


def members(pack: Path) -> dict[str, bytes]:
    with tarfile.open(pack, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def probe(tmp_path: Path, name: str, cache_dir: Path, data_dir: Path, features_pack: Path | None = None) -> dict:
    """The linear probe's notebook cells (augment none): its head trained on the run's embeddings."""
    run = session.start("linear_probe", model="alexnet", dataset="cifar10", data_dir=data_dir, profile="smoke",
                        output_dir=tmp_path / name, cache_dir=cache_dir, features_pack=features_pack,
                        overrides={**SMALL, "epochs": 4, "lr": 0.01}, log=quiet)
    net = run.build_model()
    regimes.apply_regime(net, "alexnet", "linear_probe")
    head = models.head(net, "alexnet")
    start = head.weight.detach().clone()
    X = run.embeddings(net, models.EMBEDDINGS["alexnet"][-1], run.weights_id())
    feats = {s: features.FeatureSplit(X[s], getattr(run.data, s).labels, getattr(run.data, s).soft) for s in X}
    run.fit(net, feats["train"], feats["val"], preprocess=features.identity, module=head)
    probs, pred = training.predict(head, feats["test"], preprocess=features.identity, batch_size=4, device=run.device)
    out = {"run": run, "X": X, "start": start, "weight": head.weight.detach().clone(), "probs": probs, "pred": pred,
           "trainable_total": regimes.count_params(net)}
    run.finish(*out["trainable_total"])  # also clears the resumable training state, so the next probe starts afresh
    return out


# --- round trip --------------------------------------------------------------------------------------


def test_a_linear_probe_from_the_pack_is_the_one_from_the_cache(pack, runs, data_root, tmp_path):
    cached = probe(tmp_path, "cached", runs / ".cache", data_root / "cifar10")
    # No images at all where the pack's run looks for them, and a cache of its own: everything comes from the pack.
    packed = probe(tmp_path, "packed", tmp_path / "empty-cache", tmp_path / "no-images", features_pack=pack)
    assert packed["run"].data.train.images is None and not (tmp_path / "empty-cache" / "features").exists()

    for split, X in cached["X"].items():  # the probe's input: AlexNet's 4096-d penultimate embedding
        np.testing.assert_allclose(packed["X"][split], X, rtol=FP16, atol=2.0**-25)  # half float16's finest step
    assert not np.array_equal(packed["X"]["train"], cached["X"]["train"])  # computed in float32: the pack rounds it
    assert torch.equal(packed["start"], cached["start"])  # the same fresh head
    assert packed["trainable_total"] == cached["trainable_total"]  # the backbone counted, without its weights

    moved = (cached["weight"] - cached["start"]).norm().item()
    assert moved > 1e-2  # training changed the head, so the comparison below says something
    # The features differ by float16 rounding (2**-11 relatively), so the updates do too: the two heads' difference
    # stays within a few float16 roundings of the change training made (measured: 0.3 of one rounding).
    assert (packed["weight"] - cached["weight"]).norm().item() <= 4 * FP16 * moved
    np.testing.assert_allclose(packed["probs"], cached["probs"], atol=1e-4)  # measured: 2e-7
    np.testing.assert_array_equal(packed["pred"], cached["pred"])


def test_a_frozen_svm_from_the_pack_is_the_one_from_the_cache(pack, runs, data_root, tmp_path):
    fitted = {}
    for name, source in (("cached", {"data_dir": data_root / "cifar10", "cache_dir": runs / ".cache"}),
                         ("packed", {"data_dir": tmp_path / "no-images", "features_pack": pack})):
        run = session.start("frozen_svm", model="alexnet", dataset="cifar10", profile="smoke",
                            output_dir=tmp_path / name, overrides=SMALL, log=quiet, **source)
        X = run.embeddings(run.build_model(), run.cfg["embedding"], run.weights_id())
        svm = classical.svm_pipeline(C=1.0, class_weight=None, max_iter=10000, pca=None, kernel="linear")
        svm.fit(X["train"], run.data.train.labels.numpy())
        fitted[name] = (X, svm.decision_function(X["test"]), run)
    (X_c, margins_c, run_c), (X_p, margins_p, run_p) = fitted["cached"], fitted["packed"]
    for split in X_c:  # pooled is stored as float16 in the cache too: the very same numbers
        np.testing.assert_array_equal(X_p[split], X_c[split])
    np.testing.assert_array_equal(margins_p, margins_c)
    assert run_p.classes == run_c.classes and run_p.data.split_hash == run_c.data.split_hash
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(run_p.data, split).labels, getattr(run_c.data, split).labels)
        assert getattr(run_p.data, split).files == getattr(run_c.data, split).files
    recorded = json.loads((tmp_path / "packed" / "split.json").read_text())
    assert recorded["split_hash"] == run_c.data.split_hash and recorded["info"]["features_pack"] == str(pack)
    assert json.loads((tmp_path / "packed" / "params.json").read_text())["features_pack"] == str(pack)
    assert "classroom pack `classroom-smoke.tar.gz`" in run_p.provenance_line()


def test_the_manifest_records_provenance_and_every_member(pack):
    files = members(pack)
    manifest = json.loads(files.pop(classroom.MANIFEST))
    assert set(manifest["members"]) == set(files)
    for name, payload in files.items():
        assert manifest["members"][name]["bytes"] == len(payload)
    entry = manifest["entries"][ENTRY]
    assert entry["embeddings"] == {"pooled": 9216, "penultimate": 4096}
    assert entry["sizes"] == {"train": 6, "val": 4, "test": 4}
    assert entry["settings"]["pretrained"] is False and entry["provenance"]["pretrained"] is False
    assert entry["provenance"]["weights"].startswith("random:alexnet:seed42")
    assert entry["provenance"]["preprocess"].startswith("Preprocessor(size=224, mode='resize_crop'")
    assert {"transferstudy", "torch", "torchvision", "timm", "runs"} <= set(entry["provenance"])
    for kind, dim in entry["embeddings"].items():
        array = np.load(io.BytesIO(files[f"{ENTRY}/{kind}-train.npy"]))
        assert array.dtype == np.float16 and array.shape == (6, dim)


def test_a_missing_cache_entry_is_computed_through_the_runs_code(runs, data_root, pack, tmp_path):
    elsewhere = tmp_path / "runs"
    make_runs(elsewhere, data_root)
    for stored in (elsewhere / ".cache" / "features").iterdir():
        stored.unlink()  # every cached pooled embedding gone
    lines: list[str] = []
    again = classroom.build("smoke", elsewhere, data_root, tmp_path / "again.tar.gz", log=lines.append)
    assert any(line.startswith("computed 3 feature cache entries that were missing") for line in lines)
    original = json.loads(members(pack)[classroom.MANIFEST])["members"]
    features_only = [name for name in original if name.endswith(".npy")]
    assert features_only and all(again["members"][name] == original[name] for name in features_only)


def test_vote_shares_travel_with_the_pack(fer_microsoft_dir, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ferplus").symlink_to(fer_microsoft_dir)
    votes = {"label_rule": "votes", "n_train": 16, "n_val": 8, "n_test": 8}
    make_runs(tmp_path / "runs", tmp_path / "data", ("frozen_svm",), dataset="ferplus", **votes)
    classroom.build("smoke", tmp_path / "runs", tmp_path / "data", tmp_path / "fer.tar.gz", log=quiet)
    cfg = resolved("linear_probe", dataset="ferplus", augment="none", **votes)
    packed = classroom.open_pack(tmp_path / "fer.tar.gz", "linear_probe", cfg)
    original = session.start("linear_probe", model="alexnet", dataset="ferplus", data_dir=tmp_path / "data" / "ferplus",
                             profile="smoke", output_dir=tmp_path / "r", overrides={**SMALL, **votes}, log=quiet)
    for split in classroom.SPLITS:
        assert getattr(packed, split).soft is not None
        assert torch.equal(getattr(packed, split).soft, getattr(original.data, split).soft)
        assert torch.equal(getattr(packed, split).labels, getattr(original.data, split).labels)
    with pytest.raises(classroom.PackError, match=r"augment='fer' \(a pack holds the embeddings of the unaugmented"):
        classroom.open_pack(tmp_path / "fer.tar.gz", "linear_probe",
                            resolved("linear_probe", dataset="ferplus", **votes))


def test_the_command_writes_a_pack_and_reports_what_is_missing(runs, data_root, tmp_path, capsys):
    out = tmp_path / "cli.tar.gz"
    assert cli.main(["classroom-pack", str(out), "--profile", "smoke", "--runs-dir", str(runs),
                     "--data-root", str(data_root)]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: " in printed and "MiB; cifar10/alexnet; " in printed
    assert "left out cifar10/deit_base: no finished frozen_svm or linear_probe run" in printed
    assert "randomly initialised" in printed
    assert classroom.open_pack(out, "frozen_svm", resolved("frozen_svm")).split_hash

    assert cli.main(["classroom-pack", str(tmp_path / "none.tar.gz"), "--profile", "quick", "--runs-dir",
                     str(runs), "--data-root", str(data_root)]) == 2
    assert "holds no finished frozen_svm or linear_probe run" in capsys.readouterr().err
    assert not (tmp_path / "none.tar.gz").exists()


def test_runs_made_with_other_settings_are_not_packed_together(data_root, tmp_path):
    runs = tmp_path / "runs"
    make_runs(runs, data_root, ("frozen_svm",))
    make_runs(runs, data_root, ("linear_probe",), n_test=3)
    with pytest.raises(classroom.PackError, match=r"frozen_svm and .*linear_probe were made with different "
                                                  r"n_test \(4 vs 3\), the split"):
        classroom.build("smoke", runs, data_root, tmp_path / "p.tar.gz", log=quiet)


def test_data_other_than_the_runs_is_refused(runs, cifar_dir, tmp_path):
    other = tmp_path / "other"
    (other / "cifar10" / "train").mkdir(parents=True)
    (other / "cifar10" / "test").symlink_to(cifar_dir / "test")
    for folder in (cifar_dir / "train").iterdir():  # one image fewer per class: another split
        (other / "cifar10" / "train" / folder.name).mkdir()
        for image in sorted(folder.iterdir())[1:]:
            (other / "cifar10" / "train" / folder.name / image.name).symlink_to(image)
    with pytest.raises(classroom.PackError, match=r"the images under .*other/cifar10 give split \w+, the runs .* "
                                                  r"recorded \w+; point --data-root at the data the runs used"):
        classroom.build("smoke", runs, other, tmp_path / "p.tar.gz", log=quiet)


# --- damaged or wrong packs are refused -----------------------------------------------------------------


@pytest.mark.parametrize("name", [f"{ENTRY}/pooled-train.npy", f"{ENTRY}/labels-test.npy", classroom.README])
def test_an_altered_member_is_refused_naming_it(pack, tmp_path, name):
    def flip(member: str, payload: bytes) -> bytes:
        return payload[:-1] + bytes([payload[-1] ^ 1]) if member == name else payload

    altered = rewrite(pack, tmp_path / "altered.tar.gz", flip)
    with pytest.raises(classroom.PackError, match=rf"altered.tar.gz: member {name} fails its checksum"):
        classroom.open_pack(altered, "linear_probe", resolved())


def test_a_missing_an_unlisted_and_a_cut_member_are_refused(pack, tmp_path):
    dropped = rewrite(pack, tmp_path / "dropped.tar.gz",
                      lambda m, p: None if m == f"{ENTRY}/files-val.json" else p)
    with pytest.raises(classroom.PackError, match=rf"member {ENTRY}/files-val.json, listed in its manifest.json, "
                                                  r"is missing"):
        classroom.open_pack(dropped, "linear_probe", resolved())

    extra = tmp_path / "extra.tar.gz"
    with tarfile.open(pack, "r:gz") as src, tarfile.open(extra, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        info = tarfile.TarInfo(f"{ENTRY}/pooled-extra.npy")
        info.size = 3
        dst.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(classroom.PackError, match=rf"member {ENTRY}/pooled-extra.npy is not in the pack's manifest"):
        classroom.open_pack(extra, "linear_probe", resolved())

    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(pack.read_bytes()[: pack.stat().st_size // 2])
    with pytest.raises(classroom.PackError, match=r"cut.tar.gz: not a readable .tar.gz .*truncated"):
        classroom.open_pack(cut, "linear_probe", resolved())


def test_a_manifest_that_does_not_describe_its_files_is_refused(pack, tmp_path):
    def edit(change):
        def member(name: str, payload: bytes) -> bytes:
            if name != classroom.MANIFEST:
                return payload
            manifest = json.loads(payload)
            change(manifest["entries"][ENTRY])
            return json.dumps(manifest).encode()
        return member

    fewer = rewrite(pack, tmp_path / "fewer.tar.gz", edit(lambda entry: entry["sizes"].update(train=5)))
    with pytest.raises(classroom.PackError, match=rf"member {ENTRY}/labels-train.npy holds int64 \(6,\), its "
                                                  r"manifest entry says int64 \(5,\)"):
        classroom.open_pack(fewer, "linear_probe", resolved())
    unsure = rewrite(pack, tmp_path / "unsure.tar.gz", edit(lambda entry: entry.pop("settings")))
    with pytest.raises(classroom.PackError, match=rf"manifest.json entry for {ENTRY} does not describe its files "
                                                  r"\(KeyError\('settings'\)\)"):
        classroom.open_pack(unsure, "linear_probe", resolved())


@pytest.mark.parametrize(("model", "dataset"), [("deit_base", "cifar10"), ("alexnet", "ferplus")])
def test_a_pack_for_another_model_or_dataset_is_refused(pack, tmp_path, model, dataset):
    with pytest.raises(classroom.PackError, match=rf"classroom-smoke.tar.gz: the pack holds cifar10/alexnet, not "
                                                  rf"{dataset}/{model}, this run's dataset/model"):
        session.start("linear_probe", model=model, dataset=dataset, profile="smoke", output_dir=tmp_path / "r",
                      features_pack=pack, overrides=SMALL, log=quiet)
    assert not (tmp_path / "r").exists()  # refused before the run's folder was opened


@pytest.mark.parametrize(("regime", "settings", "message"), [
    ("linear_probe", {"n_train": 5}, r"n_train=5 \(the pack's: 6\).*Run it with profile smoke"),
    ("linear_probe", {"pretrained": True}, r"pretrained=True \(the pack's: False\)"),
    ("linear_probe", {"augment": "light"}, r"augment='light' \(a pack holds the embeddings of the unaugmented"),
    ("frozen_svm", {"eval_mode": "resize"}, r"eval_mode='resize' \(the pack's: 'resize_crop'\)"),
])
def test_a_run_whose_settings_differ_from_the_packs_is_refused(pack, regime, settings, message):
    with pytest.raises(classroom.PackError, match=rf"this {regime} run of cifar10/alexnet differs .*{message}"):
        classroom.open_pack(pack, regime, resolved(regime, **settings))


def test_only_the_frozen_regimes_take_a_pack_and_the_file_must_exist(pack, tmp_path):
    with pytest.raises(classroom.PackError, match=r"only frozen_svm and linear_probe train on; the partial regime "
                                                  r"needs the images: drop features_pack"):
        classroom.open_pack(pack, "partial", resolved("partial"))
    with pytest.raises(classroom.PackError, match=r"features_pack='.*nowhere.tar.gz': no such file"):
        classroom.open_pack(tmp_path / "nowhere.tar.gz", "linear_probe", resolved())
    assert "features_pack" in config.run_names("frozen_svm") and "features_pack" not in config.run_names("partial")
    with pytest.raises(config.ConfigError, match=r"-p features_pack: .*give it to that notebook, e\.g\. papermill"):
        config.check_overrides({"features_pack": str(pack)}, [("linear_probe", "alexnet", "cifar10")], "smoke")


# --- the notebooks ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("regime", classroom.REGIMES)
def test_the_notebook_trains_from_a_pack_without_images(pack, tmp_path, regime):
    out = tmp_path / "run"
    out.mkdir()
    params = {"model": "alexnet", "dataset": "cifar10", "profile": "smoke", "data_dir": str(tmp_path / "no-images"),
              "output_dir": str(out), "cache_dir": str(tmp_path / "cache"), "features_pack": str(pack), **SMALL}
    runner.execute_notebook(runner.notebook_path(regime), out / "notebook.ipynb", params, tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "ok"
    assert meta["split_hash"] == classroom.open_pack(pack, regime, resolved(regime)).split_hash
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["classifiers"][metrics["best"]]["test"]["accuracy"] <= 1
    assert not (out / "bundle").exists()  # no backbone, no bundle
    assert not (tmp_path / "cache" / "features").exists()  # nothing extracted
