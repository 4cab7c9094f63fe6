"""Datasets as uint8 image tensors (N, C, H, W) plus labels, and the batch iterator the loop uses.

Small datasets are held in memory once; augmentation happens later, on the device, in batch.
An `imagefolder` is decoded once and held the same way when it fits in `cache_gb`, else it stays lazy
and goes through DataLoader workers.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .errors import UserError


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


class FolderImages(Dataset):
    """Lazy images from files, decoded and resized to a fixed square size in the worker."""

    def __init__(self, paths: list[str], labels: list[int], classes: list[str], size: int, channels: int = 3):
        self.paths, self.labels, self.classes, self.size = paths, torch.tensor(labels), classes, size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return decode_image(self.paths[i], self.size, self.channels), int(self.labels[i])


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
    img = img.convert("L" if channels == 1 else "RGB")
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
               desc: str = "decoding images") -> tuple[list[bool], torch.Tensor | None]:
    """Decode every file once, so a bad file is found before training, not in the middle of an
    epoch; unreadable ones are listed in one warning. With `keep`, the readable images come back as
    one uint8 tensor (N_ok, C, size, size), filled in place (no second copy)."""
    from .progress import bar

    images = torch.empty(len(paths), channels, size, size, dtype=torch.uint8) if keep else None
    ok, n = [], 0
    batches = decode_batches(paths, size, channels, workers=workers)
    for x, good in bar(batches, len(batches), desc, delay=1.0):
        ok += good.tolist()
        if keep and x is not None:
            images[n : n + len(x)] = x
            n += len(x)
    warn_unreadable([p for p, good in zip(paths, ok, strict=True) if not good])
    return ok, (images[:n] if keep and n else None)


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


class _AugmentedBatches(Dataset):
    """Item k is batch k, augmented on the CPU inside a DataLoader worker (augmentation.on_device=false),
    with a generator seeded from (aug_seed, k) so the views do not depend on the worker count."""

    def __init__(self, data: Dataset, batches: list[torch.Tensor], augment, aug_seed: int, start: int = 0):
        self.data, self.batches, self.augment, self.aug_seed, self.start = data, batches, augment, aug_seed, start

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __getitem__(self, k: int):
        k += self.start  # the seed follows the batch's place in the epoch, not in this (resumed) pass
        idx = self.batches[k]
        if hasattr(self.data, "take"):
            x, y = self.data.take(idx)
        else:
            items = [self.data[int(i)] for i in idx]
            x, y = torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])
        with torch.no_grad():
            views = self.augment(x, torch.Generator().manual_seed(self.aug_seed * 1_000_003 + k))
        return (*views, y)


def iterate_batches(
    data: Dataset, batch_size: int, seed: int, epoch: int, workers: int = 0, pin: bool = False,
    shuffle: bool = True, drop_last: bool = True, rank: int = 0, world: int = 1, augment=None, aug_seed: int = 0,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield (uint8 images, labels) batches of `batch_size` per process. The order depends only on
    (seed, epoch), so a resumed run sees the same batches as a straight one; with `world` processes,
    global batch k is slice k of that order and rank r gets its r-th part (a distributed sampler
    whose union over ranks is exactly the single-process batch of world * batch_size).
    With `augment`, batches are augmented on the CPU in `workers` processes and come as (view1, view2, [crops...,] labels).
    `start`: skip the epoch's first batches (resuming inside an epoch); the rest are as they would have been."""
    n = len(data)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        order = torch.arange(n)
    if world > 1:
        steps = n // (batch_size * world)
        order = order[: steps * batch_size * world].view(steps, world, batch_size)[:, rank].reshape(-1)
    n = len(order)
    if augment is not None:
        stop = n - n % batch_size if drop_last else n
        batches = list(order[:stop].split(batch_size)) if stop else []
        yield from DataLoader(_AugmentedBatches(data, batches, augment, aug_seed, start), batch_size=None,
                              num_workers=workers, pin_memory=pin, persistent_workers=False,
                              generator=_own_generator(seed, epoch, rank))
        return
    if hasattr(data, "take"):  # held in memory
        stop = n - n % batch_size if drop_last else n
        for first in range(start * batch_size, stop, batch_size):
            x, y = data.take(order[first : first + batch_size])
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)
        return
    loader = DataLoader(
        data, batch_size=batch_size, sampler=order[start * batch_size :].tolist(), num_workers=workers,
        pin_memory=pin, drop_last=drop_last, persistent_workers=False, generator=_own_generator(seed, epoch, rank),
    )
    yield from loader


