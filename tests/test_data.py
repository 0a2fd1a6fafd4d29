"""transferstudy.data: layouts, label rules, splits, subsets, decoding and errors, on synthetic and real data."""

from __future__ import annotations

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

from transferstudy.data import CLASSES, DATASETS, LABEL_RULES, DataError, DatasetSplits, load_dataset, summarize

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
