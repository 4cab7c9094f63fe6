"""Dataset loaders on tiny data written by the tests in the real on-disk formats, and the batch iterator.

No network: every dataset here is either made in tmp_path or shipped by scikit-learn.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contrastive_cli.data import (
    FolderImages,
    TensorImages,
    iterate_batches,
    load_cifar,
    load_digits,
    load_imagefolder,
    load_mnist,
    load_stl10,
    num_batches,
)
from contrastive_cli.data.images import stratified_split
from contrastive_cli.errors import UserError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]


def rand_u8(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture
def files_only_integrity(monkeypatch):
    """torchvision's CIFAR10 / STL10 verify the md5 of every file even with download=False
    (`_check_integrity`, and CIFAR's `_load_meta` for batches.meta), through the module-level
    `check_integrity` of torchvision.datasets.cifar / .stl10. Tiny test files cannot match the real
    checksums, so in these tests ONLY the md5 comparison is replaced by "the file exists"; the rest
    of torchvision's real loading code (pickle / binary parsing, reshapes, meta) runs unchanged."""
    import torchvision.datasets.cifar as cifar_mod
    import torchvision.datasets.stl10 as stl10_mod

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(cifar_mod, "check_integrity", exists)
    monkeypatch.setattr(stl10_mod, "check_integrity", exists)


# -------------------------------------------------------------------------------------------- CIFAR

def write_cifar10(root: Path, per_batch: int = 2, n_test: int = 3) -> tuple[np.ndarray, list, np.ndarray, list]:
    """cifar-10-batches-py/ as in cifar-10-python.tar.gz. The real files are Python 2 pickles that
    torchvision loads with encoding="latin1", which turns their byte-string keys into str; a Python 3
    pickle with str keys loads to the same dict (torchvision's own tests write them this way)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    train_imgs, train_labels = [], []
    for b in range(1, 6):
        imgs = rand_u8((per_batch, 3, 32, 32), seed=b)  # (N, C, H, W)
        labels = [(b * 3 + i) % 10 for i in range(per_batch)]
        # a row is 3072 bytes: the R plane (32x32, row-major), then G, then B
        with open(d / f"data_batch_{b}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {b} of 5", "labels": labels,
                         "data": imgs.reshape(per_batch, 3072), "filenames": []}, f)
        train_imgs.append(imgs)
        train_labels += labels
    test_imgs = rand_u8((n_test, 3, 32, 32), seed=99)
    test_labels = [9, 0, 4][:n_test]
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": test_labels,
                     "data": test_imgs.reshape(n_test, 3072), "filenames": []}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return np.concatenate(train_imgs), train_labels, test_imgs, test_labels


def test_cifar10_from_the_real_pickle_layout(tmp_path, files_only_integrity):
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path)
    # one pixel whose three channels are known by construction, to pin down the channel layout
    batch1 = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(batch1, "rb") as f:
        entry = pickle.load(f)
    h, w = 5, 17
    for c, value in enumerate((11, 22, 33)):
        entry["data"][0, c * 1024 + h * 32 + w] = value
    with open(batch1, "wb") as f:
        pickle.dump(entry, f)

    s = load_cifar("cifar10", root=str(tmp_path))
    assert isinstance(s.train, TensorImages) and isinstance(s.test, TensorImages)
    assert s.train.images.dtype == torch.uint8 and s.test.images.dtype == torch.uint8
    assert s.train.images.shape == (10, 3, 32, 32) and s.test.images.shape == (3, 3, 32, 32)
    assert s.train.images[0, :, h, w].tolist() == [11, 22, 33]  # R, G, B planes -> channels 0, 1, 2
    train_x[0, :, h, w] = (11, 22, 33)
    assert torch.equal(s.train.images, torch.from_numpy(train_x))
    assert torch.equal(s.test.images, torch.from_numpy(test_x))
    assert s.train.labels.tolist() == train_y and s.test.labels.tolist() == test_y
    assert s.train.labels.dtype == torch.int64
    assert s.train.classes == CIFAR_CLASSES and s.test.classes == CIFAR_CLASSES
    assert s.eval_train is s.train
    img, label = s.test[1]
    assert img.shape == (3, 32, 32) and label == 0


def test_cifar_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as e:
        load_cifar("cifar10", root=str(tmp_path))
    msg = str(e.value)
    assert "cifar10" in msg and "cifar-10-batches-py" in msg and str(tmp_path) in msg
    assert "download" in msg


def test_cifar_with_wrong_checksums_is_a_user_error(tmp_path):
    # without the test-only md5 patch, torchvision rejects files that are not the real ones
    write_cifar10(tmp_path)
    with pytest.raises(UserError, match="cifar10 not found"):
        load_cifar("cifar10", root=str(tmp_path))


def test_cifar_missing_meta_is_a_user_error(tmp_path, files_only_integrity):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_cifar("cifar10", root=str(tmp_path))


def test_cifar_unknown_variant(tmp_path):
    with pytest.raises(UserError, match="cifar10, cifar100"):
        load_cifar("cifar1000", root=str(tmp_path))


# -------------------------------------------------------------------------------------------- MNIST

def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX: 0x00 0x00, type 0x08 (unsigned byte), ndim; big-endian uint32 dims; the data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int, n_test: int, gz: bool, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train-images-idx3-ubyte": rand_u8((n_train, 28, 28), seed),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rand_u8((n_test, 28, 28), seed + 1),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3 + 1) % 10,
    }
    for name, arr in data.items():
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(idx_bytes(arr))
        else:
            (folder / name).write_bytes(idx_bytes(arr))
    return data


def test_idx_magic_numbers_match_the_spec():
    # guards the writer above: images start 0x00000803, labels 0x00000801
    assert idx_bytes(np.zeros((2, 28, 28), np.uint8))[:4] == (0x00000803).to_bytes(4, "big")
    assert idx_bytes(np.zeros(2, np.uint8))[:8] == (0x00000801).to_bytes(4, "big") + (2).to_bytes(4, "big")


def test_mnist_from_torchvision_raw_layout(tmp_path):
    data = write_mnist(tmp_path / "MNIST" / "raw", n_train=7, n_test=4, gz=False)
    s = load_mnist("mnist", root=str(tmp_path), system_dir=None)
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape == (7, 1, 28, 28)
    assert s.test.images.dtype == torch.uint8 and s.test.images.shape == (4, 1, 28, 28)
    assert torch.equal(s.train.images[:, 0], torch.from_numpy(data["train-images-idx3-ubyte"]))
    assert torch.equal(s.test.images[:, 0], torch.from_numpy(data["t10k-images-idx3-ubyte"]))
    assert s.train.images[3, 0, 2, 25].item() == data["train-images-idx3-ubyte"][3, 2, 25]  # row, column
    assert s.train.labels.tolist() == data["train-labels-idx1-ubyte"].tolist()
    assert s.test.labels.tolist() == data["t10k-labels-idx1-ubyte"].tolist()
    assert s.train.labels.dtype == torch.int64
    assert s.train.classes == [str(i) for i in range(10)]


def test_fashion_mnist_from_gzipped_system_dir(tmp_path):
    root, system = tmp_path / "empty", tmp_path / "usr-share-datasets-fashion-mnist"
    root.mkdir()
    data = write_mnist(system, n_train=5, n_test=3, gz=True, seed=5)
    s = load_mnist("fashion_mnist", root=str(root), system_dir=str(system))
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape == (5, 1, 28, 28)
    assert s.test.images.shape == (3, 1, 28, 28)
    assert torch.equal(s.train.images[:, 0], torch.from_numpy(data["train-images-idx3-ubyte"]))
    assert torch.equal(s.test.images[:, 0], torch.from_numpy(data["t10k-images-idx3-ubyte"]))
    assert s.train.labels.tolist() == data["train-labels-idx1-ubyte"].tolist()
    assert s.test.labels.tolist() == data["t10k-labels-idx1-ubyte"].tolist()
    assert s.train.classes == FASHION_CLASSES and s.test.classes == FASHION_CLASSES


def test_mnist_missing_files_name_what_and_where(tmp_path):
    with pytest.raises(UserError) as e:
        load_mnist("mnist", root=str(tmp_path))
    msg = str(e.value)
    assert "mnist" in msg
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert str(tmp_path / "MNIST" / "raw") in msg


def test_mnist_missing_test_files_are_named_with_the_system_dir(tmp_path):
    system = tmp_path / "system"
    write_mnist(system, n_train=2, n_test=2, gz=True)
    (system / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError) as e:
        load_mnist("fashion_mnist", root=str(tmp_path / "root"), system_dir=str(system))
    msg = str(e.value)
    assert "fashion_mnist" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "t10k-images-idx3-ubyte" not in msg and "train-" not in msg
    assert str(tmp_path / "root" / "FashionMNIST" / "raw") in msg and str(system) in msg


def test_truncated_idx_is_a_user_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(raw, n_train=3, n_test=2, gz=False)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated") as e:
        load_mnist("mnist", root=str(tmp_path))
    assert "train-images-idx3-ubyte" in str(e.value)


def test_non_idx_file_is_a_user_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(raw, n_train=3, n_test=2, gz=False)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(UserError, match="not an unsigned-byte IDX file"):
        load_mnist("mnist", root=str(tmp_path))


def test_mnist_unknown_variant(tmp_path):
    with pytest.raises(UserError, match="mnist, fashion_mnist"):
        load_mnist("kmnist", root=str(tmp_path))


# -------------------------------------------------------------------------------------------- STL-10

def write_stl10(root: Path, n_train: int = 3, n_test: int = 2, n_unlabeled: int = 2):
    """stl10_binary/ as in stl10_binary.tar.gz: X files are N x 3 x 96 x 96 bytes with each channel
    stored column-major (torchvision reshapes to (N, 3, 96, 96) then swaps the last two axes);
    y files are one byte per image, 1-based."""
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    out = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2), ("unlabeled", n_unlabeled, 3)):
        x = rand_u8((n, 3, 96, 96), seed)  # (N, C, H, W)
        (d / f"{split}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
        y = (np.arange(n) * 7 + seed) % 10
        if split != "unlabeled":
            (d / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
        out[split] = (x, y)
    classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (d / "class_names.txt").write_text("\n".join(classes) + "\n")
    return out, classes


def test_stl10_from_the_real_binary_layout(tmp_path, files_only_integrity):
    data, classes = write_stl10(tmp_path)
    s = load_stl10(str(tmp_path))  # default: pretrain on unlabeled
    (train_x, train_y), (test_x, test_y), (unl_x, _) = data["train"], data["test"], data["unlabeled"]
    for ds in (s.train, s.test, s.eval_train):
        assert isinstance(ds, TensorImages) and ds.images.dtype == torch.uint8
        assert ds.classes == classes
    assert s.train.images.shape == (2, 3, 96, 96)
    assert torch.equal(s.train.images, torch.from_numpy(unl_x))
    assert s.train.labels.tolist() == [-1, -1]
    assert s.eval_train.images.shape == (3, 3, 96, 96)
    assert torch.equal(s.eval_train.images, torch.from_numpy(train_x))
    # row vs column: H and W are not swapped
    assert s.eval_train.images[0, 2, 4, 90].item() == train_x[0, 2, 4, 90]
    assert s.eval_train.labels.tolist() == train_y.tolist()  # 1-based on disk, 0-based here
    assert torch.equal(s.test.images, torch.from_numpy(test_x))
    assert s.test.labels.tolist() == test_y.tolist()
    # the batch iterator works on it (the images come from a transposed numpy view)
    x, y = next(iterate_batches(s.test, batch_size=2, seed=0, epoch=0))
    assert x.shape == (2, 3, 96, 96) and x.dtype == torch.uint8


def test_stl10_train_splits(tmp_path, files_only_integrity):
    data, _ = write_stl10(tmp_path)
    s = load_stl10(str(tmp_path), train_split="train")
    assert s.train is s.eval_train and len(s.train) == 3
    s = load_stl10(str(tmp_path), train_split="train+unlabeled")
    assert len(s.train) == 5 and len(s.eval_train) == 3
    assert s.train.labels.tolist() == data["train"][1].tolist() + [-1, -1]
    assert torch.equal(s.train.images[3:], torch.from_numpy(data["unlabeled"][0]))
    with pytest.raises(UserError, match="train_split"):
        load_stl10(str(tmp_path), train_split="test")


def test_stl10_missing_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as e:
        load_stl10(str(tmp_path))
    msg = str(e.value)
    assert "stl10" in msg and "stl10_binary" in msg and str(tmp_path) in msg


# -------------------------------------------------------------------------------------- imagefolder

def write_imagefolder(root: Path) -> None:
    rng = np.random.default_rng(0)
    sizes = [(20, 30), (16, 16), (40, 24), (9, 13)]
    for c in ("cat", "dog", "fox"):
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            if c == "fox" and i == 0:
                img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
            else:
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
            img.save(root / c / f"{i}.png")


def test_imagefolder_split_items_and_batches(tmp_path):
    write_imagefolder(tmp_path)
    s = load_imagefolder(str(tmp_path), image_size=16, test_fraction=0.5, seed=0, cache_gb=0, cache_dir=None)  # lazy
    assert isinstance(s.train, FolderImages) and isinstance(s.test, FolderImages)
    assert len(s.train) == 6 and len(s.test) == 6
    assert s.train.classes == ["cat", "dog", "fox"]
    # stratified: every class on both sides, two each
    assert sorted(s.train.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert sorted(s.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert not set(s.train.paths) & set(s.test.paths)
    # labels match the folder each file is in
    for ds in (s.train, s.test):
        for p, y in zip(ds.paths, ds.labels.tolist(), strict=True):
            assert Path(p).parent.name == ds.classes[y]
    # every item, greyscale 'L' included, is a uint8 RGB square
    for ds in (s.train, s.test):
        for i in range(len(ds)):
            img, y = ds[i]
            assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
            assert isinstance(y, int)
    grey = next(i for i, p in enumerate(s.train.paths + s.test.paths) if p.endswith(os.path.join("fox", "0.png")))
    ds, j = (s.train, grey) if grey < len(s.train) else (s.test, grey - len(s.train))
    img, _ = ds[j]
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])

    batches = list(iterate_batches(s.train, batch_size=2, seed=0, epoch=0, workers=0))
    assert len(batches) == 3 == num_batches(s.train, 2)
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape == (2, 3, 16, 16)
        assert y.shape == (2,)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(s.train.labels.tolist())


def test_imagefolder_split_depends_only_on_seed(tmp_path):
    write_imagefolder(tmp_path)
    a = load_imagefolder(str(tmp_path), image_size=16, test_fraction=0.5, seed=0, cache_gb=0, cache_dir=None)
    b = load_imagefolder(str(tmp_path), image_size=16, test_fraction=0.5, seed=0, cache_gb=0, cache_dir=None)
    assert a.train.paths == b.train.paths and a.test.paths == b.test.paths
    others = [load_imagefolder(str(tmp_path), image_size=16, test_fraction=0.5, seed=k, cache_gb=0, cache_dir=None).test.paths
              for k in range(1, 6)]
    assert any(p != a.test.paths for p in others)


def test_imagefolder_bad_roots(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="not a folder") as e:
        load_imagefolder(str(missing))
    assert str(missing) in str(e.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    with pytest.raises(UserError) as e:
        load_imagefolder(str(tmp_path / "empty"))
    assert str(e.value) == (f"dataset.source.root={tmp_path / 'empty'}: has no image files (any format Pillow "
                            "reads, in it or below)")
    lopsided = tmp_path / "lopsided"
    for c, n in (("a", 3), ("b", 1)):
        (lopsided / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(lopsided / c / f"{i}.png")
    with pytest.raises(UserError, match="need 2 readable images in each class folder"):
        load_imagefolder(str(lopsided))
    write_imagefolder(tmp_path / "ok")
    with pytest.raises(UserError, match="test_fraction"):
        load_imagefolder(str(tmp_path / "ok"), test_fraction=1.0)


def test_imagefolder_is_cached_as_uint8_when_it_fits_with_the_same_pixels(tmp_path):
    write_imagefolder(tmp_path)
    lazy = load_imagefolder(str(tmp_path), image_size=16, test_fraction=0.5, seed=0, cache_gb=0, cache_dir=None)
    cached = load_imagefolder(str(tmp_path), image_size=16, test_fraction=0.5, seed=0)
    assert isinstance(cached.train, TensorImages) and cached.train.images.shape == (6, 3, 16, 16)
    assert cached.train.classes == ["cat", "dog", "fox"]
    for a, b in ((lazy.train, cached.train), (lazy.test, cached.test)):
        assert torch.equal(torch.stack([a[i][0] for i in range(len(a))]), b.images)
        assert torch.equal(a.labels, b.labels)


def test_imagefolder_ignores_loose_files_next_to_class_folders(tmp_path, caplog):
    write_imagefolder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "cover.png")
    with caplog.at_level("WARNING"):
        s = load_imagefolder(str(tmp_path), image_size=16, test_fraction=0.5, seed=0, cache_gb=0, cache_dir=None)
    assert s.train.classes == ["cat", "dog", "fox"] and len(s.train) + len(s.test) == 12
    assert "ignored 1 image file(s) directly in" in caplog.text and "cover.png" in caplog.text


@pytest.mark.parametrize("layout", ["flat", "nested", "one_class"])
def test_imagefolder_without_class_folders_trains_unlabeled(tmp_path, layout):
    rng = np.random.default_rng(0)
    # nested: sub-folders below one first-level folder are still one class, so no labels
    where = {"flat": ["", "", "", ""], "nested": ["", "x", "x/y", "x/z"], "one_class": ["only"] * 4}[layout]
    for i, sub in enumerate(where):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        mode, shape = [("RGB", (9, 7, 3)), ("L", (5, 5)), ("RGBA", (8, 8, 4)), ("RGB", (30, 20, 3))][i]
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(tmp_path / sub / f"{i}.png")
    Image.new("P", (6, 6)).save(tmp_path / where[0] / "palette.gif")  # a palette image, next to the others
    (tmp_path / "readme.txt").write_text("not an image")  # ignored: not an image extension
    s = load_imagefolder(str(tmp_path), image_size=8, channels=1)
    assert not s.labeled and s.test is None
    assert s.train.images.shape == (5, 1, 8, 8) and s.train.labels.tolist() == [-1] * 5


# ------------------------------------------------------------------------------------------- digits

def test_digits():
    s = load_digits(image_size=32)
    assert len(s.train) + len(s.test) == 1797
    for ds in (s.train, s.test):
        assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (1, 32, 32)
        assert ds.classes == [str(i) for i in range(10)]
    assert abs(len(s.test) / 1797 - 0.25) < 0.01
    assert s.train.images.max() >= 250 and s.train.images.min() == 0  # uses the uint8 range
    train_counts = torch.bincount(s.train.labels, minlength=10)
    test_counts = torch.bincount(s.test.labels, minlength=10)
    total = train_counts + test_counts
    assert (test_counts > 0).all()
    assert ((test_counts.float() - 0.25 * total.float()).abs() <= 1).all()  # stratified
    again = load_digits(image_size=32)
    assert torch.equal(again.test.images, s.test.images)


def test_digits_image_size():
    s = load_digits(image_size=24)  # not the default (16)
    assert s.train.images.shape[1:] == (1, 24, 24)


def test_digits_load_without_scikit_learn_and_split_as_it_splits():
    """The default data's start-up reads digits from scikit-learn's own file without importing it (1.3 s),
    and splits it as scikit-learn's train_test_split did: the runs of earlier versions keep their test split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    probe = subprocess.run([sys.executable, "-c", "import sys; from contrastive_cli.data import load_digits; "
                            "s = load_digits(); print(len(s.train), len(s.test), 'sklearn' in sys.modules)"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["1347", "450", "False"], probe.stderr
    d = sk_digits()
    tr, te = train_test_split(np.arange(1797), test_size=0.25, random_state=0, stratify=d.target)
    s = load_digits(image_size=8)  # the originals' size: pixels comparable one to one
    expected = torch.from_numpy(d.images[np.sort(te)] / 16 * 255).round().to(torch.uint8).unsqueeze(1)
    assert torch.equal(s.test.images, expected) and s.test.labels.tolist() == d.target[np.sort(te)].tolist()
    assert s.train.labels.tolist() == d.target[np.sort(tr)].tolist()
    rng = np.random.RandomState(0)
    for _ in range(200):  # other class counts, fractions and seeds, ties between remainders among them
        k = rng.randint(2, 8)
        labels = rng.permutation(np.repeat(np.arange(k), rng.randint(2, 40, k)))  # classes interleaved
        fraction, seed = rng.choice([0.1, 0.25, 0.5, 0.7, rng.uniform(0.05, 0.95)]), rng.randint(100)
        if min(math.ceil(fraction * len(labels)), len(labels) - math.ceil(fraction * len(labels))) < k:
            continue  # the one-line refusal below
        ref = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=labels)
        mine = stratified_split(labels, fraction, seed)
        assert all(np.array_equal(np.sort(r), m) for r, m in zip(ref, mine, strict=True)), (np.bincount(labels), fraction, seed)


