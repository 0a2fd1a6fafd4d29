"""transferstudy.data under arbitrary input (hypothesis): random bytes as image files, random rows as label.csv.

The property: the loader returns well-formed uint8 pixels or raises ``DataError`` naming the file;
no other exception escapes. Example counts are kept small so the file runs in a few seconds.
"""

from __future__ import annotations

import csv
import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image
from synthetic import clear_votes, write_ferplus_microsoft

from transferstudy.data import CLASSES, LABEL_RULES, DataError, load_dataset, read_image


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


_rng = np.random.default_rng(0)
_GRAY = Image.fromarray(_rng.integers(0, 256, size=(8, 8), dtype=np.uint8))
_RGBA = Image.fromarray(_rng.integers(0, 256, size=(8, 8, 4), dtype=np.uint8))
_PAL = _GRAY.convert("P")
# Small valid files of the formats and modes read_image handles; hypothesis corrupts them.
SEEDS = {
    ".png": [_encoded(_GRAY, "PNG"), _encoded(_RGBA, "PNG"), _encoded(_PAL, "PNG", transparency=3),
             _encoded(Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000), "PNG")],
    ".jpg": [_encoded(_GRAY, "JPEG"), _encoded(_RGBA.convert("CMYK"), "JPEG")],
    ".gif": [_encoded(_PAL, "GIF", transparency=1)],
    ".tif": [_encoded(_RGBA.convert("CMYK"), "TIFF"), _encoded(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF"),
             _encoded(Image.fromarray(np.full((8, 8), 300, np.int32)), "TIFF")],
    ".bmp": [_encoded(_RGBA.convert("RGB"), "BMP")],
    ".webp": [_encoded(_RGBA, "WEBP", lossless=True)],
    ".pgm": [b"P5\n8 8\n1000\n" + (np.arange(64) * 15).astype(">u2").tobytes()],
}
_SEED_LIST = [(ext, data) for ext, blobs in SEEDS.items() for data in blobs]
_MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM", b"P5\n", b"P6\n",
          b"RIFF\x00\x00\x00\x00WEBPVP8L", b"\x00\x00\x01\x00"]


@st.composite
def corrupted(draw) -> tuple[str, bytes]:
    ext, data = draw(st.sampled_from(_SEED_LIST))
    buf = bytearray(data)
    for pos, value in draw(st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(0, 255)), max_size=6)):
        buf[pos] = value
    cut = draw(st.integers(0, len(buf)))
    return ext, bytes(buf[:cut] if draw(st.booleans()) else buf)


image_files = st.one_of(
    st.tuples(st.sampled_from([".png", ".jpg", ".bin"]), st.binary(max_size=300)),
    st.tuples(st.sampled_from(list(SEEDS)), st.builds(bytes.__add__, st.sampled_from(_MAGIC), st.binary(max_size=200))),
    corrupted(),
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("random_images")


@settings(max_examples=300, deadline=None)
@given(file=image_files, gray=st.booleans())
def test_read_image_gives_pixels_or_data_error(workdir: Path, file: tuple[str, bytes], gray: bool):
    ext, content = file
    path = workdir / f"img{ext}"
    path.write_bytes(content)
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1_000_000  # a corrupted header claiming a huge size is refused, not allocated
    try:
        with warnings.catch_warnings():  # PIL warns about corrupt metadata it skips, and about large images
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pixels = read_image(path, gray)
    except DataError as e:
        assert str(path) in str(e)
        kind = str(e).split(" (")[1].split(":")[0] if "cannot decode" in str(e) else "refused mode or range"
        event(f"DataError: {kind}")
        return
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    event("decoded")
    assert pixels.dtype == np.uint8 and pixels.size > 0
    assert pixels.ndim == 2 if gray else (pixels.ndim == 3 and pixels.shape[0] == 3)


# --- label.csv ---------------------------------------------------------------------------------------------------

_N_TRAIN_IMAGES = 6
_CSV_ERRORS = ("cannot parse row", "twice", "listed both", "is missing", "no row keeps", "not a readable", "is empty")


@pytest.fixture(scope="module")
def fer_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    """Microsoft's layout with valid Valid/Test folders; each example rewrites FER2013Train/label.csv."""
    root = tmp_path_factory.mktemp("random_label_csv")
    rows = [clear_votes(e) for e in ("neutral", "happiness", "surprise", "anger", "fear", "sadness")]
    written = write_ferplus_microsoft(root, {"train": rows[:_N_TRAIN_IMAGES], "valid": rows, "test": rows})
    train_names = [f.split("/")[1] for f in written["train"]]
    test_names = [f.split("/")[1] for f in written["test"]]
    # A test image's file also in FER2013Train: a row naming it must be refused as an image in two splits.
    shutil.copy(root / "FER2013Test" / test_names[0], root / "FER2013Train" / test_names[0])
    return root, train_names, test_names


def _fields(names: list[str]):
    return st.one_of(
        st.sampled_from(names),
        st.integers(-2, 12).map(str),
        st.just('"(0, 0, 48, 48)"'),
        st.text(max_size=6),
        st.sampled_from(["", " 3 ", "1e2", "٣", "1_0", "0x1", "+4", "99999999999999999999"]),
    )


def _rows(names: list[str]):
    vote_rows = st.builds(
        lambda name, votes: [name, "(0, 0, 48, 48)", *map(str, votes)],
        st.sampled_from(names), st.lists(st.integers(0, 10), min_size=10, max_size=10),
    )
    return st.lists(st.one_of(vote_rows, st.lists(_fields(names), max_size=14)), max_size=12)


def _csv_text(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


@st.composite
def label_csv(draw, names: list[str]) -> bytes:
    kind = draw(st.sampled_from(["near-valid", "rows", "text", "bytes"]))
    if kind == "near-valid":  # each name once, vote counts 0..10, perhaps one cell replaced
        unique = draw(st.lists(st.sampled_from(names), unique=True, min_size=1))
        rows = [[n, "(0, 0, 48, 48)", *map(str, draw(st.lists(st.integers(0, 10), min_size=10, max_size=10)))]
                for n in unique]
        if draw(st.booleans()):
            r = draw(st.integers(0, len(rows) - 1))
            rows[r][draw(st.integers(0, 11))] = draw(_fields(names))
        return _csv_text(rows).encode()
    if kind == "rows":
        return _csv_text(draw(_rows(names))).encode()
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    return draw(st.binary(max_size=200))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), rule=st.sampled_from(LABEL_RULES))
def test_label_csv_parser_gives_a_dataset_or_data_error(fer_root, data, rule: str):
    root, train_names, test_names = fer_root
    content = data.draw(label_csv(train_names + test_names[:2]))
    (root / "FER2013Train" / "label.csv").write_bytes(content)
    try:
        ds = load_dataset("ferplus", root, label_rule=rule, val_source="official", decode=False)
    except DataError as e:
        assert str(root) in str(e)
        event(f"DataError: {next((k for k in _CSV_ERRORS if k in str(e)), str(e))}")
        return
    event("loaded")
    listed = {f"FER2013Train/{n}" for n in train_names}
    assert set(ds.train.files) <= listed and len(set(ds.train.files)) == len(ds.train.files)
    assert ds.train.labels.min() >= 0 and ds.train.labels.max() < len(CLASSES["ferplus"])
    if rule == "votes":
        assert np.allclose(ds.train.soft.sum(1).numpy(), 1.0)
