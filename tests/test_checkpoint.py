import os
import zipfile

import pytest
import torch

from contrastive_cli import checkpoint
from contrastive_cli.errors import UserError


def payload(epoch: int = 1, weight: torch.Tensor | None = None) -> dict:
    """What cl-train writes, in small."""
    w = torch.linspace(-1, 1, 1000) if weight is None else weight
    model = {"encoder.w": w, "encoder.bn.running_var": torch.ones(4), "head.b": torch.zeros(3)}
    return {"config": "trainer:\n  epochs: 2\n", "epoch": epoch, "step": 10 * epoch, "history": [{"loss": 1.5}],
            "model": model, "encoder": {"w": w, "bn.running_var": torch.ones(4)}, "optimizer": {"state": {}},
            "scheduler": {"last_epoch": 10 * epoch}, "scaler": {}, "rng": checkpoint.rng_state()}


def test_save_is_atomic_and_loads_back(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save_atomic(payload(3), path)
    assert checkpoint.load(path)["epoch"] == 3
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left behind


def test_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic(payload(1), path)

    def boom(*args, **kwargs):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        checkpoint.save_atomic(payload(2), path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "last.pt"
    checkpoint.save_atomic(payload(1), path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="cannot write checkpoint .*last.pt: No space left on device.*kept"):
        checkpoint.save_atomic(payload(2), path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_a_disk_that_fills_inside_torch_save_is_one_line_too(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "last.pt"
    checkpoint.save_atomic(payload(1), path)
    real_save = torch.save

    class FillsUp:  # the file object torch's zip writer gets: the disk fills after 4 KB
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            self.written += len(b)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    # torch's writer turns the OSError into RuntimeError('... unexpected pos ...'): the real path
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, FillsUp(f)))
    with pytest.raises(UserError, match="cannot write checkpoint .*last.pt: No space left on device.*kept"):
        checkpoint.save_atomic(payload(2, weight=torch.randn(10_000)), path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_one_record_under_several_names_is_on_disk_once(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    names = [folder / "last.pt", folder / "best.pt", folder / "epoch_0030.pt"]
    checkpoint.save_atomic(payload(30), *names)
    assert sorted(os.listdir(folder)) == ["best.pt", "epoch_0030.pt", "last.pt"]  # no temporary file
    assert len({n.stat().st_ino for n in names}) == 1 and names[0].stat().st_nlink == 3
    assert all(checkpoint.load(n)["epoch"] == 30 for n in names)
    checkpoint.save_atomic(payload(31), names[0])  # a later last.pt replaces only last.pt
    assert checkpoint.load(names[0])["epoch"] == 31 and checkpoint.load(names[2])["epoch"] == 30

    def no_links(*args):  # some network and FAT file systems
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    checkpoint.save_atomic(payload(40), folder / "last.pt", folder / "epoch_0040.pt")
    assert checkpoint.load(folder / "epoch_0040.pt")["epoch"] == 40  # a copy instead
    assert (folder / "epoch_0040.pt").stat().st_ino != (folder / "last.pt").stat().st_ino
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_foreign_torn_and_incomplete_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(1)}, plain)
    with pytest.raises(UserError, match="not a cl-train checkpoint"):
        checkpoint.load(plain)
    good = tmp_path / "good.pt"
    checkpoint.save_atomic(payload(), good)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        checkpoint.load(torn)
    # the format tag, but not the keys a resume or an evaluation reads
    partial = tmp_path / "partial.pt"
    torch.save({"format": checkpoint.FORMAT, "epoch": 1, "config": ""}, partial)
    with pytest.raises(UserError, match="incomplete checkpoint, missing step, history, model"):
        checkpoint.load(partial)


def flip_tensor_byte(path, tensor: torch.Tensor) -> None:
    """Flip one byte in the middle of `tensor`'s stored bytes (zip records are stored uncompressed)."""
    raw = bytearray(path.read_bytes())
    needle = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = raw.find(needle)
    assert at > 0 and raw.find(needle, at + 1) < 0, "tensor bytes not found once in the file"
    raw[at + len(needle) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_in_tensor_data_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    weight = torch.randn(500, generator=torch.Generator().manual_seed(0))
    checkpoint.save_atomic(payload(weight=weight), path)
    flip_tensor_byte(path, weight)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is not None  # only the zip's CRC notices; torch.load does not
    assert not torch.equal(torch.load(path, weights_only=True)["encoder"]["w"], weight)
    with pytest.raises(UserError, match="damaged checkpoint"):
        checkpoint.load(path)


def test_a_checkpoint_of_the_previous_format_is_still_verified(tmp_path):
    """Files written before the CRC-32 checksum (format /2, blake2b) load, checked by their own digest."""
    path = tmp_path / "old.pt"
    weight = torch.randn(500, generator=torch.Generator().manual_seed(1))
    body = payload(weight=weight)
    old = {"format": "contrastive_cli/2", **body, "checksum": checkpoint.payload_digest(body, "contrastive_cli/2")}
    assert len(old["checksum"]) == 40 and old["checksum"] != checkpoint.payload_digest(body)
    torch.save(old, path)
    assert torch.equal(checkpoint.load(path)["encoder"]["w"], weight)
    flip_tensor_byte(path, weight)
    with pytest.raises(UserError, match="damaged checkpoint"):
        checkpoint.load(path)


def test_non_finite_weights_are_refused(tmp_path):
    path = tmp_path / "last.pt"
    bad = payload()
    bad["encoder"]["bn.running_var"] = torch.tensor([1.0, float("inf"), 1.0, 1.0])
    checkpoint.save_atomic(bad, path)
    with pytest.raises(UserError, match=r"not finite \(bn.running_var holds nan or inf\)"):
        checkpoint.load(path)


def test_run_folder_resume_falls_back_to_the_newest_valid_checkpoint(tmp_path, caplog):
    folder = tmp_path / "run" / "checkpoints"
    for epoch, name in ((1, "epoch_0001.pt"), (2, "epoch_0002.pt"), (3, "last.pt")):
        checkpoint.save_atomic(payload(epoch), folder / name)
    path, ckpt = checkpoint.locate(tmp_path / "run")
    assert path.name == "last.pt" and ckpt["epoch"] == 3
    (folder / "last.pt").write_bytes((folder / "last.pt").read_bytes()[:2000])  # torn
    flip_tensor_byte(folder / "epoch_0002.pt", torch.linspace(-1, 1, 1000))  # damaged
    with caplog.at_level("WARNING"):
        path, ckpt = checkpoint.locate(tmp_path / "run")
    assert path.name == "epoch_0001.pt" and ckpt["epoch"] == 1
    assert "skipped last.pt" in caplog.text and "epoch_0002.pt (damaged" in caplog.text
    with pytest.raises(UserError, match="a folder without checkpoints/"):
        checkpoint.locate(tmp_path)  # a folder, but not a run folder
    (folder / "epoch_0001.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="no valid checkpoint"):
        checkpoint.locate(tmp_path / "run")


def test_orphans_of_a_killed_save_are_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    host = checkpoint._HOST
    orphan = tmp_path / f".last.pt.{host}.{pid}.abc123.tmp"
    live = tmp_path / f".last.pt.{host}.{os.getpid()}.def456.tmp"
    foreign_old = tmp_path / ".last.pt.otherhost.1.xyz.tmp"
    foreign_new = tmp_path / ".last.pt.otherhost.2.xyz.tmp"
    for f in (orphan, live, foreign_old, foreign_new):
        f.write_bytes(b"partial")
    os.utime(foreign_old, (0, 0))
    removed = checkpoint.remove_orphans(tmp_path)
    assert sorted(removed) == sorted([orphan, foreign_old])
    assert live.exists() and foreign_new.exists()


def test_long_reasons_are_cut_at_a_word():
    text = "word " * 60
    short = checkpoint._short(text, 40)
    assert short.endswith(" ...") and short[:-4].split(" ")[-1] == "word" and len(short) <= 44


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    p = payload()
    checkpoint.save_atomic(p, tmp_path / "rng.pt")
    a = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])  # through weights_only loading
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_last_pt_of_a_large_model_waits_for_ten_times_its_writing_time():
    from contrastive_cli.engine import last_due

    # 10 MB: 0.05 s at 200 MB/s, under a second: after every epoch, however short
    assert last_due(10_000_000, 0.0, final=False)
    assert last_due(0, 0.0, final=False)  # none written yet
    # 1.1 GB: 5.5 s to write; written once 55 s of training have passed since the last one
    assert not last_due(1_100_000_000, 30.0, final=False)
    assert last_due(1_100_000_000, 55.0, final=False)
    assert last_due(1_100_000_000, 1.0, final=True)  # the last epoch, or one writing best.pt or epoch_NNNN.pt
