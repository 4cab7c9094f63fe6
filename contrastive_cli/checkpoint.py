"""Checkpoints: atomic writes with a checksum of the payload, and checked reads (torch.load with
weights_only=True) that refuse torn, damaged, incomplete and non-finite files in one line."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import FILE_MODE

log = logging.getLogger(__name__)

FORMAT = "contrastive_cli/3"  # /3: CRC-32 checksum; /2 (blake2b) still verified; /1 (none) loads unverified
OLD_FORMATS = ("contrastive_cli/2", "contrastive_cli/1")
REQUIRED = ("config", "epoch", "step", "history", "model", "encoder", "optimizer", "scheduler", "scaler", "rng")
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())  # a part of a file name, without dots


class _CRC32:
    """zlib's CRC-32 with hashlib's interface. It finds every flipped byte and every burst of damage up
    to 32 bits (a check against damage, not tampering) at 6x blake2b's speed (4.1 against 0.66 GB/s on a
    Xeon): blake2b took 2.4 s of the 3.6 s that saving a 1.1 GB checkpoint (Barlow Twins' 8192-wide
    head) cost, paid after every epoch."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def payload_digest(payload: dict, fmt: str = FORMAT) -> str:
    """A checksum over every value of the payload, tensors by dtype, shape and bytes: a flipped byte in
    tensor data (which torch.load does not notice) changes it. CRC-32 for this format, blake2b for
    the files of format /2."""
    h = _CRC32() if fmt == FORMAT else hashlib.blake2b(digest_size=20)

    def feed(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself: no copy of it
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):  # pickling keeps tuples, but do not depend on it
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    feed(payload)
    return h.hexdigest()


