"""The `+experiment=NAME` presets: each composes, passes validation, lets the command line win, and
trains one tiny step on the CPU on fake data files in the real on-disk formats; the recipe presets
(`<dataset>_<simclr|moco|byol>`) also say what they are and where their numbers come from.

Parametrized over the files in configs/experiment, so a new preset is tested without editing this
file (a preset on a dataset with no fake-data writer below fails and names it)."""

from __future__ import annotations

import math
import pickle
from importlib import resources
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from test_data import files_only_integrity, rand_u8, write_cifar10, write_mnist, write_stl10  # noqa: F401 (a fixture)

from contrastive_cli.config import build, validate_train
from contrastive_cli.train import run_training

FOLDER = resources.files("contrastive_cli.configs").joinpath("experiment")
EXPERIMENTS = sorted(p.name[:-5] for p in FOLDER.iterdir() if p.name.endswith(".yaml"))
TARGETS = {"simclr": "SimCLR", "moco": "MoCo", "byol": "BYOL"}  # name suffix -> method class
RECIPES = [n for n in EXPERIMENTS if n.rsplit("_", 1)[-1] in TARGETS]  # cifar10_simclr, stl10_byol, ...


def test_the_nine_recipe_presets_exist():
    expected = {f"{d}_{m}" for d in ("cifar10", "cifar100", "stl10") for m in TARGETS}
    assert expected <= set(RECIPES)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_composes_validates_and_the_command_line_wins(name):
    assert FOLDER.joinpath(f"{name}.yaml").read_text().startswith("# @package _global_\n")
    preset = compose_cfg("train", [f"+experiment={name}"])
    validate_train(preset)
    cfg = compose_cfg("train", [f"+experiment={name}", "trainer.epochs=5", "trainer.batch_size=64"])
    validate_train(cfg)
    assert cfg.trainer.epochs == 5 and cfg.trainer.batch_size == 64
    assert cfg.method == preset.method and cfg.optimizer == preset.optimizer  # the rest is the preset's


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_preset_is_what_its_name_says(name):
    dataset, method = name.rsplit("_", 1)
    header = FOLDER.joinpath(f"{name}.yaml").read_text().split("\ndefaults:", 1)[0]
    assert "Source:" in header and "Expected on one GPU:" in header
    cfg = compose_cfg("train", [f"+experiment={name}"])
    assert cfg.dataset.name == dataset
    assert cfg.method._target_.rsplit(".", 1)[-1] == TARGETS[method]
    assert cfg.encoder.arch == "resnet18" and cfg.trainer.knn_every > 0 and cfg.trainer.epochs != 5
    enc = build(cfg.encoder, "encoder")  # views of 64 px or less: 3x3 stride-1 conv1, no max-pool
    assert cfg.dataset.image_size <= 64
    assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1)
    assert isinstance(enc.maxpool, torch.nn.Identity)


def test_an_experiments_augmentation_wins_over_the_one_byol_picks():
    """method=byol picks augmentation=byol in its own defaults list; a preset may keep it (cifar10_byol:
    asymmetric views) or replace it (stl10_byol: the recipe's symmetric views)."""
    kept = compose_cfg("train", ["+experiment=cifar10_byol"]).augmentation
    assert (kept.view1.solarize_p, kept.view2.solarize_p) == (0.0, 0.2)
    replaced = compose_cfg("train", ["+experiment=stl10_byol"]).augmentation
    assert replaced.view2 == replaced.view1 and replaced.view2.solarize_p == 0.0


# ---------------------------------------------------------------------- one tiny step on fake files

def write_cifar100(root: Path, n_train: int, n_test: int = 2) -> None:
    """cifar-100-python/ as in cifar-100-python.tar.gz: `train` and `test` pickles with fine and
    coarse labels, `meta` with the label names (torchvision reads fine_labels and fine_label_names)."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        with open(d / split, "wb") as f:
            pickle.dump({"batch_label": split, "data": rand_u8((n, 3072), seed), "filenames": [],
                         "fine_labels": [i % 100 for i in range(n)], "coarse_labels": [i % 20 for i in range(n)]}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f)


NO_SYSTEM_COPY = ["dataset.source.system_dir=null"]  # never read an installed copy instead

# dataset -> (a writer of 8 to 10 training images under root, the overrides that dataset needs besides
# paths.data_dir): one batch of 8 (MoCo's bn_splits=8 needs a multiple of 8)
FAKE_DATA = {
    "cifar10": (lambda root: write_cifar10(root, per_batch=2, n_test=2), []),
    "cifar100": (lambda root: write_cifar100(root, n_train=8), []),
    "stl10": (lambda root: write_stl10(root, n_train=2, n_test=2, n_unlabeled=6), []),  # train+unlabeled: 8
    "mnist": (lambda root: write_mnist(root / "MNIST" / "raw", n_train=8, n_test=2, gz=False), NO_SYSTEM_COPY),
    "fashion_mnist": (lambda root: write_mnist(root / "FashionMNIST" / "raw", n_train=8, n_test=2, gz=False),
                      NO_SYSTEM_COPY),
}


def shrink(cfg) -> list[str]:
    """Overrides for the parts that exist in this preset: tiny heads, queue and CNN width."""
    sizes = {"method.proj_hidden_dim": 32, "method.proj_dim": 16, "method.pred_hidden_dim": 32,
             "method.queue_size": 64, "encoder.width": 8}
    return [f"{k}={v}" for k, v in sizes.items() if k.split(".")[1] in cfg[k.split(".")[0]]]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_trains_one_tiny_step_on_the_cpu(name, tmp_path, files_only_integrity):  # noqa: F811
    preset = compose_cfg("train", [f"+experiment={name}"])
    dataset = preset.dataset.name
    if dataset not in FAKE_DATA:
        pytest.fail(f"no fake-data writer for dataset {dataset}: add one to FAKE_DATA in {Path(__file__).name}")
    data = tmp_path / "data"
    write, extra = FAKE_DATA[dataset]
    write(data)
    overrides = [f"+experiment={name}", f"paths.data_dir={data}", "dataset.source.download=false",
                 "dataset.image_size=16", "trainer.device=cpu", "trainer.precision=fp32", "trainer.epochs=1",
                 "trainer.batch_size=8", "trainer.knn_every=0", "trainer.knn_monitor=false",
                 "trainer.progress=none", *extra, *shrink(preset)]
    summary = run_training(compose_cfg("train", overrides), tmp_path / "run")
    assert summary["steps"] == 1  # one epoch of one batch (a last partial batch is dropped)
    assert summary["final_loss"] is not None and math.isfinite(summary["final_loss"])
    assert Path(summary["checkpoint"]).is_file()
