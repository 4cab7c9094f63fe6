"""Shared helpers: compose configs in-process, and run the console scripts as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

torch.set_num_threads(min(2, os.cpu_count() or 1))
BIN = Path(sys.executable).parent


def compose_cfg(config_name: str = "train", overrides: list[str] | None = None):
    with initialize_config_module(config_module="contrastive_cli.configs", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


def cli_env() -> dict:
    """A user's shell environment: no Python warnings, Hydra's short error output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(prog: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `cl-train` / `cl-eval` exactly as typed in a shell, from `cwd`."""
    return subprocess.run([str(BIN / prog), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=cli_env())


BACKGROUND = pytest.StashKey[dict]()  # a module's __name__ -> (its folder, its processes)


def pytest_collection_modifyitems(session, config, items):
    """A test module may define `start_in_background(root) -> [Popen]` for work that takes minutes (the
    defaults sweep of test_defaults.py trains every method): it starts here, before the first test, and
    the module's tests run last, so that work takes the CPU the other tests leave idle (their start-ups,
    file I/O, waits on child processes). The module's fixtures find the process in `BACKGROUND`."""
    late = {item.module for item in items if hasattr(item.module, "start_in_background")}
    items.sort(key=lambda item: item.module in late)  # stable: the order within each part is kept
    folders = {m.__name__: config._tmp_path_factory.mktemp(m.__name__) for m in late}
    config.stash[BACKGROUND] = {m.__name__: (folders[m.__name__], m.start_in_background(folders[m.__name__]))
                                for m in late}


def pytest_sessionfinish(session, exitstatus):
    for _, procs in session.config.stash.get(BACKGROUND, {}).values():  # a session stopped early leaves none
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


@pytest.fixture
def fast_train() -> list[str]:
    """Overrides that make a digits run take seconds on a CPU."""
    return ["trainer.epochs=2", "trainer.batch_size=128", "encoder.width=8", "method.proj_hidden_dim=64",
            "method.proj_dim=32", "trainer.knn_monitor=false"]


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory):
    """A small_cnn trained one epoch on digits (1 channel, 16 px, fast settings), for the tests of what
    reads a checkpoint (cl-eval, cl-embed, cl-export, load_encoder); they only read it."""
    from contrastive_cli.train import run_training

    run = tmp_path_factory.mktemp("digits") / "run"
    run_training(compose_cfg("train", ["trainer.epochs=1", "trainer.batch_size=128", "encoder.width=8",
                                       "method.proj_hidden_dim=32", "method.proj_dim=16", "trainer.knn_monitor=false",
                                       "trainer.progress=none"]), run)
    return run / "checkpoints" / "last.pt"
