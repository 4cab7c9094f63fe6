"""The disk cache: images decoded once into a memory-mapped uint8 file, named by what they depend on, and
read back by later runs without decoding (an image folder, or a pairs file's images, beyond cache_gb)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .images import TensorImages, decode_all

log = logging.getLogger(__name__)
CACHE_FOLDER = ".contrastive_cli_cache"  # cache_dir=auto: inside the image folder, hidden (image_files skips it)


class CachedRows(TensorImages):
    """Rows of the disk cache's memory-mapped uint8 tensor: a batch reads its rows from the page cache or
    the disk, the split is never copied whole into memory (`images` is the whole map)."""

    def __init__(self, images: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        super().__init__(images, labels, classes)
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[self.rows[i]], int(self.labels[i])

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[self.rows[idx]], self.labels[idx]


def _cache_files(root: str, paths: list[str], size: int, channels: int, cache_dir: str,
                 owner: str | None = None) -> tuple[Path, Path, str]:
    """The cache's data file and its description, named by its owner (the folder, or a pairs file) and
    by what its contents depend on: the file list, each file's size and modification time, the image
    size and channels."""
    h = hashlib.sha256(f"{size} {channels}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"\0{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    folder = Path(os.path.expanduser(cache_dir)) if cache_dir != "auto" else Path(root, CACHE_FOLDER)
    stem = f"{hashlib.sha256(os.path.realpath(owner or root).encode()).hexdigest()[:8]}-{size}px-{channels}ch"
    return folder / f"{stem}-{h.hexdigest()[:16]}.u8", folder / f"{stem}-{h.hexdigest()[:16]}.json", stem


def disk_cache(root: str, paths: list[str], size: int, channels: int, cache_dir: str, owner: str | None = None):
    """(readable mask, memory-mapped uint8 images of the readable files) from the cache, built first
    when missing or stale; None when the cache folder cannot be written (then workers decode per batch).
    `owner`: what the cache belongs to when not the folder `root` itself (a pairs file in it, which has
    no per-batch decoding: an unwritable cache folder is then one line)."""
    data, meta, stem = _cache_files(root, paths, size, channels, cache_dir, owner)
    want = {"files": len(paths), "image_size": size, "channels": channels, "key": data.stem}
    if data.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            info = {}
        if {k: info.get(k) for k in want} == want and data.stat().st_size >= info["count"] * channels * size**2:
            mm = np.memmap(data, dtype=np.uint8, mode="c", shape=(info["count"], channels, size, size))
            bad = set(info["unreadable"])
            log.info("image cache %s: %d images at %d px, read without decoding", data, info["count"], size)
            return [i not in bad for i in range(len(paths))], torch.from_numpy(mm)
        log.warning("image cache %s was written for other images or another size: building it again", data)
    try:
        data.parent.mkdir(parents=True, exist_ok=True)
        tmp = data.with_name(f".{data.name}.{os.getpid()}.tmp")
        mm = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(paths), channels, size, size))
    except OSError as e:
        reason = f"no disk cache for {owner or root} ({data.parent}: {e.strerror or e})"
        if owner is not None:  # a pairs file has no per-batch decoding to fall back on
            raise UserError(f"{reason}; give dataset.source.cache_dir=DIR, a folder with room for it") from None
        log.warning("%s: decoding every batch instead", reason)
        return None
    try:
        ok, _ = decode_all(paths, size, channels, out=torch.from_numpy(mm), desc="decoding images into the disk cache")
        mm.flush()
        del mm
        count = sum(ok)
        meta.with_name(f".{meta.name}.tmp").write_text(json.dumps(
            {**want, "count": count, "unreadable": [i for i, good in enumerate(ok) if not good], "root": root}))
        os.replace(tmp, data)  # the data first: a description never names a file that is not whole
        os.replace(meta.with_name(f".{meta.name}.tmp"), meta)
    finally:
        tmp.unlink(missing_ok=True)
    for old in data.parent.glob(f"{stem}-*"):  # the same folder's cache of an earlier file list
        if old.stem != data.stem:
            old.unlink(missing_ok=True)
    log.info("image cache %s: %d images at %d px written (%.2f GiB)", data, count, size, count * channels * size**2 / 2**30)
    mapped = np.memmap(data, dtype=np.uint8, mode="c", shape=(count, channels, size, size)) if count else None
    return ok, (torch.from_numpy(mapped) if count else None)
