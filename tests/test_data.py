"""transferstudy.data: layouts, label rules, splits, subsets, decoding and errors, on synthetic and real data."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image
from synthetic import (
    CIFAR10_CLASSES,
    CIFAR_TRAIN_PER_CLASS,
    FERPLUS_TRAIN_PER_EMOTION,
    KAGGLE_FOLDERS,
    clear_votes,
    cifar_image,
    pixel_value,
    write_cifar_imagefolder,
    write_cifar_pickles,
    write_ferplus_kaggle,
    write_ferplus_microsoft,
)

from transferstudy import cli
from transferstudy.data import (
    CHECKSUMS,
    CLASSES,
    DATASETS,
    LABEL_RULES,
    DataError,
    DatasetSplits,
    check_images,
    load_dataset,
    read_image,
    summarize,
)

FER = CLASSES["ferplus"]
LAYOUTS = ("cifar_imagefolder", "fer_microsoft", "fer_kaggle")
KAGGLE_CLASS_OF = {  # the test's own reading of the Kaggle folder names
    "angry": "anger", "Contempt": "contempt", "disgust": "disgust", "fear": "fear",
    "happy": "happiness", "neutral": "neutral", "sad": "sadness", "surprised": "surprise",
}


def _load(layout: str, request: pytest.FixtureRequest, **kwargs) -> DatasetSplits:
    fixture, name = {
        "cifar_imagefolder": ("cifar_dir", "cifar10"),
        "fer_microsoft": ("fer_microsoft_dir", "ferplus"),
        "fer_kaggle": ("fer_kaggle_dir", "ferplus"),
    }[layout]
    return load_dataset(name, request.getfixturevalue(fixture), **kwargs)


def _splits(ds: DatasetSplits):
    return {"train": ds.train, "val": ds.val, "test": ds.test}


def test_public_constants():
    assert DATASETS == ("cifar10", "ferplus")
    assert CLASSES["cifar10"] == CIFAR10_CLASSES
    assert FER == ("anger", "contempt", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")
    assert LABEL_RULES == ("majority", "argmax", "votes")


# --- layouts -------------------------------------------------------------------------------------------


def test_cifar_imagefolder(cifar_dir: Path):
    ds = load_dataset("cifar10", cifar_dir)
    assert ds.info["layout"] == "imagefolder" and ds.classes == CIFAR10_CLASSES
    assert len(ds.train) + len(ds.val) == sum(CIFAR_TRAIN_PER_CLASS) and len(ds.test) == 30
    for split in _splits(ds).values():
        assert split.images.dtype == torch.uint8 and split.images.shape == (len(split), 3, 32, 32)
        assert split.labels.dtype == torch.int64 and split.soft is None
        for img, label, f in zip(split.images, split.labels.tolist(), split.files, strict=True):
            assert f.split("/")[1] == CIFAR10_CLASSES[label]
            expected = torch.from_numpy(cifar_image(pixel_value(f))).permute(2, 0, 1).to(torch.int16)
            assert (img.to(torch.int16) - expected).abs().max() <= 4  # JPEG (4:4:4) of two flat, block-aligned halves
    assert all(f.startswith("test/") for f in ds.test.files)


@pytest.fixture
def fake_torchvision_cifar(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let torchvision accept synthetic pickles (md5 sums differ) and 'download' by writing them."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    fake_download = lambda url, root, **kw: write_cifar_pickles(Path(root))  # noqa: E731
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)


@pytest.mark.parametrize("download", [False, True], ids=["local-pickles", "download"])
def test_cifar_torchvision_layout(tmp_path: Path, fake_torchvision_cifar: None, download: bool):
    root = tmp_path / "cifar"
    if download:
        assert not root.exists()
        written = write_cifar_pickles(tmp_path / "reference")  # same content as the fake download writes
    else:
        written = write_cifar_pickles(root)
    train_px, train_y, test_px, test_y = written
    ds = load_dataset("cifar10", root, download=download)
    assert ds.info["layout"] == "torchvision"
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert len(ds.train) + len(ds.val) == 100 and len(ds.test) == 30
    for name, px, y in (("train", train_px, train_y), ("val", train_px, train_y), ("test", test_px, test_y)):
        split, idx = getattr(ds, name), ds.split_indices[name]
        assert split.images.shape == (len(idx), 3, 32, 32) and split.images.dtype == torch.uint8
        assert torch.equal(split.images, torch.from_numpy(px[idx]).permute(0, 3, 1, 2))
        assert split.labels.tolist() == y[idx].tolist()
        split_dir = "test" if name == "test" else "train"
        assert split.files == [f"cifar-10-batches-py/{split_dir}#{i}" for i in idx]


def test_ferplus_microsoft_layout(fer_microsoft_dir: Path):
    ds = load_dataset("ferplus", fer_microsoft_dir)
    assert ds.info["layout"] == "microsoft" and ds.info["label_rule"] == "majority" and ds.classes == FER
    assert len(ds.train) + len(ds.val) == sum(FERPLUS_TRAIN_PER_EMOTION.values())  # the NF row is dropped
    assert len(ds.test) == 8 and all(f.startswith("FER2013Test/") for f in ds.test.files)
    counts = Counter(FER[y] for s in (ds.train, ds.val) for y in s.labels.tolist())
    assert counts == Counter(FERPLUS_TRAIN_PER_EMOTION)
    _check_gray(ds)


def test_ferplus_kaggle_layout_aliases_and_nesting(fer_kaggle_dir: Path):
    ds = load_dataset("ferplus", fer_kaggle_dir)
    assert ds.info["layout"] == "kaggle" and ds.info["label_rule"] == "argmax"
    assert len(ds.train) + len(ds.val) == sum(n for n, _ in KAGGLE_FOLDERS.values())
    assert len(ds.test) == sum(n for _, n in KAGGLE_FOLDERS.values())
    for name, split in _splits(ds).items():
        top = "test" if name == "test" else "train"
        for f, y in zip(split.files, split.labels.tolist(), strict=True):
            nest, split_dir, folder, _ = f.split("/")
            assert (nest, split_dir) == ("fer2013", top) and FER[y] == KAGGLE_CLASS_OF[folder]
    _check_gray(ds)
    explicit = load_dataset("ferplus", fer_kaggle_dir, label_rule="argmax", decode=False)
    assert explicit.split_hash == ds.split_hash and torch.equal(explicit.train.labels, ds.train.labels)


def _check_gray(ds: DatasetSplits) -> None:
    for split in _splits(ds).values():
        img = split.images
        assert img.dtype == torch.uint8 and img.shape == (len(split), 3, 48, 48)
        assert torch.equal(img[:, 0], img[:, 1]) and torch.equal(img[:, 1], img[:, 2])
        values = [pixel_value(f) for f in split.files]
        assert img[:, 0, 0, 0].tolist() == values and bool((img == img[:, :1, :1, :1]).all())


def test_decode_false_lists_without_images(fer_microsoft_dir: Path):
    full = load_dataset("ferplus", fer_microsoft_dir)
    lazy = load_dataset("ferplus", fer_microsoft_dir, decode=False)
    for a, b in zip(_splits(full).values(), _splits(lazy).values(), strict=True):
        assert b.images is None and a.files == b.files and torch.equal(a.labels, b.labels)
    assert lazy.split_hash == full.split_hash


# --- FERPlus label rules ----------------------------------------------------------------------------------

# Vote rows in label.csv order: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF.
# Expected outcome per rule, worked out by hand (None = row dropped).
RULE_ROWS = [
    # votes                           majority     argmax       why
    ([8, 1, 1, 0, 0, 0, 0, 0, 0, 0], "neutral", "neutral"),  # clear winner
    ([4, 3, 0, 1, 1, 1, 0, 0, 0, 0], "neutral", "neutral"),  # 4 of 7 after zeroing the 1-vote outliers
    ([4, 4, 2, 0, 0, 0, 0, 0, 0, 0], None, "neutral"),  # tie: no majority; argmax takes the first column
    ([0, 5, 0, 0, 5, 0, 0, 0, 0, 0], None, "happiness"),  # tie: happiness precedes anger in the csv order
    ([2, 0, 0, 0, 0, 0, 0, 0, 6, 2], None, None),  # unknown wins
    ([0, 0, 0, 0, 0, 0, 0, 0, 3, 7], None, None),  # NF (not a face) wins
    ([0, 0, 0, 0, 0, 0, 0, 5, 0, 4], "contempt", "contempt"),  # sums to 9: 5 > 4.5
    ([5, 3, 2, 0, 0, 0, 0, 0, 0, 0], None, "neutral"),  # exactly half is not a majority
    ([0, 0, 0, 0, 0, 0, 4, 0, 4, 2], None, "fear"),  # tie with unknown: fear comes first
    ([1, 1, 1, 1, 1, 5, 0, 0, 0, 0], "disgust", "disgust"),  # 5 of 5 once the five 1s are zeroed
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], None, "neutral"),  # all outliers: nothing left for majority
    ([0, 1, 0, 6, 0, 0, 0, 1, 1, 1], "sadness", "sadness"),  # 6 of 6 after zeroing
]
# Soft targets of the rows that argmax keeps: the 8 emotion votes / their sum, in FER class order.
RULE_SOFT = {
    0: {"neutral": 0.8, "happiness": 0.1, "surprise": 0.1},
    1: {"neutral": 0.4, "happiness": 0.3, "sadness": 0.1, "anger": 0.1, "disgust": 0.1},
    2: {"neutral": 0.4, "happiness": 0.4, "surprise": 0.2},
    3: {"happiness": 0.5, "anger": 0.5},
    6: {"contempt": 1.0},
    7: {"neutral": 0.5, "happiness": 0.3, "surprise": 0.2},
    8: {"fear": 1.0},
    9: {"neutral": 0.1, "happiness": 0.1, "surprise": 0.1, "sadness": 0.1, "anger": 0.1, "disgust": 0.5},
    10: {c: 0.125 for c in FER},
    11: {"happiness": 0.125, "sadness": 0.75, "contempt": 0.125},
}


@pytest.fixture(scope="module")
def rule_rows_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("ferplus_rules")
    other = [clear_votes("anger")]
    written = write_ferplus_microsoft(root, {"train": [v for v, _, _ in RULE_ROWS], "valid": other, "test": other})
    return root, written["train"]


@pytest.mark.parametrize("rule", LABEL_RULES)
def test_label_rules_on_hand_written_rows(rule_rows_dir: tuple[Path, list[str]], rule: str):
    root, files = rule_rows_dir
    # val_source="official" keeps every FER2013Train row that the rule keeps in train.
    ds = load_dataset("ferplus", root, label_rule=rule, val_source="official")
    column = 1 if rule == "majority" else 2
    expected = [(f, row[column]) for f, row in zip(files, RULE_ROWS, strict=True) if row[column] is not None]
    assert ds.train.files == [f for f, _ in expected]
    assert [FER[y] for y in ds.train.labels.tolist()] == [c for _, c in expected]
    assert ds.info["label_rule"] == rule
    if rule != "votes":
        assert ds.train.soft is None
        return
    assert ds.train.soft.dtype == torch.float32 and ds.train.soft.shape == (len(expected), len(FER))
    kept = [i for i, row in enumerate(RULE_ROWS) if row[2] is not None]
    want = torch.tensor([[RULE_SOFT[i].get(c, 0.0) for c in FER] for i in kept])
    torch.testing.assert_close(ds.train.soft, want)
    assert ds.val.soft.shape == (1, len(FER)) and ds.val.soft[0, FER.index("anger")].item() == 1.0


def test_label_rule_none_is_majority_for_microsoft(rule_rows_dir: tuple[Path, list[str]]):
    root, _ = rule_rows_dir
    natural = load_dataset("ferplus", root, val_source="official", decode=False)
    majority = load_dataset("ferplus", root, label_rule="majority", val_source="official", decode=False)
    assert natural.train.files == majority.train.files and natural.split_hash == majority.split_hash


def test_label_rule_ignored_for_cifar(cifar_dir: Path):
    a = load_dataset("cifar10", cifar_dir, decode=False)
    b = load_dataset("cifar10", cifar_dir, label_rule="votes", decode=False)
    assert a.split_hash == b.split_hash and a.info["label_rule"] is None and b.train.soft is None


# --- splits and subsets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_is_deterministic_per_seed(layout: str, request: pytest.FixtureRequest):
    a = _load(layout, request, decode=False)
    b = _load(layout, request, decode=False)
    c = _load(layout, request, decode=False, seed=7)
    assert a.split_indices == b.split_indices and a.split_hash == b.split_hash
    assert a.train.files == b.train.files and a.val.files == b.val.files
    assert a.split_indices["val"] != c.split_indices["val"] and a.split_hash != c.split_hash
    assert len(a.split_hash) >= 16 and re.fullmatch("[0-9a-f]+", a.split_hash)
    assert a.info["seed"] == 42 and c.info["seed"] == 7


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_is_stratified_80_20_and_disjoint(layout: str, request: pytest.FixtureRequest):
    ds = _load(layout, request, decode=False)
    pool = Counter(ds.train.labels.tolist()) + Counter(ds.val.labels.tolist())
    val = Counter(ds.val.labels.tolist())
    for c, n in pool.items():
        assert abs(val[c] - 0.2 * n) <= 1, (ds.classes[c], val[c], n)
    assert abs(len(ds.val) - 0.2 * sum(pool.values())) < 1
    train, valid, test = set(ds.train.files), set(ds.val.files), set(ds.test.files)
    assert len(train) == len(ds.train) and len(valid) == len(ds.val)
    assert not train & valid and not test & (train | valid)
    assert sorted(ds.split_indices["train"] + ds.split_indices["val"]) == list(range(sum(pool.values())))
    assert ds.split_indices["test"] == list(range(len(ds.test)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_subsets_are_stratified_and_keep_the_split(layout: str, request: pytest.FixtureRequest):
    full = _load(layout, request, decode=False)
    sizes = {"train": 20, "val": 8, "test": 6}
    sub = _load(layout, request, n_train=20, n_val=8, n_test=6)
    only_train = _load(layout, request, n_train=20, decode=False)
    assert only_train.split_indices["val"] == full.split_indices["val"]  # the 80/20 split does not move
    for name in sizes:
        big, small = getattr(full, name), getattr(sub, name)
        assert len(small) == sizes[name] and small.images.shape[0] == sizes[name]
        assert set(small.files) <= set(big.files)
        assert set(sub.split_indices[name]) <= set(full.split_indices[name])
        have, pool = Counter(small.labels.tolist()), Counter(big.labels.tolist())
        for c, n in pool.items():
            assert abs(have[c] - sizes[name] * n / len(big)) <= 1, (name, sub.classes[c], have[c], n)
    assert sub.info["n_train"] == 20 and sub.info["n_val"] == 8 and sub.info["n_test"] == 6
    assert sub.split_hash != full.split_hash


def test_official_val_source(fer_microsoft_dir: Path):
    ds = load_dataset("ferplus", fer_microsoft_dir, val_source="official", decode=False)
    assert all(f.startswith("FER2013Train/") for f in ds.train.files)
    assert len(ds.train) == sum(FERPLUS_TRAIN_PER_EMOTION.values())
    assert all(f.startswith("FER2013Valid/") for f in ds.val.files) and len(ds.val) == 8
    assert ds.split_indices["val"] == list(range(8)) and ds.info["val_source"] == "official"


def test_summarize(fer_kaggle_dir: Path):
    ds = load_dataset("ferplus", fer_kaggle_dir, decode=False)
    s = summarize(ds)
    assert set(s) == {"dataset", "classes", "splits", "split_hash", "label_rule", "val_source"}
    assert s["dataset"] == "ferplus" and s["classes"] == list(FER) and s["split_hash"] == ds.split_hash
    assert (s["label_rule"], s["val_source"]) == ("argmax", "split")
    for name, split in _splits(ds).items():
        assert s["splits"][name]["n"] == len(split)
        assert list(s["splits"][name]["per_class"]) == list(FER)
        assert s["splits"][name]["per_class"] == {c: split.labels.tolist().count(i) for i, c in enumerate(FER)}
    test_counts = {KAGGLE_CLASS_OF[f]: n for f, (_, n) in KAGGLE_FOLDERS.items()}
    assert s["splits"]["test"]["per_class"] == test_counts


# --- errors ----------------------------------------------------------------------------------------------------


def _small_cifar(tmp_path: Path) -> Path:
    return write_cifar_imagefolder(tmp_path / "cifar10", 5, 1)


def _small_microsoft(tmp_path: Path, **rows) -> Path:
    default = [clear_votes(e) for e in ("neutral", "happiness") for _ in range(5)]
    write_ferplus_microsoft(tmp_path / "ferplus", {"train": default, "valid": default, "test": default, **rows})
    return tmp_path / "ferplus"


def _small_kaggle(tmp_path: Path, folders: dict[str, tuple[int, int]] | None = None) -> Path:
    return write_ferplus_kaggle(tmp_path / "ferplus", folders or {f: (5, 1) for f in KAGGLE_CLASS_OF}, nested=None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cifar100"}, "name='cifar100'"),
        ({"label_rule": "soft"}, "label_rule='soft'"),
        ({"val_source": "valid"}, "val_source='valid'"),
        ({"n_train": 0}, "n_train=0"),
        ({"n_test": 2.5}, "n_test=2.5"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_bad_arguments(cifar_dir: Path, kwargs: dict, match: str):
    args = {"name": "cifar10", "data_dir": cifar_dir} | kwargs
    with pytest.raises(DataError, match=re.escape(match)):
        load_dataset(**args)


def test_missing_data_dir(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{re.escape(str(missing))}.*download=True.*extract\.sh"):
        load_dataset("cifar10", missing)
    with pytest.raises(DataError, match=rf"{re.escape(str(missing))}.*FER2013Train"):
        load_dataset("ferplus", missing)
    with pytest.raises(DataError, match="download=True works for CIFAR-10 only"):
        load_dataset("ferplus", missing, download=True)


@pytest.mark.parametrize("name", DATASETS)
def test_folder_without_a_known_layout(tmp_path: Path, name: str):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))} holds no"):
        load_dataset(name, tmp_path)


def test_data_root_instead_of_dataset_folder(tmp_path: Path):
    _small_cifar(tmp_path)
    with pytest.raises(DataError, match=r"holds cifar10/: pass that folder"):
        load_dataset("cifar10", tmp_path)


def test_missing_class_folder(tmp_path: Path):
    root = _small_cifar(tmp_path)
    shutil.rmtree(root / "test" / "cat")
    with pytest.raises(DataError, match=r"missing class folder .*test/cat"):
        load_dataset("cifar10", root, decode=False)


def test_unknown_class_folder(tmp_path: Path):
    root = _small_cifar(tmp_path)
    (root / "train" / "unicorn").mkdir()
    with pytest.raises(DataError, match=r"unknown class folder .*train/unicorn"):
        load_dataset("cifar10", root, decode=False)
    kaggle = _small_kaggle(tmp_path / "k", {**{f: (5, 1) for f in KAGGLE_CLASS_OF}, "bored": (1, 1)})
    with pytest.raises(DataError, match=r"unknown class folder .*train/bored"):
        load_dataset("ferplus", kaggle, decode=False)


def test_two_folders_for_one_class(tmp_path: Path):
    root = _small_kaggle(tmp_path, {**{f: (5, 1) for f in KAGGLE_CLASS_OF}, "happiness": (2, 1)})
    with pytest.raises(DataError, match=r"happ.*both name class 'happiness'"):
        load_dataset("ferplus", root, decode=False)


def test_corrupt_image_is_named(tmp_path: Path):
    root = _small_cifar(tmp_path)
    (root / "train" / "dog" / "0003.jpg").write_bytes(b"this is not a jpeg")
    assert len(load_dataset("cifar10", root, decode=False).train) == 40  # listing does not decode
    with pytest.raises(DataError, match=r"cannot decode image .*train/dog/0003\.jpg"):
        load_dataset("cifar10", root)


def test_images_of_different_sizes(tmp_path: Path):
    root = _small_kaggle(tmp_path)
    Image.new("L", (64, 64), 7).save(root / "test" / "sad" / "00000.png")
    with pytest.raises(DataError, match=r"test/sad/00000\.png has size"):
        load_dataset("ferplus", root)


def test_unparsable_label_csv_row(tmp_path: Path):
    root = _small_microsoft(tmp_path)
    csv_path = root / "FER2013Valid" / "label.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",x"
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(csv_path))}, line 3: cannot parse row"):
        load_dataset("ferplus", root, decode=False)


def test_label_csv_row_without_image(tmp_path: Path):
    root = _small_microsoft(tmp_path)
    victim = sorted((root / "FER2013Test").glob("*.png"))[1]
    victim.unlink()
    with pytest.raises(DataError, match=rf"line 2: image .*{victim.name} is missing"):
        load_dataset("ferplus", root, decode=False)


def test_missing_microsoft_folder(tmp_path: Path):
    root = _small_microsoft(tmp_path)
    shutil.rmtree(root / "FER2013Valid")
    with pytest.raises(DataError, match=r"missing folder .*FER2013Valid"):
        load_dataset("ferplus", root, decode=False)


def test_empty_split_after_label_rule(tmp_path: Path):
    root = _small_microsoft(tmp_path, test=[clear_votes("NF"), [4, 4, 2, 0, 0, 0, 0, 0, 0, 0]])
    with pytest.raises(DataError, match=r"FER2013Test/label\.csv: no row keeps a label under label_rule='majority'"):
        load_dataset("ferplus", root, decode=False)
    assert len(load_dataset("ferplus", root, label_rule="argmax", decode=False).test) == 1  # the tie row


def test_official_val_needs_microsoft_layout(cifar_dir: Path, fer_kaggle_dir: Path):
    for name, root in (("cifar10", cifar_dir), ("ferplus", fer_kaggle_dir)):
        with pytest.raises(DataError, match=r"val_source='official' needs FERPlus in Microsoft's layout"):
            load_dataset(name, root, val_source="official", decode=False)


@pytest.mark.parametrize("rule", ["majority", "votes"])
def test_vote_rules_need_label_csv(fer_kaggle_dir: Path, rule: str):
    with pytest.raises(DataError, match=rf"label_rule='{rule}' needs Microsoft's label\.csv"):
        load_dataset("ferplus", fer_kaggle_dir, label_rule=rule, decode=False)


def test_subset_larger_than_split(cifar_dir: Path):
    with pytest.raises(DataError, match=r"n_test=31 is more than the 30 images of the test split"):
        load_dataset("cifar10", cifar_dir, n_test=31, decode=False)


# --- real data ----------------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_cifar10_counts(real_data_root: Path):
    s = summarize(load_dataset("cifar10", real_data_root / "cifar10", decode=False))
    for name, n in (("train", 40_000), ("val", 10_000), ("test", 10_000)):
        assert s["splits"][name]["n"] == n
        assert set(s["splits"][name]["per_class"].values()) == {n // 10}


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("rule", "counts"),
    [("majority", (25_045, 3_191, 3_137)), ("argmax", (28_385, 3_555, 3_545)), ("votes", (28_385, 3_555, 3_545))],
)
def test_real_ferplus_counts(real_data_root: Path, rule: str, counts: tuple[int, int, int]):
    n_train, n_valid, n_test = counts
    split = load_dataset("ferplus", real_data_root / "ferplus", label_rule=rule, decode=False)
    assert len(split.train) + len(split.val) == n_train and len(split.test) == n_test
    assert len(split.val) == round(0.2 * n_train)
    official = load_dataset("ferplus", real_data_root / "ferplus", label_rule=rule, val_source="official", decode=False)
    assert (len(official.train), len(official.val), len(official.test)) == counts


@pytest.mark.realdata
@pytest.mark.parametrize(("name", "size"), [("cifar10", 32), ("ferplus", 48)])
def test_real_small_decoded_subset(real_data_root: Path, name: str, size: int):
    ds = load_dataset(name, real_data_root / name, n_train=40, n_val=16, n_test=16)
    for split, n in ((ds.train, 40), (ds.val, 16), (ds.test, 16)):
        assert split.images.shape == (n, 3, size, size) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64 and len(set(split.labels.tolist())) > 1
        assert int(split.images.max()) > int(split.images.min())
    if name == "ferplus":
        assert torch.equal(ds.train.images[:, 0], ds.train.images[:, 2])
    full = load_dataset(name, real_data_root / name, decode=False)
    assert np.isin(ds.split_indices["val"], full.split_indices["val"]).all()


# --- image modes: every mode Pillow opens decodes to the intended 8-bit pixels, or is refused --------------------

_RNG = np.random.default_rng(3)
_RGB = _RNG.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
_RGB[0, 0], _RGB[0, 1] = (0, 0, 0), (255, 255, 255)
_GRAY = np.arange(0, 256, 17, dtype=np.uint8).reshape(4, 4)  # 0, 17, ..., 255
_ALPHA = np.array([[0, 1, 64, 127], [128, 200, 254, 255], [255, 0, 90, 255], [17, 255, 0, 128]], dtype=np.uint8)
_WIDE = np.array([[0, 1, 128, 129], [256, 257, 385, 386], [32767, 32768, 40000, 65278], [65279, 65534, 65535, 12345]])
_PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [37, 99, 201]], dtype=np.uint8)
_INDEX = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 3, 3], [0, 2, 0, 2]], dtype=np.uint8)


def _on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The test's own compositing on white: c * a + 255 * (1 - a), a in 0..1, rounded."""
    a = alpha.astype(np.float64)[..., None] / 255 if colour.ndim == 3 else alpha / 255
    return np.round(colour * a + 255 * (1 - a))


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, the gray PIL's convert("L") documents."""
    return np.round(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))


