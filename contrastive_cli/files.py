"""Output files that are whole or absent: each is written under a temporary name in its own folder and
renamed into place only when every file of the set is complete, with SIGTERM / SIGINT held back for
the renames, so a stopped command leaves all of its outputs or none (checkpoints do the same in
checkpoint.save_atomic)."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file; mkstemp gives 0600


@contextmanager
def whole(*paths: str | Path, label: str | None = None) -> Iterator[list[Path]]:
    """Yields one temporary path per target (same folder, same suffix, so writers that add a suffix
    add none); on a clean exit they become the targets, with the umask's mode, all together. A write
    that fails is one UserError naming the target (after `label`, e.g. "out=x.onnx", when given)."""
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{t.stem}.", suffix=f".tmp{t.suffix}", dir=t.parent)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        for tmp in temps:
            os.chmod(tmp, FILE_MODE)  # outputs are as readable as any file
        with _signals_held():
            for tmp, t in zip(temps, targets, strict=True):
                os.replace(tmp, t)
    except OSError as e:  # the file named is the target, never the hidden temporary name
        by_temp = {str(tmp): t for tmp, t in zip(temps, targets, strict=False)}
        where = by_temp.get(str(e.filename), targets[min(len(temps), len(targets) - 1)])
        raise UserError(f"{label or where}: cannot write {where if label else 'it'} ({e.strerror or e})") from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


@contextmanager
def _signals_held():
    """SIGTERM and SIGINT wait until the block is done (then arrive as usual)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold `folder/.lock` (an flock, which the kernel drops when the holder dies, so a killed run's
    lock is taken over) while a process writes to a run folder; a second writer is refused in one
    line naming the holder's pid and host."""
    import fcntl
    import socket

    path = Path(folder) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{folder}: in use by {holder} (its .lock): two processes would write the same files; "
                            "wait for that run to end, or choose another hydra.run.dir") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # its holder removed it as we opened it
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiter then finds its inode gone and retries
        os.close(fd)


def read_text(path: str, key: str) -> str:
    """A UTF-8 text file named by setting `key`; a missing file or other bytes is one line naming both."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{key}={path}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{key}={path}: not valid UTF-8 (byte {e.start})") from None
