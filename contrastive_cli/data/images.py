"""The core every source shares: images held in memory as one uint8 tensor (N, C, H, W) with labels,
the train/test `Splits` a loader returns, and the one Pillow decode (any file to uint8 at a fixed size)
that training, cl-embed, cl-pack and `load_encoder`'s preprocess all use, so their inputs are the same
bytes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W); labels are -1 where unknown."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        assert images.dtype == torch.uint8 and images.ndim == 4, images.shape
        self.images, self.labels, self.classes = images, labels.long(), classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of rows idx at once (what in-memory datasets share: captions.PairImages too)."""
        return self.images[idx], self.labels[idx]



def decode_image(path: str, size: int, channels: int = 3) -> torch.Tensor:
    """uint8 (channels, size, size) from any file Pillow reads: grey, palette, RGBA, ... converted to
    grey (1 channel) or RGB (3), resized bilinearly to a square."""
    from PIL import Image

    with Image.open(path) as img:
        return pil_to_uint8(img, size, channels)


def pil_to_uint8(img, size: int, channels: int) -> torch.Tensor:
    """A PIL image as uint8 (channels, size, size): the one conversion training, cl-embed and
    `load_encoder`'s preprocess share, so their inputs are the same bytes."""
    from PIL import Image

    if channels not in (1, 3):
        raise UserError(f"channels={channels}: images convert to 1 (grey) or 3 (RGB) channels")
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img).copy()
    return torch.from_numpy(arr).unsqueeze(0) if channels == 1 else torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class DecodedOrNot(Dataset):
    """Item i: (uint8 image, True), or (None, False) when file i does not decode (a truncated or
    foreign file raises inside Pillow)."""

    def __init__(self, paths: list[str], size: int, channels: int = 3):
        self.paths, self.size, self.channels = paths, size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return decode_image(self.paths[i], self.size, self.channels), True
        except Exception:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError ...
            return None, False


def warn_unreadable(bad: list[str]) -> None:
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        logging.getLogger(__name__).warning("skipped %d unreadable image file(s): %s", len(bad), shown)


def _decoded_batch(items):
    ok = torch.tensor([good for _, good in items], dtype=torch.bool)
    images = [img for img, good in items if good]
    return (torch.stack(images) if images else None), ok


def decode_batches(paths: list[str], size: int, channels: int, batch_size: int = 64, workers: int = 2):
    """(uint8 images of the readable files, readable mask) per batch of `paths`, decoded in worker
    processes. Batches, not single images: every tensor a worker returns holds a file descriptor
    until it is freed, and a folder of thousands of images would run out of them."""
    return DataLoader(DecodedOrNot(paths, size, channels), batch_size=batch_size, collate_fn=_decoded_batch,
                      num_workers=workers if len(paths) > batch_size else 0)


def decode_all(paths: list[str], size: int, channels: int = 3, workers: int = 2, keep: bool = True,
               desc: str = "decoding images", out: torch.Tensor | None = None) -> tuple[list[bool], torch.Tensor | None]:
    """Decode every file once, so a bad file is found before training, not in the middle of an
    epoch; unreadable ones are listed in one warning. With `keep`, the readable images come back as
    one uint8 tensor (N_ok, C, size, size), filled in place (no second copy): `out` when given (a
    memory-mapped file's), else a new one."""
    from ..progress import bar

    images = out if out is not None else torch.empty(len(paths), channels, size, size, dtype=torch.uint8) if keep else None
    ok, n = [], 0
    batches = decode_batches(paths, size, channels, workers=workers)
    for x, good in bar(batches, len(batches), desc, delay=1.0):
        ok += good.tolist()
        if keep and x is not None:
            images[n : n + len(x)] = x
            n += len(x)
    warn_unreadable([p for p, good in zip(paths, ok, strict=True) if not good])
    return ok, (images[:n] if keep and n else None)



@dataclass
class Splits:
    """`train` is what pretraining sees (may be unlabeled); k-NN / probe fit on `eval_train`."""

    train: Dataset
    test: Dataset | None  # None: no labels to evaluate with (a flat or single-class image folder)
    eval_train: Dataset | None = None

    def __post_init__(self) -> None:
        if self.eval_train is None:
            self.eval_train = self.train

    @property
    def labeled(self) -> bool:
        return self.test is not None



def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices, each class split in proportion: scikit-learn's
    `train_test_split(stratify=labels, random_state=seed)` draw for draw (tests/test_data.py checks
    it), written out so that a run does not import scikit-learn (1.3 s with SciPy: a fifth of a small
    run's start-up) and a run's test split does not move with scikit-learn's version."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction={test_fraction}: must be between 0 and 1 (exclusive)")
    labels = np.asarray(labels)
    n_test = math.ceil(test_fraction * len(labels))
    n_train = len(labels) - n_test
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if min(n_train, n_test) < len(classes):
        raise UserError(f"test_fraction={test_fraction}: holds out {n_test} of {len(labels)} images and trains on "
                        f"{n_train}, and each side needs an image of each of the {len(classes)} classes")
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    train_counts = _apportion(counts, n_train, rng)
    test_counts = _apportion(counts - train_counts, n_test, rng)
    train, test = [], []
    for idx, a, b in zip(by_class, train_counts, test_counts, strict=True):
        shuffled = idx[rng.permutation(len(idx))]
        train.append(shuffled[:a])
        test.append(shuffled[a:a + b])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _apportion(counts: np.ndarray, n: int, rng: np.random.RandomState) -> np.ndarray:
    """`n` draws shared among classes in proportion to `counts`: the floors, then one more each for the
    largest remainders, ties broken at random (scikit-learn's `_approximate_mode`)."""
    exact = counts / counts.sum() * n
    share = np.floor(exact)
    missing = int(n - share.sum())
    remainder = exact - share
    for value in np.sort(np.unique(remainder))[::-1]:
        if missing <= 0:
            break
        (ties,) = np.where(remainder == value)
        chosen = rng.choice(ties, size=min(len(ties), missing), replace=False)
        share[chosen] += 1
        missing -= len(chosen)
    return share.astype(int)