def _palette_image(index: np.ndarray = _INDEX) -> Image.Image:
    img = Image.frombytes("P", index.shape[::-1], index.tobytes())
    img.putpalette(_PALETTE.flatten().tolist())
    return img


def _pgm16(path: Path, values: np.ndarray, maxval: int, channels: int = 1) -> None:
    magic = b"P5" if channels == 1 else b"P6"
    h, w = values.shape[:2]
    path.write_bytes(magic + f"\n{w} {h}\n{maxval}\n".encode() + values.astype(">u2").tobytes())


def _case_1(d: Path):
    bits = _GRAY > 100
    Image.fromarray(bits).save(d / "a.png")
    return d / "a.png", "1", np.where(bits, 255, 0), 0


def _case_L(d: Path):
    Image.fromarray(_GRAY).save(d / "a.png")
    return d / "a.png", "L", _GRAY, 0


def _case_L_transparency_key(d: Path):  # PNG tRNS on gray: pixels of value 34 are fully transparent
    Image.fromarray(_GRAY).save(d / "a.png", transparency=34)
    return d / "a.png", "L", np.where(_GRAY == 34, 255, _GRAY), 0


def _case_LA(d: Path):
    Image.merge("LA", [Image.fromarray(_GRAY), Image.fromarray(_ALPHA)]).save(d / "a.png")
    return d / "a.png", "LA", _on_white(_GRAY, _ALPHA), 0


