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


def run_cli(prog: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `cl-train` / `cl-eval` exactly as typed in a shell, from `cwd`."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": ""}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run([str(BIN / prog), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


@pytest.fixture
def fast_train() -> list[str]:
    """Overrides that make a digits run take seconds on a CPU."""
    return ["trainer.epochs=2", "trainer.batch_size=128", "encoder.width=8", "method.proj_hidden_dim=64",
            "method.proj_dim=32", "trainer.knn_monitor=false"]