def test_a_split_without_an_image_of_each_class_on_each_side_is_one_line():
    with pytest.raises(UserError, match=r"^test_fraction=0.25: holds out 2 of 6 images and trains on 4, and each "
                                        r"side needs an image of each of the 3 classes$"):
        stratified_split(np.array([0, 0, 1, 1, 2, 2]), 0.25, 0)


# --------------------------------------------------------------------------------- batch iteration

def tensor_data(n=10):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return TensorImages(images, torch.arange(n) % 3, ["a", "b", "c"])


def order(data, **kw):
    return torch.cat([x[:, 0, 0, 0] for x, _ in iterate_batches(data, **kw)]).tolist()


def test_iterate_batches_order_depends_on_seed_and_epoch():
    data = tensor_data(10)
    a = order(data, batch_size=3, seed=1, epoch=0, drop_last=False)
    assert sorted(a) == list(range(10))  # a permutation: each image once
    assert a == order(data, batch_size=3, seed=1, epoch=0, drop_last=False)
    assert a != order(data, batch_size=3, seed=1, epoch=1, drop_last=False)
    assert a != order(data, batch_size=3, seed=2, epoch=0, drop_last=False)
    assert order(data, batch_size=3, seed=1, epoch=0, shuffle=False, drop_last=False) == list(range(10))


