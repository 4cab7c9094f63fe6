"""Real processes killed at seeded random moments: SIGKILL (once inside a save), SIGTERM and SIGINT
mid-epoch. Every resume must end bitwise equal to a run that was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import BIN, error_lines, run_cli

FAST = ["trainer.epochs=3", "trainer.batch_size=64", "dataset.image_size=16", "encoder.width=8",
        "trainer.knn_monitor=false", "trainer.log_every=5"]
STEPS = 1347 // 64  # per epoch
HEAD = ["method.proj_hidden_dim=32", "method.proj_dim=16"]
# clip: its captions are templates drawn from the global generator each step, which the checkpoint must carry
METHODS = {"simclr": ["method=simclr", *HEAD], "moco": ["method=moco", "method.queue_size=256", *HEAD],
           "clip": ["method=clip", "method.embed_dim=16", "text_encoder.width=16"]}

# cl-train with a trap: SIGKILL itself half-way through writing its n-th checkpoint, or send itself
# a signal right after its n-th optimizer step. Everything else is the console script.
WRAPPER = r"""
import io, os, signal, sys
import torch
from contrastive_cli import cli, engine
# SIGINT as from a terminal: a process started in the background by a non-interactive shell (a CI
# script's `&`) inherits SIGINT ignored, and Python then keeps it ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
mode, n = sys.argv[1], int(sys.argv[2])
sys.argv = ["cl-train", *sys.argv[3:]]
count = [0]
if mode == "kill_in_save":
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        count[0] += 1
        if count[0] == n:
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
elif mode.startswith("load_"):  # a signal while the data loads, before the training loop
    from contrastive_cli.data import named as data
    real_load = data.load_digits
    def load(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, mode[5:]))
        return real_load(*args, **kwargs)
    data.load_digits = load
else:
    real_step = engine.optimizer_step
    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), getattr(signal, mode))
        return out
    engine.optimizer_step = step
cli.train()
"""


def trapped(mode: str, n: int, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", WRAPPER, mode, str(n), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The final checkpoint of an uninterrupted run, per method."""
    done = {}

    def get(method: str) -> dict:
        if method not in done:
            cwd = tmp_path_factory.mktemp(f"straight_{method}")
            proc = run_cli("cl-train", *FAST, *METHODS[method], "hydra.run.dir=run", cwd=cwd)
            assert proc.returncode == 0, proc.stderr[-2000:]
            done[method] = torch.load(cwd / "run" / "checkpoints" / "last.pt", weights_only=True)
        return done[method]

    return get