def non_finite(state: dict) -> str | None:
    """The name of the first floating-point tensor of a state dict holding nan or inf, else None."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not _finite(t):
            return name
    return None


def _finite(t: torch.Tensor) -> bool:
    """The min and max are nan where any value is, inf where any is: one read, 8x `isfinite(t).all()`'s
    speed (0.05 against 0.42 s on a 8192 x 8192 weight; every epoch's checkpoint checks every weight)."""
    return not t.numel() or all(bool(torch.isfinite(v)) for v in torch.aminmax(t.detach()))


def save_atomic(payload: dict, path: str | Path, *also: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves either the
    old file or the new one, never a torn one. The temporary name holds host and pid, so a later
    start can tell an orphan of a killed save from a save in progress (`remove_orphans`). `also`:
    further names for the same record (an epoch that is both `last.pt` and `epoch_NNNN.pt`), hard
    links where the file system has them, so the bytes are on disk once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, **payload}
    record["checksum"] = payload_digest(payload)
    _write_then_rename(path, lambda f: torch.save(record, f))
    for other in map(Path, also):
        _write_then_rename(other, None, source=path)


def _write_then_rename(path: Path, write, source: Path | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)  # a checkpoint is as readable as any output
        if source is not None:
            try:  # never rewritten in place (always replaced by a rename), so sharing the inode is safe
                os.close(fd)
                os.replace(_linked(source, path.parent), tmp)
            except OSError:  # no hard links here (some network and FAT file systems): a copy
                with open(source, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
                    dst.flush()
                    os.fsync(dst.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch's zip writer turns a full disk into RuntimeError("... unexpected pos ...") raised
        # while handling the OSError: report the OSError
        cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if cause is not None:  # disk full, folder gone or read-only: the old file is untouched
            kept = " (the previous checkpoint there is kept)" if path.exists() else ""
            raise UserError(f"cannot write checkpoint {path}: {cause.strerror or cause}{kept}") from None
        raise


def _linked(source: Path, folder: Path) -> str:
    """A fresh hard link to `source` in `folder` (os.link cannot overwrite, hence a new name)."""
    name = folder / f".{source.name}.{_HOST}.{os.getpid()}.{random.getrandbits(32):08x}-link.tmp"  # as mkstemp's
    os.link(source, name)
    return str(name)


def remove_orphans(folder: str | Path, max_age_s: float = 3600.0) -> list[Path]:
    """Delete `.*.tmp` files left by a killed save: those of this host whose process is gone, and
    any other host's older than `max_age_s`. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.split(".")  # '', name, 'pt', host, pid, random, 'tmp'
        host, pid = (parts[-4], parts[-3]) if len(parts) >= 5 else ("", "")
        try:
            old = time.time() - tmp.stat().st_mtime > max_age_s
        except FileNotFoundError:  # removed meanwhile (its save finished)
            continue
        # this host's: its process is gone (containers may share a host name, hence the age too)
        if old or (host == _HOST and pid.isdigit() and not _alive(int(pid))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d unfinished checkpoint file(s) of a killed save in %s", len(removed), folder)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _short(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


def _what_file(p: Path, e: Exception) -> str:
    """What a file that torch.load refused is, in words (torch's own reason for a text file is '105')."""
    with open(p, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        reason = _short(str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
        return f"a truncated or damaged torch file: {reason}"
    if head.startswith(b"\x80"):
        return "a Python pickle that is not a torch checkpoint, or is truncated"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not a torch file (it starts with bytes {head[:4].hex(' ')})"
    return f"a text file, starting {_short(text, 40)!r}" if text.isprintable() or "\n" in text else "not a torch file"


def load(path: str | Path, key: str = "checkpoint") -> dict:
    """Load a checkpoint written by cl-train, or raise a one-line UserError saying what is wrong."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise UserError(f"{key}={path}: no such file (expected <run dir>/checkpoints/last.pt)")
    if not p.is_file():
        raise UserError(f"{key}={path}: is a folder, not a checkpoint file (try {p / 'checkpoints' / 'last.pt'})")
    try:
        with warnings.catch_warnings():  # torch's own warnings (legacy pickles ...) would precede the one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for torn or foreign files
        raise UserError(f"{key}={path}: not a readable cl-train checkpoint ({_what_file(p, e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (FORMAT, *OLD_FORMATS):
        raise UserError(f"{key}={path}: not a cl-train checkpoint (format {FORMAT} expected)")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise UserError(f"{key}={path}: incomplete checkpoint, missing {', '.join(missing)}")
    if ckpt["format"] != "contrastive_cli/1":
        stored = ckpt.pop("checksum", None)
        body = {k: v for k, v in ckpt.items() if k != "format"}
        if stored != payload_digest(body, ckpt["format"]):
            raise UserError(f"{key}={path}: damaged checkpoint (its checksum does not match its contents)")
    else:
        log.warning("%s was written by an older contrastive_cli without a checksum: loaded unverified", p)
    bad = non_finite(ckpt["model"]) or non_finite(ckpt["encoder"])
    if bad:
        raise UserError(f"{key}={path}: its weights are not finite ({bad} holds nan or inf); use an earlier checkpoint")
    return ckpt


def newest_valid(run_dir: str | Path, key: str = "trainer.resume") -> tuple[Path, dict]:
    """The newest checkpoint of a run folder that loads and verifies: last.pt (written every epoch
    and on a signal), else the numbered ones from the highest down; damaged ones are skipped and
    named in one warning line."""
    folder = Path(run_dir) / "checkpoints"
    files = [f for f in folder.glob("*.pt") if f.is_file()]
    if not files:
        raise UserError(f"{key}={run_dir}: no checkpoint in {folder}")
    files.sort(key=lambda f: (f.name == "last.pt", f.name.startswith("epoch_"), f.name, f.stat().st_mtime_ns),
               reverse=True)
    skipped = []
    for f in files:
        try:
            ckpt = load(f, key)
        except UserError as e:
            skipped.append(f"{f.name} ({str(e).split(': ', 1)[-1]})")
            continue
        if skipped:
            log.warning("skipped %s; using %s", "; ".join(skipped), f)
        return f, ckpt
    raise UserError(f"{key}={run_dir}: no valid checkpoint in {folder}: {'; '.join(skipped)}")


def locate(path: str | Path, key: str = "trainer.resume") -> tuple[Path, dict]:
    """A checkpoint file, or a run folder (its newest valid checkpoint), loaded and verified."""
    p = Path(str(path)).expanduser()
    if p.is_dir() and (p / "checkpoints").is_dir():
        return newest_valid(p, key)
    if p.is_dir() and p.name == "checkpoints":
        return newest_valid(p.parent, key)
    if p.is_dir():
        raise UserError(f"{key}={path}: a folder without checkpoints/ inside (give a run folder or a .pt file)")
    return p, load(p, key)


def for_use(path: str | Path, key: str = "checkpoint") -> tuple[Path, dict]:
    """What cl-eval, cl-embed and cl-export read: a .pt file, or a run folder's best.pt (the best
    online k-NN, where trainer.knn_every wrote one), else its newest valid checkpoint; said in the log."""
    p = Path(str(path)).expanduser()
    run = p if (p / "checkpoints").is_dir() else p.parent if p.is_dir() and p.name == "checkpoints" else None
    if run is None:
        return locate(p, key)
    best = run / "checkpoints" / "best.pt"
    if best.is_file():
        try:
            found = best, load(best, key)
        except UserError as e:
            log.warning("skipped %s (%s)", best, str(e).split(": ", 1)[-1])
        else:
            log.info("%s=%s is a run folder: using its best.pt (the best online k-NN)", key, path)
            return found
    found = newest_valid(run, key)
    log.info("%s=%s is a run folder: using %s", key, path, found[0])
    return found


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
