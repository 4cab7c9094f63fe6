import os

import pytest
import torch

from contrastive_cli import checkpoint
from contrastive_cli.errors import UserError


def test_save_is_atomic_and_loads_back(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save_atomic({"epoch": 3, "model": {"w": torch.ones(2)}}, path)
    assert checkpoint.load(path)["epoch"] == 3
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left behind


def test_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"epoch": 1}, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_foreign_and_torn_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(1)}, plain)
    with pytest.raises(UserError, match="not a cl-train checkpoint"):
        checkpoint.load(plain)
    good = tmp_path / "good.pt"
    checkpoint.save_atomic({"epoch": 1, "model": {"w": torch.randn(1000)}}, good)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        checkpoint.load(torn)


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    checkpoint.save_atomic({"rng": checkpoint.rng_state()}, tmp_path / "rng.pt")
    a = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])  # through weights_only loading
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