def _case_P(d: Path):
    _palette_image().save(d / "a.png")
    return d / "a.png", "P", _PALETTE[_INDEX], 0


def _case_P_transparent_index_png(d: Path):
    _palette_image().save(d / "a.png", transparency=1)
    return d / "a.png", "P", np.where((_INDEX == 1)[..., None], 255, _PALETTE[_INDEX]), 0


def _case_P_transparent_index_gif(d: Path):
    _palette_image().save(d / "a.gif", transparency=2)
    return d / "a.gif", "P", np.where((_INDEX == 2)[..., None], 255, _PALETTE[_INDEX]), 0


def _case_P_palette_alpha(d: Path):  # PNG tRNS with one alpha per palette entry
    alphas = np.array([255, 128, 0, 60], dtype=np.uint8)
    _palette_image().save(d / "a.png", transparency=alphas.tobytes())
    return d / "a.png", "P", _on_white(_PALETTE[_INDEX], alphas[_INDEX]), 0


def _case_PA(d: Path):
    img = _palette_image().convert("PA")
    img.putalpha(Image.fromarray(_ALPHA))
    img.save(d / "a.tif")
    return d / "a.tif", "PA", _on_white(_PALETTE[_INDEX], _ALPHA), 0


def _case_RGB(d: Path):
    Image.fromarray(_RGB).save(d / "a.png")
    return d / "a.png", "RGB", _RGB, 0


