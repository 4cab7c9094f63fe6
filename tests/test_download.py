"""Downloads by default (dataset.source.download=true): files already there are used without any
network access, a failed download is one line that says what to put where by hand, and neither a
failure nor an interruption leaves anything half-written under the data folder.

The network is faked by monkeypatching `urllib.request.urlopen` (what torchvision's downloader calls)
or torchvision's download functions; one test makes the real attempt, where that fails fast (offline).
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torchvision.datasets.utils as tv_utils
from conftest import compose_cfg
from test_data import CIFAR_CLASSES, write_cifar10, write_mnist
from torchvision.datasets import CIFAR10, MNIST, STL10, FashionMNIST

from contrastive_cli.data import load_cifar, load_mnist, load_stl10
from contrastive_cli.data import named as data
from contrastive_cli.errors import UserError

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


def left_behind(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def offline(monkeypatch):
    """Every connection fails the way a machine without DNS fails; the calls are counted."""
    calls = []

    def refuse(req, *a, **k):
        calls.append(getattr(req, "full_url", req))
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


@pytest.fixture
def no_network(monkeypatch):
    """Any network access fails the test."""
    def forbidden(req, *a, **k):
        pytest.fail(f"network access: {getattr(req, 'full_url', req)}")

    monkeypatch.setattr(urllib.request, "urlopen", forbidden)
    monkeypatch.setattr(tv_utils, "download_url", forbidden)


@pytest.fixture
def md5_off(monkeypatch):
    """Tiny test files cannot match torchvision's md5s: only that comparison becomes "the file exists"
    (as test_data.py's files_only_integrity does)."""
    import torchvision.datasets.cifar as cifar_mod

    monkeypatch.setattr(cifar_mod, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_the_configs_download_by_default_and_false_still_forces_offline():
    for name in ("cifar10", "cifar100", "stl10", "mnist", "fashion_mnist"):
        assert compose_cfg("train", [f"dataset={name}"]).dataset.source.download is True, name
    cfg = compose_cfg("train", ["dataset=cifar10", "dataset.source.download=false"])
    assert cfg.dataset.source.download is False


# ------------------------------------------------------------------------------- failed downloads

def test_cifar10_download_failure_is_one_line_naming_file_and_folder(tmp_path, offline):
    with pytest.raises(UserError) as e:
        load_cifar("cifar10", root=str(tmp_path), download=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("dataset cifar10 not found") and "download failed (" in msg
    assert "Name or service not known" in msg
    assert CIFAR10.filename in msg and "https://www.cs.toronto.edu/~kriz/" in msg
    assert f"{tmp_path / CIFAR10.base_folder}/" in msg and "paths.data_dir=" in msg
    assert offline and left_behind(tmp_path) == []


def test_mnist_download_failure_tries_every_mirror_and_names_every_file(tmp_path, offline):
    with pytest.raises(UserError) as e:
        load_mnist("mnist", root=str(tmp_path), download=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("dataset mnist not found") and "download failed (" in msg
    assert all(f in msg for f, _ in MNIST.resources) and MNIST.mirrors[0] in msg
    assert str(tmp_path / "MNIST" / "raw") in msg
    assert {u.split("/")[2] for u in offline} == {m.split("/")[2] for m in MNIST.mirrors}
    assert left_behind(tmp_path) == []


def test_stl10_download_failure_names_the_archive(tmp_path, offline):
    with pytest.raises(UserError) as e:
        load_stl10(root=str(tmp_path), download=True)
    msg = str(e.value)
    assert "\n" not in msg and STL10.filename in msg and f"{tmp_path / STL10.base_folder}/" in msg
    assert left_behind(tmp_path) == []


@pytest.mark.parametrize(("error", "reason"), [
    (urllib.error.HTTPError("u", 404, "Not Found", None, None), "(HTTP 404 Not Found)"),
    (urllib.error.URLError(TimeoutError("timed out")), f"(no answer within {data.DOWNLOAD_TIMEOUT_S} s)"),
    (ConnectionResetError(104, "Connection reset by peer"), "Connection reset by peer)"),
])
def test_the_reason_is_short(tmp_path, monkeypatch, error, reason):
    def fail(*a, **k):
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    with pytest.raises(UserError) as e:
        load_cifar("cifar100", root=str(tmp_path), download=True)
    assert reason in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_data_folder_made_for_the_attempt_goes_again(tmp_path, offline):
    root = tmp_path / "new" / "data"
    with pytest.raises(UserError, match="download failed"):
        load_cifar("cifar10", root=str(root), download=True)
    assert left_behind(tmp_path) == []


def test_the_socket_timeout_is_bounded_during_the_download_and_restored_after(tmp_path, monkeypatch):
    seen = []

    def fetch(*a, **k):
        seen.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fetch)
    before = socket.getdefaulttimeout()
    with pytest.raises(UserError, match=r"download failed \(offline\)"):
        load_cifar("cifar10", root=str(tmp_path), download=True)
    assert seen == [data.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == before


def fails_fast(host: str) -> bool:
    """Whether a connection to `host` fails at once here (no DNS, or refused): only then is the real
    attempt below quick, and certain not to download hundreds of MB."""
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except (socket.gaierror, ConnectionRefusedError, OSError) as e:
        return not isinstance(e, TimeoutError)
    return False


@pytest.mark.skipif(not fails_fast(CIFAR10.url.split("/")[2]), reason="the network answers (or hangs) here")
def test_a_real_download_attempt_offline_fails_in_seconds(tmp_path):
    for load in (lambda: load_cifar("cifar10", root=str(tmp_path), download=True),
                 lambda: load_mnist("mnist", root=str(tmp_path), download=True)):
        t0 = time.monotonic()
        with pytest.raises(UserError, match="download failed") as e:
            load()
        assert time.monotonic() - t0 < data.DOWNLOAD_TIMEOUT_S and "\n" not in str(e.value)
        assert left_behind(tmp_path) == []


# ------------------------------------------------------------------------------ files already there

def test_cifar10_present_loads_without_the_network(tmp_path, no_network, md5_off):
    write_cifar10(tmp_path)
    s = load_cifar("cifar10", root=str(tmp_path), download=True)
    assert s.train.images.shape == (10, 3, 32, 32) and s.test.classes == CIFAR_CLASSES


def test_cifar10_present_but_not_the_original_files_is_a_user_error_without_the_network(tmp_path, no_network):
    # torchvision's own download=True would fetch the archive again over files whose md5 differs
    write_cifar10(tmp_path)
    with pytest.raises(UserError, match="fails torchvision's md5 check") as e:
        load_cifar("cifar10", root=str(tmp_path), download=True)
    assert "delete that folder to download it again" in str(e.value)


def test_mnist_present_loads_without_the_network(tmp_path, no_network):
    write_mnist(tmp_path / "MNIST" / "raw", n_train=4, n_test=2, gz=True)
    s = load_mnist("mnist", root=str(tmp_path), download=True)
    assert len(s.train) == 4 and len(s.test) == 2


def test_fashion_mnist_from_the_system_folder_wins_without_the_network(tmp_path, no_network):
    system, root = tmp_path / "system", tmp_path / "data"
    write_mnist(system, n_train=3, n_test=2, gz=True)
    s = load_mnist("fashion_mnist", root=str(root), download=True, system_dir=str(system))
    assert len(s.train) == 3 and not root.exists()


@pytest.mark.skipif(not (SYSTEM_FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_debians_fashion_mnist_wins_without_the_network(tmp_path, no_network):
    s = load_mnist("fashion_mnist", root=str(tmp_path / "data"), download=True, system_dir=str(SYSTEM_FASHION))
    assert len(s.train) == 60_000 and len(s.test) == 10_000 and not (tmp_path / "data").exists()


def test_download_false_never_touches_the_network(tmp_path, no_network):
    with pytest.raises(UserError, match="download=true to fetch") as e:
        load_cifar("cifar10", root=str(tmp_path), download=False)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="download=true to fetch"):
        load_mnist("mnist", root=str(tmp_path), download=False)
    assert left_behind(tmp_path) == []


# ----------------------------------------------------------------- interrupted and finished downloads

def partial_then(exc: BaseException):
    """torchvision's download_url, cut off: half an archive written where it was asked to go, then `exc`."""
    def download_url(url, root, filename=None, md5=None, **k):
        os.makedirs(root, exist_ok=True)
        Path(root, filename or os.path.basename(url)).write_bytes(b"\x1f\x8b" + b"\0" * 1000)
        raise exc

    return download_url


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), ConnectionResetError(104, "Connection reset by peer"),
                                 TimeoutError("timed out")], ids=["ctrl-c", "reset", "timeout"])
def test_an_interrupted_cifar_download_leaves_nothing_behind(tmp_path, monkeypatch, exc):
    monkeypatch.setattr(tv_utils, "download_url", partial_then(exc))
    with pytest.raises(UserError if isinstance(exc, Exception) else KeyboardInterrupt):
        load_cifar("cifar10", root=str(tmp_path), download=True)
    assert left_behind(tmp_path) == []


def test_a_half_extracted_archive_leaves_nothing_behind(tmp_path, monkeypatch):
    def extract_then_fail(url, download_root, **k):
        (Path(download_root) / CIFAR10.base_folder).mkdir(parents=True)
        (Path(download_root) / CIFAR10.base_folder / "data_batch_1").write_bytes(b"\0" * 100)
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", extract_then_fail)
    with pytest.raises(UserError, match="end-of-stream"):
        load_cifar("cifar10", root=str(tmp_path), download=True)
    assert left_behind(tmp_path) == []


def test_mnist_cut_off_after_some_files_moves_none_of_them(tmp_path, monkeypatch):
    calls = []

    def fetch(url, download_root, filename=None, md5=None, remove_finished=False):
        calls.append(url)
        if len(calls) == 3:
            raise KeyboardInterrupt
        write_mnist(Path(download_root), n_train=2, n_test=1, gz=False)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fetch)
    with pytest.raises(KeyboardInterrupt):
        load_mnist("mnist", root=str(tmp_path), download=True)
    assert left_behind(tmp_path) == []


def test_a_finished_download_is_moved_into_place_and_nothing_else_stays(tmp_path, monkeypatch, md5_off):
    def fetch(url, download_root, filename=None, md5=None, **k):
        assert url == CIFAR10.url and Path(download_root).parent == tmp_path  # next to the final place
        Path(download_root, filename).write_bytes(b"archive")
        write_cifar10(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fetch)
    s = load_cifar("cifar10", root=str(tmp_path), download=True)
    assert len(s.train) == 10
    assert left_behind(tmp_path) == sorted(
        [CIFAR10.base_folder] + [f"{CIFAR10.base_folder}/{f}" for f in
                                 ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                                  "test_batch", "batches.meta"]])


