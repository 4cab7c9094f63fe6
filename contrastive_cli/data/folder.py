"""Your own images: every image file under a folder, class sub-folders as labels. Decoded once and held
in memory when they fit in `cache_gb`; else decoded once into a memory-mapped file on disk (the disk
cache); else, with the cache turned off, decoded per batch in DataLoader workers."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .cache import CachedRows, disk_cache
from .images import Splits, TensorImages, decode_all, decode_image, stratified_split

log = logging.getLogger(__name__)


class FolderImages(Dataset):
    """Lazy images from files, decoded and resized to a fixed square size in the worker."""

    def __init__(self, paths: list[str], labels: list[int], classes: list[str], size: int, channels: int = 3):
        self.paths, self.labels, self.classes, self.size = paths, torch.tensor(labels), classes, size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return decode_image(self.paths[i], self.size, self.channels), int(self.labels[i])



def image_files(root: str) -> list[str]:
    """Every file under root (recursively, sorted, hidden ones skipped; linked folders followed once)
    whose extension is one Pillow can open."""
    from PIL import Image

    Image.init()
    known = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree: walk it once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(folder, f) for f in sorted(files)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in known]
    return found


def folder_labels(root: str, paths: list[str]) -> tuple[list[int | None], list[str]]:
    """Class labels from first-level sub-folders when there are at least two of them
    (root/<class>/.../<image>), as torchvision's ImageFolder reads them; files lying directly in
    root then get None (not part of any class). With fewer than two class folders (a flat folder,
    or a single class) there are no labels: -1 each."""
    top = [os.path.relpath(p, root).split(os.sep) for p in paths]
    classes = sorted({parts[0] for parts in top if len(parts) > 1})
    if len(classes) < 2:
        return [-1] * len(paths), []
    index = {c: i for i, c in enumerate(classes)}
    return [index[parts[0]] if len(parts) > 1 else None for parts in top], classes


def has_class_folders(root: str) -> bool:
    return bool(folder_labels(root, image_files(root))[1])




def load_imagefolder(root: str, image_size: int = 64, test_fraction: float = 0.2, seed: int = 0,
                     channels: int = 3, cache_gb: float = 2.0, cache_dir: str | None = "auto") -> Splits:
    """Every image under root, recursively. With class sub-folders (root/<class>/<image>, two or more)
    a seeded stratified split gives the evaluation's test set; a flat folder or a single class trains
    without labels (no test set). Decoded once at image_size; when they fit in `cache_gb` the images
    stay in memory as uint8 (the on-device pipeline then serves them); else in a memory-mapped file in
    `cache_dir` ("auto": a hidden folder in root), read back without decoding by the next run; with
    cache_dir=null, workers decode per batch."""
    if not os.path.isdir(root):
        raise UserError(f"dataset.source.root={root}: not a folder of images")
    paths = image_files(root)
    if not paths:
        raise UserError(f"dataset.source.root={root}: has no image files (any format Pillow reads, in it or below)")
    fits = len(paths) * channels * image_size**2 <= cache_gb * 2**30
    cached = disk_cache(root, paths, image_size, channels, cache_dir) if not fits and cache_dir else None
    if cached is not None:
        ok, images = cached
    else:
        ok, images = decode_all(paths, image_size, channels, keep=fits)
    mapped = cached is not None
    if not any(ok):
        raise UserError(f"dataset.source.root={root}: none of its {len(ok)} image files could be read")
    paths = [p for p, good in zip(paths, ok, strict=True) if good]
    labels_all, classes = folder_labels(root, paths)
    loose = [p for p, y in zip(paths, labels_all, strict=True) if y is None]
    if loose:
        logging.getLogger(__name__).warning(
            "ignored %d image file(s) directly in %s: with class sub-folders, only their images are used (%s)",
            len(loose), root, ", ".join(os.path.basename(p) for p in loose[:3]) + (" ..." if len(loose) > 3 else ""))
    keep = np.array([i for i, y in enumerate(labels_all) if y is not None], dtype=np.int64)
    labels = np.array([y for y in labels_all if y is not None], dtype=np.int64)
    paths = [paths[i] for i in keep]
    rows = torch.from_numpy(keep)
    if images is not None and len(keep) < len(images) and not mapped:
        images, rows = images[rows], torch.arange(len(keep))

    def subset(ix: np.ndarray) -> Dataset:
        if mapped and images is not None:
            return CachedRows(images, rows[torch.from_numpy(ix)], torch.from_numpy(labels[ix]), classes)
        if images is not None:
            whole = len(ix) == len(images)  # the unlabeled case: every image, no copy
            return TensorImages(images if whole else images[torch.from_numpy(ix)], torch.from_numpy(labels[ix]),
                                classes)
        return FolderImages([paths[i] for i in ix], labels[ix].tolist(), classes, image_size, channels)

    if not classes:
        return Splits(subset(np.arange(len(paths))), None)
    counts = np.bincount(labels)
    if len(counts) < 2 or counts.min() < 2:
        raise UserError(f"dataset.source.root={root}: need 2 readable images in each class folder (or a flat "
                        "folder, for training without labels)")
    tr, te = stratified_split(labels, test_fraction, seed)
    return Splits(subset(tr), subset(te))
