"""The named datasets: scikit-learn's digits, the MNIST family (IDX files, Debian's package or a
download), CIFAR-10/100 and STL-10 (torchvision's readers and downloads), each held in memory as uint8."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import importlib.util
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .images import Splits, TensorImages, stratified_split


def load_digits(image_size: int = 16, test_fraction: float = 0.25, seed: int = 0) -> Splits:
    """scikit-learn's 8x8 digits (values 0..16), scaled to uint8 and upscaled bilinearly."""
    images, target = _digits()
    x = torch.from_numpy(images).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.from_numpy(target)
    tr, te = stratified_split(target, test_fraction, seed)
    classes = [str(i) for i in range(10)]
    return Splits(TensorImages(x[tr], y[tr], classes), TensorImages(x[te], y[te], classes))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64, labels int64): the CSV file inside scikit-learn's package, read as its
    `load_digits` reads it, found without importing scikit-learn (its import is 1.3 s); its loader where
    the file is elsewhere."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sk_digits

        d = sk_digits()
        return d.images, d.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


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