def assert_same(a, b, where: str = "") -> None:
    """Every tensor bitwise equal, every other value equal (config, wall times and checksum aside)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        skip = {"config", "checksum", "time", "trainer"}
        keys = set(a) - skip
        assert keys == set(b) - skip, (where, keys ^ (set(b) - skip))
        for k in keys:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def finish_and_compare(run, cwd, straight_ckpt) -> None:
    """Resume the run in its own folder without repeating any setting; the result must equal the straight run's."""
    proc = run_cli("cl-train", f"trainer.resume={run}", f"hydra.run.dir={run}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list((run / "checkpoints").glob(".*.tmp")), "an orphan of a killed save was left"
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert final["batch"] == 0 and final["epoch"] == 3
    assert_same(straight_ckpt, final)


@pytest.mark.parametrize("method", ["moco", "simclr"])
def test_sigkill_anywhere_then_resume_equals_the_straight_run(tmp_path, method, straight):
    rng = random.Random(f"sigkill-{method}")
    run = tmp_path / "run"
    args = [*FAST, *METHODS[method], f"hydra.run.dir={run}"]
    # 1. a real kill -9 at a random moment once the first checkpoint exists
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([str(BIN / "cl-train"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.4))
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 2. resume, and kill -9 that process half-way through writing its first checkpoint
    proc = trapped("kill_in_save", 1, f"trainer.resume={run}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert list((run / "checkpoints").glob(".last.pt.*.tmp")), "the trap did not fire inside a save"
    # 3. resume to the end: the orphan is removed and the weights equal the straight run's
    finish_and_compare(run, tmp_path, straight(method))


@pytest.mark.parametrize(("method", "name", "status"),
                         [("simclr", "SIGTERM", 143), ("moco", "SIGTERM", 143), ("simclr", "SIGINT", 130),
                          ("clip", "SIGTERM", 143)])
def test_signal_mid_epoch_saves_the_position_and_resume_equals_the_straight_run(tmp_path, method, name, status,
                                                                                  straight):
    n = random.Random(f"{name}-{method}").randint(STEPS + 1, 2 * STEPS - 1)  # inside epoch 2, not its last step
    run = tmp_path / "run"
    proc = trapped(name, n, *FAST, *METHODS[method], f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    last = error_lines(proc)[-1]
    assert last.startswith(f"cl-train: stopped by {name} at epoch 2, batch {n - STEPS} of {STEPS} (step {n})"), last
    assert f"trainer.resume={run}" in last
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, n - STEPS, n)
    assert not list((run / "checkpoints").glob(".*.tmp"))
    finish_and_compare(run, tmp_path, straight(method))


def test_sigterm_to_a_two_process_run_stops_every_rank_and_resume_equals_the_straight_run(tmp_path):
    """`cl-train trainer.devices=2` (gloo): the launcher passes SIGTERM to the ranks, they agree at a
    log step, save every rank's view generator, exit 143 with one line; the resume relaunches two ranks."""
    args = ["trainer.devices=2", "trainer.epochs=4", "trainer.batch_size=32", "encoder.width=8",
            "method.proj_hidden_dim=32", "method.proj_dim=16", "trainer.knn_monitor=false", "trainer.log_every=2"]
    proc = run_cli("cl-train", *args, "hydra.run.dir=straight", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "cut"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cut = subprocess.Popen([str(BIN / "cl-train"), *args, f"hydra.run.dir={run}"], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.pt").exists() and cut.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    cut.send_signal(signal.SIGTERM)
    stderr = cut.communicate(timeout=300)[1]
    assert cut.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-2000:]
    stops = [ln for ln in stderr.splitlines() if "cl-train: stopped by SIGTERM at " in ln]
    assert len(stops) == 1, stderr[-2000:]  # rank 0 speaks for both
    proc = run_cli("cl-train", f"trainer.resume={run}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    assert_same(straight, torch.load(run / "checkpoints" / "last.pt", weights_only=True))


def test_sigterm_to_cl_torchrun_by_hand_is_one_line_not_torchruns_traceback(tmp_path):
    """The by-hand launch (torchrun's options, then -m and the module) under cl-torchrun, with the older module
    name (contrastive_cli.train), which cl-torchrun reads as contrastive_cli.cli:
    plain torchrun's agent answers a SIGTERM with a SignalException traceback."""
    run = tmp_path / "R"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cut = subprocess.Popen([str(BIN / "cl-torchrun"), "--standalone", "--nproc_per_node=2", "-m", "contrastive_cli.train",
                            "trainer.epochs=20", "trainer.batch_size=32", "encoder.width=8", "trainer.knn_monitor=false",
                            f"hydra.run.dir={run}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.pt").exists() and cut.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    cut.send_signal(signal.SIGTERM)
    stderr = cut.communicate(timeout=300)[1]
    assert cut.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith(("cl-train:", "cl-torchrun:"))]
    assert lines[0].startswith("cl-train: stopped by SIGTERM at ") and lines[-1] == (
        "cl-torchrun: stopped by SIGTERM; continue with trainer.resume=<the run folder>"), stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] > 0


@pytest.mark.parametrize(("name", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_before_training_is_one_line(tmp_path, name, status):
    proc = trapped(f"load_{name}", 0, *FAST, cwd=tmp_path)
    assert proc.returncode == status and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert error_lines(proc) == [f"cl-train: stopped by {name}"]
