"""Atomic checkpoint writes and safe, checked reads (torch.load with weights_only=True)."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

FORMAT = "contrastive_cli/1"


def save_atomic(payload: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves either the
    old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, key: str = "checkpoint") -> dict:
    """Load a checkpoint written by cl-train, or raise a one-line UserError saying what is wrong."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise UserError(f"{key}={path}: no such file (expected <run dir>/checkpoints/last.pt)")
    if not p.is_file():
        raise UserError(f"{key}={path}: is a folder, not a checkpoint file (try {p / 'checkpoints' / 'last.pt'})")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for torn or foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{key}={path}: not a readable cl-train checkpoint (truncated or foreign file: {reason[:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{key}={path}: not a cl-train checkpoint (format {FORMAT} expected)")
    return ckpt


def rng_state() -> dict:
    """The global RNGs: python, numpy (legacy global), torch CPU/CUDA. (The data order and the
    augmentation's generator are seeded from (seed, epoch, rank), so they need no state.)"""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy(), state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