def _case_RGB_transparency_key(d: Path):
    key = tuple(int(v) for v in _RGB[2, 1])
    Image.fromarray(_RGB).save(d / "a.png", transparency=key)
    return d / "a.png", "RGB", np.where((_RGB == key).all(-1)[..., None], 255, _RGB), 0


def _case_RGB_16bit_ppm(d: Path):
    values = (_RGB.astype(np.int64) * 1000 // 255)  # 0..1000 in a 16-bit PPM with maxval 1000
    _pgm16(d / "a.ppm", values, 1000, channels=3)
    return d / "a.ppm", "RGB", np.round(values * 255 / 1000), 1


def _case_RGBA(d: Path):
    Image.fromarray(np.dstack([_RGB, _ALPHA])).save(d / "a.png")
    return d / "a.png", "RGBA", _on_white(_RGB, _ALPHA), 0


def _case_RGBA_webp(d: Path):
    Image.fromarray(np.dstack([_RGB, _ALPHA])).save(d / "a.webp", lossless=True, exact=True)
    return d / "a.webp", "RGBA", _on_white(_RGB, _ALPHA), 0


def _cmyk_pixels() -> np.ndarray:
    cmyk = _RNG.integers(0, 256, size=(4, 4, 4), dtype=np.uint8)
    cmyk[0, 0], cmyk[0, 1] = (0, 0, 0, 0), (255, 255, 255, 255)
    return cmyk


def _cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    return np.round((255 - c) * (255 - k) / 255)


def _case_CMYK_tiff(d: Path):
    cmyk = _cmyk_pixels()
    Image.frombytes("CMYK", (4, 4), cmyk.tobytes()).save(d / "a.tif")
    return d / "a.tif", "CMYK", _cmyk_to_rgb(cmyk), 1


def _case_CMYK_jpeg(d: Path):  # Adobe's inverted CMYK JPEG; two flat, block-aligned halves survive JPEG closely
    cmyk = np.zeros((16, 16, 4), dtype=np.uint8)
    cmyk[:8], cmyk[8:] = (10, 200, 30, 40), (0, 0, 0, 0)
    Image.frombytes("CMYK", (16, 16), cmyk.tobytes()).save(d / "a.jpg", quality=100, subsampling=0)
    return d / "a.jpg", "CMYK", _cmyk_to_rgb(cmyk), 2


def _case_YCbCr(d: Path):
    ycc = _RNG.integers(16, 236, size=(4, 4, 3), dtype=np.uint8)
    Image.frombytes("YCbCr", (4, 4), ycc.tobytes()).save(d / "a.tif")
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    r, g, b = y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)
    rgb = np.stack([r, g, b], -1)  # JFIF's YCbCr -> RGB
    return d / "a.tif", "YCbCr", np.clip(np.round(rgb), 0, 255), 1


