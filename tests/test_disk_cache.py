"""The disk cache of an image folder that outgrows cache_gb: decoded once into a memory-mapped file,
read back without decoding, rebuilt when a file changes (never stale), the same batches as in memory."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from contrastive_cli.data import folder
from contrastive_cli.data.batches import iterate_batches
from contrastive_cli.data.cache import CACHE_FOLDER, CachedRows
from contrastive_cli.data.folder import FolderImages, load_imagefolder

OUTGROWN = 1e-9  # cache_gb: no folder fits in memory


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (20, 24 + i, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    (tmp_path / "img" / "a" / "bad.png").write_bytes(b"not a png")
    return tmp_path / "img"


def served(data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in iterate_batches(data, 3, seed=1, epoch=2)]


def assert_same_batches(a, b):
    for (xa, ya), (xb, yb) in zip(served(a), served(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_the_disk_cache_serves_the_batches_of_the_memory_cache(photos):
    in_memory = load_imagefolder(str(photos), image_size=16, test_fraction=0.5)
    on_disk = load_imagefolder(str(photos), image_size=16, test_fraction=0.5, cache_gb=OUTGROWN)
    assert isinstance(on_disk.train, CachedRows) and len(list((photos / CACHE_FOLDER).glob("*.u8"))) == 1
    assert_same_batches(in_memory.train, on_disk.train)
    assert_same_batches(in_memory.test, on_disk.test)


def test_a_second_run_reads_the_cache_without_decoding(photos, monkeypatch):
    first = load_imagefolder(str(photos), image_size=16, cache_gb=OUTGROWN)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder, "decode_all", no_decoding)
    again = load_imagefolder(str(photos), image_size=16, cache_gb=OUTGROWN)
    assert_same_batches(first.train, again.train)


def test_a_changed_file_rebuilds_the_cache(photos):
    load_imagefolder(str(photos), image_size=16, cache_gb=OUTGROWN)
    old = list((photos / CACHE_FOLDER).glob("*.u8"))
    Image.fromarray(np.full((20, 20, 3), 255, dtype=np.uint8)).save(photos / "b" / "3.png")  # other pixels, same name
    st = os.stat(photos / "b" / "3.png")
    os.utime(photos / "b" / "3.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = load_imagefolder(str(photos), image_size=16, cache_gb=OUTGROWN)
    fresh = load_imagefolder(str(photos), image_size=16)  # in memory, decoded now
    assert_same_batches(fresh.train, rebuilt.train)
    assert_same_batches(fresh.test, rebuilt.test)
    now = list((photos / CACHE_FOLDER).glob("*.u8"))
    assert len(now) == 1 and now != old  # the stale cache is gone


def test_a_cache_file_of_another_image_size_is_rebuilt_not_read(photos, caplog):
    load_imagefolder(str(photos), image_size=8, cache_gb=OUTGROWN)
    small = next((photos / CACHE_FOLDER).glob("*.u8"))
    load_imagefolder(str(photos), image_size=16, cache_gb=OUTGROWN)
    big = next(p for p in (photos / CACHE_FOLDER).glob("*.u8") if p != small)
    shutil.copy(small, big)  # a 8 px cache under the 16 px name
    shutil.copy(small.with_suffix(".json"), big.with_suffix(".json"))
    with caplog.at_level(logging.WARNING):
        data = load_imagefolder(str(photos), image_size=16, cache_gb=OUTGROWN)
    assert any("written for other images or another size" in r.message for r in caplog.records)
    assert_same_batches(load_imagefolder(str(photos), image_size=16).train, data.train)


def test_an_unwritable_cache_folder_falls_back_to_decoding_per_batch(photos, tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    with caplog.at_level(logging.WARNING):
        data = load_imagefolder(str(photos), image_size=16, cache_gb=OUTGROWN, cache_dir=str(tmp_path / "a_file" / "c"))
    assert isinstance(data.train, FolderImages) and any("no disk cache" in r.message for r in caplog.records)
