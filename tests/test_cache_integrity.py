"""The feature cache's checksum records: damaged files are detected, reported, deleted and recomputed.

A tiny convolution stands in for the backbone and counts the images it sees, so each test shows
whether the cache was used or the features were computed again.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from transferstudy import features

N = 5


class Backbone(nn.Module):
    """A 3 -> 2 channel 3x3 convolution (outputs [N, 2, 6, 6] on 8x8 images) counting its input images."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3)
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.conv(x)

    def take(self) -> int:
        n, self.images = self.images, 0
        return n


def scale(batch: torch.Tensor, train: bool) -> torch.Tensor:
    return batch.float() / 255


def split(n: int = N) -> SimpleNamespace:
    g = torch.Generator().manual_seed(1)
    return SimpleNamespace(images=torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                           labels=torch.zeros(n, dtype=torch.int64), soft=None, files=[f"{i}.png" for i in range(n)])


class Cache:
    """One cache folder, one key, one backbone; ``get()`` is the feature-cache call under test."""

    def __init__(self, root: Path) -> None:
        self.root, self.net, self.lines = root, Backbone(), []
        self.npy = root / "features" / "k.npy"
        self.record = features.record_path(root, "k")

    def get(self, data: SimpleNamespace | None = None) -> np.ndarray:
        return features.activations(self.net, data or split(), preprocess=scale, batch_size=2, device="cpu",
                                    cache_dir=self.root, key="k", log=self.lines.append)

    def damaged_lines(self) -> list[str]:
        return [line for line in self.lines if "damaged" in line]


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path)


def record_for(payload: bytes, shape: tuple[int, ...], dtype: str = "float16") -> bytes:
    """A record as the cache writes it, for ``payload``."""
    return json.dumps({"format": 1, "file": "k.npy", "sha256": hashlib.sha256(payload).hexdigest(),
                       "bytes": len(payload), "shape": list(shape), "dtype": dtype}).encode()


def test_an_intact_cache_is_read_back_without_the_backbone(cache):
    first = cache.get()
    assert cache.net.take() == N and first.shape == (N, 2, 6, 6) and first.dtype == np.float32
    record = json.loads(cache.record.read_text())
    assert record["sha256"] == features.file_digest(cache.npy)  # the same as `sha256sum k.npy`
    assert record["bytes"] == cache.npy.stat().st_size
    assert (record["shape"], record["dtype"]) == ([N, 2, 6, 6], "float16")
    assert sorted(p.name for p in cache.npy.parent.iterdir()) == ["k.npy"]  # the record lives elsewhere

    again = cache.get()
    assert cache.net.take() == 0
    assert type(again) is np.ndarray and again.dtype == np.float32  # a plain in-memory array, no memmap
    np.testing.assert_array_equal(again, first)
    assert cache.lines[-1] == "feature cache hit: k.npy" and not cache.damaged_lines()


def _truncate(c: Cache) -> None:
    c.npy.write_bytes(c.npy.read_bytes()[:-100])


def _flip_one_byte(c: Cache) -> None:
    data = bytearray(c.npy.read_bytes())
    data[-7] ^= 0x01  # one bit of one stored value: same size, same header
    c.npy.write_bytes(bytes(data))


def _other_shape_and_dtype(c: Cache) -> None:
    np.save(c.npy, np.ones((N, 72), dtype=np.float32))


def _no_record(c: Cache) -> None:  # also what a cache written before the records existed looks like
    c.record.unlink()


def _unreadable_record(c: Cache) -> None:
    c.record.write_text('{"format": 1, "sha256": ')


def _record_disagrees_with_header(c: Cache) -> None:
    # The bytes match the record's hash and size, but the record describes another array.
    payload = c.npy.read_bytes()
    c.record.write_bytes(record_for(payload, (N, 72)))


def _consistent_pair_for_another_split(c: Cache) -> None:
    # An intact file and record, but with 4 rows where the split has 5 images.
    buf = io.BytesIO()
    np.save(buf, np.zeros((N - 1, 2, 6, 6), dtype=np.float16))
    c.npy.write_bytes(buf.getvalue())
    c.record.write_bytes(record_for(buf.getvalue(), (N - 1, 2, 6, 6)))


def _array_file_gone(c: Cache) -> None:
    c.npy.unlink()


DAMAGE = {"truncated": (_truncate, "bytes, its record says"),
          "one byte flipped": (_flip_one_byte, "sha256"),
          "other shape and dtype": (_other_shape_and_dtype, "record says"),
          "no checksum record": (_no_record, "no checksum record"),
          "unreadable record": (_unreadable_record, "unreadable"),
          "record disagrees with header": (_record_disagrees_with_header, "holds float16 (5, 2, 6, 6)"),
          "consistent pair for another split": (_consistent_pair_for_another_split, "4 rows"),
          "array file gone, record left": (_array_file_gone, "missing")}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_file_is_reported_deleted_and_recomputed(cache, damage):
    harm, reason = DAMAGE[damage]
    first = cache.get()
    cache.net.take()
    intact, record = cache.npy.read_bytes(), cache.record.read_bytes()

    harm(cache)
    again = cache.get()
    assert cache.net.take() == N  # computed again, not read
    np.testing.assert_array_equal(again, first)
    [line] = cache.damaged_lines()
    assert str(cache.npy) in line and reason in line, line
    assert cache.npy.read_bytes() == intact and cache.record.read_bytes() == record  # replaced by a good pair

    np.testing.assert_array_equal(cache.get(), first)
    assert cache.net.take() == 0 and cache.lines[-1] == "feature cache hit: k.npy"


def test_a_damaged_file_is_deleted_before_recomputing(cache, monkeypatch):
    cache.get()
    _flip_one_byte(cache)

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("backbone failed")

    monkeypatch.setattr(cache.net, "forward", broken)
    with pytest.raises(RuntimeError, match="backbone failed"):
        cache.get()
    assert str(cache.npy) in cache.damaged_lines()[0]
    assert not cache.npy.exists() and not cache.record.exists()  # never read again, even if nothing replaces it


def test_a_hit_never_memory_maps_or_loads_the_file_unchecked(cache, monkeypatch):
    first = cache.get()

    def refuse(*args, **kwargs):
        raise AssertionError("the cache must read the verified bytes itself")

    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr(np, "memmap", refuse)
    np.testing.assert_array_equal(cache.get(), first)
    assert cache.net.take() == N  # the first call only


def test_uncached_calls_write_nothing(tmp_path):
    net = Backbone()
    out = features.activations(net, split(), preprocess=scale, batch_size=2, device="cpu", cache_dir=tmp_path,
                               key=None, log=lambda line: None)
    assert out.shape == (N, 2, 6, 6) and list(tmp_path.iterdir()) == []