def _case_I16_png(d: Path):
    Image.fromarray(_WIDE.astype(np.uint16)).save(d / "a.png")
    return d / "a.png", "I;16", np.round(_WIDE * 255 / 65535), 0


def _case_I16_tiff(d: Path):
    Image.fromarray(_WIDE.astype(np.uint16)).save(d / "a.tif")
    return d / "a.tif", "I;16", np.round(_WIDE * 255 / 65535), 0


def _case_I16B_tiff(d: Path):
    Image.fromarray(_WIDE.astype(">u2")).save(d / "a.tif")
    return d / "a.tif", "I;16B", np.round(_WIDE * 255 / 65535), 0


def _case_I_pgm16(d: Path):  # Pillow opens a 16-bit PGM as I, stretched from its maxval to 0..65535
    values = _WIDE * 1000 // 65535
    _pgm16(d / "a.pgm", values, 1000)
    return d / "a.pgm", "I", np.round(values * 255 / 1000), 1


def _case_I_in_8bit_range(d: Path):
    Image.fromarray(_GRAY.astype(np.int32)).save(d / "a.tif")
    return d / "a.tif", "I", _GRAY, 0


def _case_F_whole_8bit_values(d: Path):
    Image.fromarray(_GRAY.astype(np.float32)).save(d / "a.tif")
    return d / "a.tif", "F", _GRAY, 0