def test_iterate_batches_labels_follow_images():
    data = tensor_data(10)
    for x, y in iterate_batches(data, batch_size=4, seed=3, epoch=2, drop_last=False):
        assert (x[:, 0, 0, 0].long() % 3 == y).all()
        assert x.dtype == torch.uint8 and y.dtype == torch.int64


def test_drop_last_and_num_batches_agree():
    data = tensor_data(10)
    kept = list(iterate_batches(data, batch_size=3, seed=0, epoch=0))
    assert [len(x) for x, _ in kept] == [3, 3, 3] and len(kept) == num_batches(data, 3)
    all_ = list(iterate_batches(data, batch_size=3, seed=0, epoch=0, drop_last=False))
    assert [len(x) for x, _ in all_] == [3, 3, 3, 1] and len(all_) == num_batches(data, 3, drop_last=False)
    # the batches kept under drop_last are the first ones of the same order
    assert order(data, batch_size=3, seed=0, epoch=0) == order(data, batch_size=3, seed=0, epoch=0,
                                                               drop_last=False)[:9]
    exact = list(iterate_batches(data, batch_size=5, seed=0, epoch=0))
    assert len(exact) == 2 == num_batches(data, 5) == num_batches(data, 5, drop_last=False)


DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package(tmp_path):
    from contrastive_cli.data import load_mnist

    splits = load_mnist("fashion_mnist", root=str(tmp_path), system_dir=str(DEBIAN_FMNIST))
    assert splits.train.images.shape == (60000, 1, 28, 28) and len(splits.test) == 10000
    assert splits.train.labels.bincount().tolist() == [6000] * 10