def _own_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """A DataLoader draws its workers' base seed from the global RNG unless given a generator: that
    draw would shift the global stream of a run resumed inside an epoch against a straight one."""
    return torch.Generator().manual_seed(seed * 100_019 + epoch * 1_013 + rank)


def num_batches(data: Dataset, batch_size: int, drop_last: bool = True, world: int = 1) -> int:
    n = len(data)
    return n // (batch_size * world) if drop_last else -(-n // batch_size)


# ---------------------------------------------------------------------------------------- loaders

def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction={test_fraction}: must be between 0 and 1 (exclusive)")
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(tr), np.sort(te)


def load_digits(image_size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> Splits:
    """scikit-learn's 8x8 digits (values 0..16), scaled to uint8 and upscaled bilinearly."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.from_numpy(d.target)
    tr, te = _stratified_split(d.target, test_fraction, seed)
    classes = [str(i) for i in range(10)]
    return Splits(TensorImages(x[tr], y[tr], classes), TensorImages(x[te], y[te], classes))


_MNIST = {
    "mnist": ("MNIST", [str(i) for i in range(10)]),
    "fashion_mnist": ("FashionMNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
}
_IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:  # a cut-off .gz raises EOFError; a bad one OSError
        raise UserError(f"{path}: truncated or corrupt file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise UserError(f"{path}: truncated IDX file (header needs {offset} bytes, file has {len(raw)})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    expected = int(np.prod(shape))
    if data.size != expected:
        kind = "truncated" if data.size < expected else "over-long"
        raise UserError(f"{path}: {kind} IDX file ({data.size} of {expected} bytes)")
    return data.reshape(shape)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


# ------------------------------------------------------------------------------------- downloads

DOWNLOAD_TIMEOUT_S = 30  # per connect / read: a machine without network fails in seconds, not minutes
# what a failed fetch raises: URLError / HTTPError / timeouts / disk errors are OSError; torchvision
# raises RuntimeError on a bad md5; a cut-off archive fails in tarfile, gzip or zlib
_FETCH_ERRORS = (OSError, RuntimeError, http.client.HTTPException, tarfile.TarError, EOFError, zlib.error)


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torchvision's urlopen calls pass no timeout, so they take the process-wide default (none: wait forever)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _reason(e: BaseException) -> str:
    """The short cause of a failed fetch, on one line."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
        e = e.reason
    if isinstance(e, TimeoutError):
        return f"no answer within {DOWNLOAD_TIMEOUT_S} s"
    text = str(e.reason if isinstance(e, urllib.error.URLError) else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _move_into(src: Path, dst: Path) -> None:
    """Rename within one filesystem: every file appears whole or not at all. Where a folder is already
    there (an incomplete copy, or a parallel process's finished download), the files go in one by one."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
        return
    except OSError:
        if not (src.is_dir() and dst.is_dir()):
            raise
    for item in src.iterdir():
        _move_into(item, dst / item.name)


def _first_missing(path: Path) -> Path | None:
    """The top-most folder of `path` that does not exist yet (what makedirs would create)."""
    top = None
    while not path.exists() and path != path.parent:
        top, path = path, path.parent
    return top


def _download(name: str, root: str, fetch: Callable[[str], None], folder: str, hint: str) -> None:
    """`fetch(tmp)` into a fresh folder inside `root` (same filesystem), then move `tmp/folder` to
    `root/folder`. Nothing half-written stays under `root`: the temporary folder goes whatever happens
    (Ctrl-C included), and so do the folders made for it if the download fails."""
    made = _first_missing(Path(root).absolute())
    tmp, done = None, False
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}-download-", dir=root)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            fetch(tmp)
        _move_into(Path(tmp, folder), Path(root, folder))
        done = True
    except _FETCH_ERRORS as e:
        raise UserError(f"dataset {name} not found in {root} and its download failed ({_reason(e)}); {hint}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not done and made is not None:
            _remove_empty(Path(root).absolute(), made)


def _remove_empty(path: Path, top: Path) -> None:
    """rmdir `path` and its parents up to `top` while they are empty (never anything with files in it)."""
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == top:
            return
        path = path.parent


def _fetch_idx(cls, raw: str) -> None:
    """torchvision's MNIST.download, into `raw`: each file from the first mirror that serves it; the
    .gz goes once unpacked (torchvision's MNIST checks for the unpacked names)."""
    from torchvision.datasets import utils as tv_utils

    for filename, md5 in cls.resources:
        errors = []
        for mirror in cls.mirrors:
            try:
                tv_utils.download_and_extract_archive(mirror + filename, raw, filename=filename, md5=md5,
                                                      remove_finished=True)
                break
            except _FETCH_ERRORS as e:
                errors.append(e)
        else:
            raise errors[0]  # the main mirror's reason; the others are fallbacks


def _download_idx(variant: str, root: str, system_dir: str | None) -> None:
    from torchvision import datasets

    cls = getattr(datasets, _MNIST[variant][0])
    folder = os.path.join(cls.__name__, "raw")
    hint = (f"offline, put {', '.join(f for f, _ in cls.resources)} from {cls.mirrors[0]} (.gz or not) in "
            f"{Path(root) / folder}" + (f" or {system_dir}" if system_dir else "")
            + f" (or set paths.data_dir=<folder that has {cls.__name__}/raw/>)")
    _download(variant, root, lambda tmp: _fetch_idx(cls, os.path.join(tmp, folder)), folder, hint)


def _ensure_archive(cls, name: str, root: str, files: list[str]) -> None:
    """Download and unpack `cls.url` (CIFAR, STL-10) unless all of `files` are in root/base_folder.
    Presence is checked by name only: torchvision's md5 check (which the loader runs next) would
    otherwise re-fetch hundreds of MB over a file that is merely not the original."""
    from torchvision.datasets import utils as tv_utils

    if all((Path(root) / cls.base_folder / f).is_file() for f in files):
        return
    hint = (f"offline, put {cls.filename} from {cls.url.rsplit('/', 1)[0]}/ extracted as "
            f"{Path(root) / cls.base_folder}/ (or set paths.data_dir=<folder that has it>)")

    def fetch(tmp: str) -> None:
        tv_utils.download_and_extract_archive(cls.url, tmp, filename=cls.filename, md5=cls.tgz_md5)

    _download(name, root, fetch, cls.base_folder, hint)


def load_mnist(variant: str, root: str, download: bool = False, system_dir: str | None = None) -> Splits:
    """MNIST / Fashion-MNIST from torchvision's layout (root/<Name>/raw), or a system folder of IDX files."""
    if variant not in _MNIST:
        raise UserError(f"variant={variant}: choose from {', '.join(_MNIST)}")
    folder, classes = _MNIST[variant]
    raw = Path(root) / folder / "raw"
    dirs = [raw] + ([Path(system_dir)] if system_dir else [])
    if download and any(_find_idx(dirs, stem) is None for stems in _IDX_FILES.values() for stem in stems):
        _download_idx(variant, root, system_dir)
    out = []
    for train in (True, False):
        files = [_find_idx(dirs, stem) for stem in _IDX_FILES[train]]
        if None in files:
            missing = ", ".join(s for s, f in zip(_IDX_FILES[train], files, strict=True) if f is None)
            raise UserError(
                f"dataset {variant} not found: place {missing} (.gz or not) in {raw}"
                + (f" or {system_dir}" if system_dir else "")
                + " (or set dataset.source.download=true to fetch them where the network allows)"
            )
        x, y = read_idx(files[0]), read_idx(files[1])
        out.append(TensorImages(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)), classes))
    return Splits(out[0], out[1])


def _torchvision_dataset(cls, name: str, download: bool, **kwargs):
    """cls(...) with download=False: any download has happened already (`_ensure_archive`), so a
    failure here means files missing or not passing torchvision's md5 check."""
    where = f"{cls.base_folder}/ (from {cls.filename})"
    try:
        return cls(**kwargs, download=False)
    except RuntimeError as e:
        if "not found" in str(e).lower() or "corrupted" in str(e).lower():
            if download:  # the files are there by name, yet torchvision rejects them
                raise UserError(
                    f"dataset {name} not found intact: {where} under {kwargs['root']} fails torchvision's "
                    "md5 check (not the original files?); delete that folder to download it again"
                ) from None
            raise UserError(
                f"dataset {name} not found: place {where} under {kwargs['root']} "
                "(or set dataset.source.download=true to fetch it where the network allows)"
            ) from None
        raise


def load_cifar(variant: str, root: str, download: bool = False) -> Splits:
    """CIFAR-10 / CIFAR-100 through torchvision (the python pickle batches)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    table = {"cifar10": CIFAR10, "cifar100": CIFAR100}
    if variant not in table:
        raise UserError(f"variant={variant}: choose from {', '.join(table)}")
    cls = table[variant]
    if download:
        _ensure_archive(cls, variant, root, [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]])
    sets = []
    for train in (True, False):
        ds = _torchvision_dataset(cls, variant, download, root=root, train=train)
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        sets.append(TensorImages(x, torch.tensor(ds.targets), list(ds.classes)))
    return Splits(sets[0], sets[1])


_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def load_stl10(root: str, download: bool = False, train_split: str = "unlabeled") -> Splits:
    """STL-10 through torchvision: pretrain on `train_split`, evaluate train -> test."""
    from torchvision.datasets import STL10

    allowed = ("unlabeled", "train", "train+unlabeled")
    if train_split not in allowed:
        raise UserError(f"train_split={train_split}: choose from {', '.join(allowed)}")
    if download:
        _ensure_archive(STL10, "stl10", root, [f for f, _ in STL10.train_list + STL10.test_list])

    def split(name: str) -> TensorImages:
        ds = _torchvision_dataset(STL10, "stl10", download, root=root, split=name)
        classes = list(getattr(ds, "classes", None) or _STL10_CLASSES)  # torchvision sets it only with class_names.txt
        return TensorImages(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64)), classes)

    labeled, test = split("train"), split("test")
    train = labeled if train_split == "train" else split(train_split)
    return Splits(train, test, eval_train=labeled)


def load_imagefolder(root: str, image_size: int = 64, test_fraction: float = 0.2, seed: int = 0,
                     channels: int = 3, cache_gb: float = 2.0) -> Splits:
    """Every image under root, recursively. With class sub-folders (root/<class>/<image>, two or more)
    a seeded stratified split gives the evaluation's test set; a flat folder or a single class trains
    without labels (no test set). Decoded once at image_size; when they fit in `cache_gb` the images
    stay in memory as uint8 (the on-device pipeline then serves them), else workers decode per batch."""
    if not os.path.isdir(root):
        raise UserError(f"dataset.source.root={root}: not a folder of images")
    paths = image_files(root)
    if not paths:
        raise UserError(f"dataset.source.root={root}: has no image files (any format Pillow reads, in it or below)")
    fits = len(paths) * channels * image_size**2 <= cache_gb * 2**30
    ok, images = decode_all(paths, image_size, channels, keep=fits)
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
    if images is not None and len(keep) < len(images):
        images = images[torch.from_numpy(keep)]

    def subset(ix: np.ndarray) -> Dataset:
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
    tr, te = _stratified_split(labels, test_fraction, seed)
    return Splits(subset(tr), subset(te))