DECODED_MODES = [
    _case_1, _case_L, _case_L_transparency_key, _case_LA, _case_P, _case_P_transparent_index_png,
    _case_P_transparent_index_gif, _case_P_palette_alpha, _case_PA, _case_RGB, _case_RGB_transparency_key,
    _case_RGB_16bit_ppm, _case_RGBA, _case_RGBA_webp, _case_CMYK_tiff, _case_CMYK_jpeg, _case_YCbCr,
    _case_I16_png, _case_I16_tiff, _case_I16B_tiff, _case_I_pgm16, _case_I_in_8bit_range, _case_F_whole_8bit_values,
]


@pytest.mark.parametrize("case", DECODED_MODES, ids=lambda c: c.__name__.removeprefix("_case_"))
def test_read_image_decodes_each_mode_to_intended_pixels(tmp_path: Path, case):
    path, mode, expected, tol = case(tmp_path)
    with Image.open(path) as im:
        assert im.mode == mode  # the file really exercises that mode
    expected = np.asarray(expected, dtype=np.float64)
    one_channel = expected.ndim == 2
    colour, gray = read_image(path, gray=False), read_image(path, gray=True)
    assert colour.dtype == np.uint8 and colour.shape == (3, *expected.shape[:2])
    assert gray.dtype == np.uint8 and gray.shape == expected.shape[:2]
    want_colour = np.stack([expected] * 3) if one_channel else expected.transpose(2, 0, 1)
    assert np.abs(colour - want_colour).max() <= tol, (colour, want_colour)
    if one_channel:
        assert np.abs(gray - expected).max() <= tol and np.array_equal(gray, colour[0])
    else:  # gray of a colour image: the luma of its (composited) colours, within PIL's rounding
        assert np.abs(gray - _luma(expected)).max() <= tol + 1, (gray, _luma(expected))


def test_read_image_16bit_gray_is_scaled_not_clipped(tmp_path: Path):
    """The issue's example: PIL's convert("L") clips a 16-bit PNG to mostly white."""
    ramp = np.linspace(0, 65535, 48 * 48).round().astype(np.uint16).reshape(48, 48)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as im:
        clipped = np.asarray(im.convert("L"))
    assert (clipped == 255).mean() > 0.99  # what the old reader returned
    gray = read_image(tmp_path / "ramp.png", gray=True)
    assert np.array_equal(gray, np.round(ramp / 257).astype(np.uint8))
    assert gray.min() == 0 and gray.max() == 255 and abs(float(gray.mean()) - 127.5) < 1


@pytest.mark.parametrize(
    ("name", "pixels", "match"),
    [
        pytest.param("int_above_255", np.array([[0, 300], [70000, 5]], dtype=np.int32),
                     r"32-bit integer pixels \(PIL mode I\) with values 0\.\.70000", id="int-above-255"),
        pytest.param("int_negative", np.array([[-5, 3], [0, 255]], dtype=np.int32),
                     r"mode I\) with values -5\.\.255", id="int-negative"),
        pytest.param("float_unit_range", np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32),
                     r"32-bit float pixels \(PIL mode F\) with values 0\.\.1, not all whole numbers", id="float-0-1"),
        pytest.param("float_above_255", np.array([[0.0, 256.0], [3.0, 4.0]], dtype=np.float32),
                     r"mode F\) with values 0\.\.256", id="float-above-255"),
        pytest.param("float_nan", np.array([[0.0, np.nan], [3.0, 4.0]], dtype=np.float32),
                     r"mode F\).*not all whole numbers", id="float-nan"),
    ],
)
def test_read_image_refuses_unscaled_wide_pixels(tmp_path: Path, name: str, pixels: np.ndarray, match: str):
    path = tmp_path / f"{name}.tif"
    Image.fromarray(pixels).save(path)
    for gray in (True, False):
        with pytest.raises(DataError, match=rf"image {re.escape(str(path))} has .*{match}.*convert the file to 8-bit"):
            read_image(path, gray)


