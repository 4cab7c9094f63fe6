"""Your own (image, caption) pairs: a CSV, TSV or JSONL of image paths and captions (open_clip's layout),
read into images held once and rows that point at them. A training batch carries, in place of labels,
its rows' numbers, which the image-text methods look their captions up by."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..files import read_text
from .cache import CachedRows, disk_cache
from .images import Splits, decode_all

log = logging.getLogger(__name__)


class PairImages(Dataset):
    """Rows of (image, caption); the images are held once (several rows may share one). Item i is
    (uint8 image, i): a batch carries its rows' numbers, which the method looks its captions up by.
    `images` are all the pairs file's decoded images (in memory, or the disk cache's map), of which this
    split holds `rows`; caption i's image is images[rows[image_of[i]]]."""

    def __init__(self, images: torch.Tensor, image_of: torch.Tensor, captions: list[str],
                 rows: torch.Tensor | None = None):
        self.images, self.image_of, self.captions = images, image_of.long(), captions
        self.rows = rows.long() if rows is not None else torch.arange(len(images))
        self.labels = torch.arange(len(captions))  # what batches carry: the row numbers
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[self.rows[self.image_of[i]]], i

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[self.rows[self.image_of[idx]]], idx

    @property
    def n_images(self) -> int:
        return len(self.rows)

    def distinct(self) -> Dataset:
        """Each of the split's images once, in the order image_of counts them (retrieval ranks images, not rows)."""
        return CachedRows(self.images, self.rows, torch.arange(len(self.rows)), [])


@dataclass
class PairSplits(Splits):
    """A pairs file's splits: `train` and `held_out` are PairImages; no class labels, so `test` is None."""

    held_out: PairImages | None = None


def _rows(path: Path, image_key: str, caption_key: str, key: str) -> list[tuple[str, object]]:
    text = read_text(str(path), key)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{key}={path}: line {n} is not JSON ({e.msg})") from None
        found = sorted({k for r in rows if isinstance(r, dict) for k in r})
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="," if suffix == ".csv" else "\t")
        rows, found = list(reader), list(reader.fieldnames or [])
    else:
        raise UserError(f"{key}={path}: a pairs file is .csv (comma), .tsv (tab) or .jsonl")
    if not rows:
        raise UserError(f"{key}={path}: has no rows")
    for col, what in ((image_key, "image_key"), (caption_key, "caption_key")):
        if col not in found:
            raise UserError(f"{key[: key.rfind('.') + 1]}{what}={col}: no such column in {path} (found: {', '.join(found) or 'none'})")
    return [(str(r.get(image_key) or ""), r.get(caption_key)) for r in rows if isinstance(r, dict)]


def held_out_images(n: int, fraction: float, seed: int) -> np.ndarray:
    """Which of n images a seeded `fraction` (at least one) holds out, as a mask: a pairs file's split
    by image, so that no image is on both sides (load_pairs and cl-pack)."""
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[: max(1, round(fraction * n))]] = True
    return held


def read_pairs(path: str, image_key: str = "filepath", caption_key: str = "title",
               key: str = "dataset.source.path") -> list[tuple[str, str]]:
    """The (image path as written, caption) rows of a pairs file, empty captions skipped with a count."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{key}={path}: no such file (a .csv, .tsv or .jsonl of image paths and captions)")
    rows = _rows(p, image_key, caption_key, key)
    bad = next((c for _, c in rows if c is not None and not isinstance(c, str)), None)
    if bad is not None:
        raise UserError(f"dataset.source.caption_key={caption_key}: holds {type(bad).__name__} values ({bad!r}), not text")
    empty = sum(1 for _, c in rows if not (c or "").strip())
    if empty:
        log.warning("skipped %d row(s) of %s with an empty caption", empty, p)
    return [(f, c.strip()) for f, c in rows if (c or "").strip() and f]


def resolve(path: str, image: str) -> str:
    """An image path of a pairs file: relative to the file's folder, or absolute."""
    return str((Path(path).expanduser().parent / os.path.expanduser(image)).resolve())


def load_pairs(path: str, image_key: str = "filepath", caption_key: str = "title", image_size: int = 64,
               channels: int = 3, test_fraction: float = 0.1, seed: int = 0, cache_gb: float = 2.0,
               cache_dir: str | None = "auto") -> PairSplits:
    """A pairs file: image paths (relative to the file's folder, or absolute) and captions. Every distinct
    image is decoded once at image_size (unreadable ones skipped and named in one warning): held in memory
    when they fit in `cache_gb`, else in the disk cache (`cache_dir`, "auto": a hidden folder beside the
    file), which later runs read without decoding. Empty captions are skipped with a count; a seeded
    `test_fraction` of the IMAGES (with all their captions) is held out."""
    p = Path(path).expanduser()
    rows = read_pairs(path, image_key, caption_key)
    names = list(dict.fromkeys(f for f, _ in rows))
    files = [resolve(path, f) for f in names]
    if len(files) * channels * image_size**2 <= cache_gb * 2**30:
        ok, images = decode_all(files, image_size, channels)
    elif cache_dir:
        ok, images = disk_cache(str(p.resolve().parent), files, image_size, channels, cache_dir, owner=str(p.resolve()))
    else:
        raise UserError(f"dataset.source.cache_dir=null: the {len(files)} images of {path} at {image_size} px take more "
                        f"than dataset.source.cache_gb={cache_gb} GiB, and a pairs file is read from memory or the disk "
                        f"cache; give cache_dir=auto (beside the file) or a folder, or raise cache_gb")
    if images is None:
        raise UserError(f"dataset.source.path={path}: none of its {len(files)} image files could be read")
    index = {}
    for name, good in zip(names, ok, strict=True):
        if good:
            index[name] = len(index)
    rows = [(index[f], c) for f, c in rows if f in index]
    image_of = np.array([i for i, _ in rows], dtype=np.int64)
    captions = [c for _, c in rows]
    held = np.zeros(len(index), dtype=bool)
    if test_fraction > 0:
        if not 0.0 < test_fraction < 1.0:
            raise UserError(f"dataset.source.test_fraction={test_fraction}: must be in [0, 1)")
        if len(index) < 2:
            raise UserError(f"dataset.source.path={path}: a held-out split needs 2 readable images; it has "
                            f"{len(index)} (or set dataset.source.test_fraction=0)")
        held = held_out_images(len(index), test_fraction, seed)

    def part(mask: np.ndarray) -> PairImages:
        # the split's rows of the one image tensor, not a copy: the disk cache's map is never read whole
        rows_in = np.flatnonzero(mask[image_of])
        used = np.unique(image_of[rows_in])
        remap = np.full(len(index), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        return PairImages(images, torch.from_numpy(remap[image_of[rows_in]]), [captions[i] for i in rows_in],
                          torch.from_numpy(used))

    train = part(~held)
    log.info("pairs %s: %d captions of %d images for training, %d of %d held out", p, len(train), int((~held).sum()),
             int(held[image_of].sum()), int(held.sum()))
    return PairSplits(train, None, held_out=part(held) if held.any() else None)
