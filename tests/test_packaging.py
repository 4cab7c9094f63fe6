"""`pip install .` (not only -e) must ship every config: the wheel is built and run from elsewhere."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next(out.glob("contrastive_cli-*.whl"))


def test_wheel_holds_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert configs and all(f"contrastive_cli/configs/{c}" in names for c in configs)


def test_installed_wheel_composes_from_another_folder(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sys, contrastive_cli; assert contrastive_cli.__file__.startswith(sys.argv[1]), contrastive_cli.__file__; "
            "sys.argv = ['cl-train', 'dataset=fashion_mnist', 'optimizer=lars', '--cfg', 'job']; "
            "from contrastive_cli.cli import train; train()")
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "contrastive_cli.optim.LARS" in proc.stdout and "name: fashion_mnist" in proc.stdout


def test_python_m_from_the_root_of_a_clone_next_to_an_installed_wheel(wheel, tmp_path):
    import shutil

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    clone = tmp_path / "clone"  # the source folder shadows the installed package (README's torchrun lines)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "contrastive_cli", clone / "contrastive_cli", symlinks=True, ignore=skip)
    shutil.copytree(ROOT / "configs", clone / "configs", ignore=skip)
    # -S: no .pth files, so not the editable install's import hook (CI's); the dependencies by path
    import sysconfig

    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{sysconfig.get_paths()['purelib']}"}
    proc = subprocess.run([sys.executable, "-S", "-m", "contrastive_cli.train", "dataset=fashion_mnist", "--cfg", "job"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: fashion_mnist" in proc.stdout