def test_an_incomplete_folder_is_completed(tmp_path, monkeypatch, md5_off):
    (tmp_path / CIFAR10.base_folder).mkdir()
    (tmp_path / CIFAR10.base_folder / "data_batch_1").write_bytes(b"cut off")
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", lambda url, root, **k: write_cifar10(Path(root)))
    s = load_cifar("cifar10", root=str(tmp_path), download=True)
    assert len(s.train) == 10 and len(os.listdir(tmp_path / CIFAR10.base_folder)) == 7
    assert [p.name for p in tmp_path.iterdir()] == [CIFAR10.base_folder]


def test_mnist_download_lands_in_torchvisions_raw_layout(tmp_path, monkeypatch):
    def fetch(url, download_root, filename=None, md5=None, remove_finished=False):
        assert url.startswith(FashionMNIST.mirrors[0]) and remove_finished
        write_mnist(Path(download_root), n_train=2, n_test=1, gz=False)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fetch)
    s = load_mnist("fashion_mnist", root=str(tmp_path), download=True, system_dir=str(tmp_path / "none"))
    assert len(s.train) == 2
    assert left_behind(tmp_path) == ["FashionMNIST", "FashionMNIST/raw"] + [
        f"FashionMNIST/raw/{f}" for f in sorted(["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                                                 "train-images-idx3-ubyte", "train-labels-idx1-ubyte"])]
