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
    code = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "contrastive_cli").rglob("*.py")
                  if "configs" not in p.parts)
    assert "contrastive_cli/data/shards.py" in code and all(c in names for c in code)


def _imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (at the top or inside functions)."""
    import ast

    pkg = ROOT / "contrastive_cli"
    mods = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in pkg.rglob("*.py") if "configs" not in p.parts}
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        here = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
                full = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{full}.{alias.name}" if f"{full}.{alias.name}" in mods else full
                    if target in mods and target != m:
                        edges[m].add(target)
    return edges


def test_no_module_imports_one_that_imports_it_back():
    """The layers run one way: a cycle (config -> export -> api -> config) means a name lives too high."""
    edges = _imports()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    cycles = sorted(m for m in edges if m in reach(m))
    assert not cycles, cycles


def test_no_data_source_knows_another():
    sources = ["named", "folder", "pairs", "shards"]
    edges = _imports()
    for s in sources:
        mine = {t.rsplit(".", 1)[-1] for t in edges[f"contrastive_cli.data.{s}"] if t.startswith("contrastive_cli.data.")}
        assert not mine & set(sources), (s, mine)


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
    proc = subprocess.run([sys.executable, "-S", "-m", "contrastive_cli.cli", "dataset=fashion_mnist", "--cfg", "job"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: fashion_mnist" in proc.stdout
    # the older launch module is not the library's to run: one line naming the new one
    proc = subprocess.run([sys.executable, "-S", "-m", "contrastive_cli.train", "dataset=fashion_mnist"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "-m contrastive_cli.cli" in proc.stderr