def test_read_image_refuses_lab(tmp_path: Path):
    path = tmp_path / "lab.tif"
    Image.frombytes("LAB", (2, 1), bytes([50, 10, 20, 200, 128, 128])).save(path)
    with pytest.raises(DataError, match=rf"image {re.escape(str(path))} has PIL mode LAB.*convert the file to RGB"):
        read_image(path, gray=False)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "UnidentifiedImageError"),
        (b"just text, not an image\n", "UnidentifiedImageError"),
        ("truncated", "truncated"),
    ],
    ids=["empty", "text", "truncated-png"],
)
def test_read_image_names_undecodable_file(tmp_path: Path, content, match: str):
    path = tmp_path / "x.png"
    if content == "truncated":
        Image.fromarray(_RNG.integers(0, 256, size=(64, 64), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=rf"cannot decode image {re.escape(str(path))} \(.*{match}.*replace the file"):
        read_image(path, gray=True)


# --- data --check ------------------------------------------------------------------------------------------------


def _pixel_groups(files: list[str]) -> list[set[str]]:
    """Files whose synthetic images are identical (same flat value, same size): groups of two or more."""
    by_value: dict[int, set[str]] = {}
    for f in files:
        by_value.setdefault(pixel_value(f), set()).add(f)
    return [g for g in by_value.values() if len(g) > 1]


def _kaggle_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def test_check_clean_dataset(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = _small_kaggle(tmp_path)
    files = _kaggle_files(root)
    check = check_images("ferplus", root)
    assert (check.n_images, check.bad, check.layout, check.label_rule) == (len(files), [], "kaggle", "argmax")
    # Flat synthetic images of equal value are identical: the check finds exactly those groups.
    groups = _pixel_groups(files)
    assert groups, "the synthetic data should hold some identical images"
    assert sorted(map(sorted, map(set, check.duplicates))) == sorted(map(sorted, groups))
    across = [g for g in groups if len({f.split("/")[0] for f in g}) > 1]
    assert sorted(map(sorted, map(set, check.across_splits))) == sorted(map(sorted, across))

    assert cli.main(["data", "--check", "--dataset", "ferplus", "--data-dir", str(root)]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert not [line for line in out if line.startswith("bad")]
    assert out[-1].startswith("no checksum list (SHA256SUMS): ") and "add --record" in out[-1]
    assert out[-2] == (
        f"checked {len(files)} images of ferplus in {root} (kaggle layout, label rule argmax): 0 bad; "
        f"{len(groups)} groups of identical images, {len(across)} of them across splits"
    )
    assert len([line for line in out if line.startswith("same pixels in two splits")]) == min(len(across), 10)
    assert "checking ferplus" in captured.err  # the tqdm bar


def test_check_lists_each_bad_file_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = _small_kaggle(tmp_path)
    truncated, text, big = root / "train/happy/00002.png", root / "test/sad/00000.png", root / "train/fear/00001.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    text.write_text("this is a text file, not a PNG\n")
    Image.new("L", (64, 64), 7).save(big)
    n = len(_kaggle_files(root))

    check = check_images("ferplus", root)
    # in listing order: train before test, classes in FERPlus order (fear before happiness)
    assert [f for f, _ in check.bad] == ["train/fear/00001.png", "train/happy/00002.png", "test/sad/00000.png"]
    reasons, text_rel = dict(check.bad), "test/sad/00000.png"
    assert re.search(rf"cannot decode image {re.escape(str(truncated))} \(", reasons["train/happy/00002.png"])
    assert re.search(rf"cannot decode image {re.escape(str(text))} \(UnidentifiedImageError", reasons[text_rel])
    assert reasons["train/fear/00001.png"].startswith("size 64x64 (WxH) differs from the 48x48 of")

    assert cli.main(["data", "--check", "--dataset", "ferplus", "--data-dir", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("bad")] == [f"bad  {f}  {r}" for f, r in check.bad]
    assert re.fullmatch(rf"checked {n} images of ferplus in .*: 3 bad; .*", out[-2])

    assert cli.main(["data", "--check", "--json", "--dataset", "ferplus", "--data-dir", str(root)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == n and {b["file"]: b["reason"] for b in report["bad"]} == reasons


def test_check_microsoft_layout_includes_unused_valid_folder(tmp_path: Path):
    root = _small_microsoft(tmp_path)
    victim = sorted((root / "FER2013Valid").glob("*.png"))[4]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    ds = load_dataset("ferplus", root, decode=False)  # val_source="split": FER2013Valid is unused
    assert not [f for s in (ds.train, ds.val, ds.test) for f in s.files if f.startswith("FER2013Valid/")]
    check = check_images("ferplus", root, label_rule="argmax")
    assert check.n_images == 30 and check.label_rule == "argmax"
    assert [f for f, _ in check.bad] == [f"FER2013Valid/{victim.name}"]
    assert str(victim) in check.bad[0][1]


def test_check_torchvision_pickles(tmp_path: Path, fake_torchvision_cifar: None):
    write_cifar_pickles(tmp_path / "cifar")
    check = check_images("cifar10", tmp_path / "cifar")
    assert (check.layout, check.n_images, check.bad, check.duplicates) == ("torchvision", 130, [], [])


def test_check_refuses_bad_arguments_and_layouts(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(DataError, match=r"label_rule='soft'"):
        check_images("ferplus", tmp_path, label_rule="soft")
    missing = tmp_path / "nowhere"
    assert cli.main(["data", "--check", "--dataset", "cifar10", "--data-dir", str(missing)]) == 2
    assert f"data_dir {missing} does not exist" in capsys.readouterr().err


# --- the checksum list: bytes that still decode, but to other pixels -------------------------------------------------


def _rot_one_bit(path: Path) -> None:
    """Flip one bit in the middle of a JPEG's scan data: it still decodes, to other pixels (bit rot)."""
    raw = bytearray(path.read_bytes())
    start = raw.find(b"\xff\xda")
    raw[start + (len(raw) - start) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_recorded_checksum_list_catches_bit_rot_that_decodes_without_an_error(tmp_path: Path, capsys):
    root = write_cifar_imagefolder(tmp_path / "cifar10", 3, 2)
    assert cli.main(["data", "--check", "--record", "--dataset", "cifar10", "--data-dir", str(root)]) == 0
    assert f"recorded {root / CHECKSUMS}" in capsys.readouterr().out
    listed = (root / CHECKSUMS).read_text().splitlines()
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    assert [line.split("  ", 1)[1] for line in listed] == images  # sha256sum's format, every image
    assert listed[0].split("  ")[0] == hashlib.sha256((root / images[0]).read_bytes()).hexdigest()
    rotten = root / "test/bird/0001.jpg"
    before = read_image(rotten, gray=False)
    _rot_one_bit(rotten)
    assert np.abs(read_image(rotten, gray=False).astype(int) - before).mean() > 1  # decodes, to other pixels

    check = check_images("cifar10", root)
    assert [f for f, _ in check.bad] == ["test/bird/0001.jpg"] and "differ from SHA256SUMS" in check.bad[0][1]
    assert check.checksums == f"{len(images)} files of SHA256SUMS"
    # a run reads the rotten image: refused before any compute, naming it; a run that does not read it goes on
    with pytest.raises(DataError, match=rf"1 image\(s\) of the cifar10 test split do not match .*SHA256SUMS: "
                                        rf"{re.escape(str(rotten))}: its bytes differ"):
        load_dataset("cifar10", root)
    assert load_dataset("cifar10", root, decode=False).test.files  # listing alone reads no image bytes
    assert cli.main(["data", "--check", "--dataset", "cifar10", "--data-dir", str(root)]) == 1
    assert "bad  test/bird/0001.jpg  its bytes differ from SHA256SUMS" in capsys.readouterr().out


def test_the_checksum_list_names_an_image_added_or_gone_and_a_malformed_line(tmp_path: Path, capsys):
    root = write_cifar_imagefolder(tmp_path / "cifar10", 3, 2)
    check_and_record = ["data", "--check", "--record", "--dataset", "cifar10", "--data-dir", str(root)]
    assert cli.main(check_and_record) == 0
    shutil.copy(root / "train/cat/0000.jpg", root / "train/cat/0099.jpg")  # added after the list
    (root / "test/ship/0000.jpg").unlink()  # gone
    bad = dict(check_images("cifar10", root).bad)
    assert set(bad) == {"train/cat/0099.jpg", "test/ship/0000.jpg"}
    assert "not in SHA256SUMS" in bad["train/cat/0099.jpg"] and "cannot be read" in bad["test/ship/0000.jpg"]
    with pytest.raises(DataError, match=r"train/cat/0099.jpg: not in SHA256SUMS"):
        load_dataset("cifar10", root)
    capsys.readouterr()
    (root / "train/truck/0000.jpg").write_text("not a JPEG")  # a bad file: the list is not written over it
    assert cli.main(check_and_record) == 2
    assert "not recording" in capsys.readouterr().err
    (root / "train/truck/0000.jpg").unlink()
    assert cli.main(check_and_record) == 0 and check_images("cifar10", root).bad == []  # recorded anew
    (root / CHECKSUMS).write_text((root / CHECKSUMS).read_text() + "d41d8cd9  train/cat/0000.jpg\n")
    with pytest.raises(DataError, match=r"SHA256SUMS, line \d+: .* is not '<64 hex digits>  <file>'"):
        load_dataset("cifar10", root)
    assert cli.main(["data", "--record", "--dataset", "cifar10", "--data-dir", str(root)]) == 2
    assert "add --check" in capsys.readouterr().err


def test_a_recorded_label_csv_that_changed_is_refused(tmp_path: Path, capsys):
    root = _small_microsoft(tmp_path)
    assert cli.main(["data", "--check", "--record", "--dataset", "ferplus", "--data-dir", str(root)]) == 0
    labels = root / "FER2013Test" / "label.csv"
    assert "  FER2013Test/label.csv" in (root / CHECKSUMS).read_text()
    labels.write_text(labels.read_text().replace(",8,", ",7,", 1))  # one vote less: still a valid row
    with pytest.raises(DataError, match=rf"{re.escape(str(labels))}: its bytes differ from SHA256SUMS"):
        load_dataset("ferplus", root)


def test_no_checksum_list_for_torchvisions_pickles(tmp_path: Path, fake_torchvision_cifar: None, capsys):
    write_cifar_pickles(tmp_path / "cifar")
    assert cli.main(["data", "--check", "--record", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar")]) == 2
    assert "torchvision checks itself" in capsys.readouterr().err and not (tmp_path / "cifar" / CHECKSUMS).exists()


# --- the same image twice: in one label.csv, or in two splits ------------------------------------------------------


def test_label_csv_listing_an_image_twice(tmp_path: Path):
    root = _small_microsoft(tmp_path)
    csv_path = root / "FER2013Train" / "label.csv"
    lines = csv_path.read_text().splitlines()
    name = lines[3].split(",")[0]
    # The repeat is refused even when the label rule would drop it (an NF vote row).
    csv_path.write_text("\n".join([*lines, f'{name},"(0, 0, 48, 48)",' + ",".join(map(str, clear_votes("NF")))]) + "\n")
    pattern = rf"{re.escape(str(csv_path))} lists image '{name}' twice, on lines 4 and 11.*delete one of the two rows"
    for rule in LABEL_RULES:
        with pytest.raises(DataError, match=pattern):
            load_dataset("ferplus", root, label_rule=rule, decode=False)
    with pytest.raises(DataError, match=pattern):
        check_images("ferplus", root)


def test_image_name_in_two_folders_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = _small_microsoft(tmp_path)
    test_csv, train_csv = root / "FER2013Test" / "label.csv", root / "FER2013Train" / "label.csv"
    row = test_csv.read_text().splitlines()[1]
    name = row.split(",")[0]
    shutil.copy(root / "FER2013Test" / name, root / "FER2013Train" / name)
    train_csv.write_text(train_csv.read_text() + row + "\n")
    pattern = (
        rf"image name '{name}' is listed both in {re.escape(str(train_csv))} \(line 11\) and in "
        rf"{re.escape(str(test_csv))} \(line 2\).*train/test leakage\); remove it from one of the two folders"
    )
    for val_source in ("split", "official"):
        with pytest.raises(DataError, match=pattern):
            load_dataset("ferplus", root, val_source=val_source, decode=False)
    assert cli.main(["data", "--check", "--dataset", "ferplus", "--data-dir", str(root)]) == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_class_folders_may_reuse_a_file_name_across_splits(cifar_dir: Path):
    """Class-folder copies number files per split (the real CIFAR-10 copy has train/cat/0000.jpg and
    test/cat/0000.jpg): a shared name is not a shared image, so only identical pixels (data --check) tell."""
    ds = load_dataset("cifar10", cifar_dir, decode=False)
    names = lambda files: {f.split("/", 1)[1] for f in files}  # noqa: E731
    assert names(ds.train.files + ds.val.files) & names(ds.test.files)


@pytest.mark.parametrize("votes, total", [([40, 0, 0, 0, 0, 0, 0, 0, 0, 0], 40), ([0] * 10, 0)])
def test_a_label_row_whose_votes_cannot_be_ten_annotators_is_refused(tmp_path: Path, votes: list[int], total: int):
    rows = {"train": [clear_votes(e) for e in FERPLUS_TRAIN_PER_EMOTION for _ in range(3)] + [votes],
            "valid": [clear_votes(e) for e in FERPLUS_TRAIN_PER_EMOTION],
            "test": [clear_votes(e) for e in FERPLUS_TRAIN_PER_EMOTION]}
    root = tmp_path / "ferplus"
    write_ferplus_microsoft(root, rows)
    with pytest.raises(DataError, match=rf"FER2013Train.label\.csv, line 25: .*its votes sum to {total}; FERPlus has "
                                        r"10 annotators per image"):
        load_dataset("ferplus", root)
