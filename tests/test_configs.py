"""Every option of every config group composes with the others and builds."""

from importlib import resources

import pytest
import torch
from conftest import compose_cfg

from contrastive_cli.config import build, validate_train
from contrastive_cli.data import TensorImages
from contrastive_cli.errors import UserError
from contrastive_cli.optim import build_optimizer
from contrastive_cli.parts import build_model


def options(group):
    return sorted(p.name[:-5] for p in resources.files("contrastive_cli.configs").joinpath(group).iterdir()
                  if p.name.endswith(".yaml"))


def test_groups_have_the_documented_options():
    assert options("method") == ["barlow_twins", "barlow_twins_imagenet", "byol", "clip", "contrastive_margin", "cpc",
                                 "dcl", "dino", "moco", "moco_imagenet", "moco_v3", "nnclr", "siglip", "simclr",
                                 "simsiam", "supcon", "swav", "triplet", "vicreg"]
    assert options("encoder") == ["resnet18", "resnet50", "small_cnn", "timm", "vit_tiny"]
    assert options("dataset") == ["cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder", "mnist", "pairs",
                                  "shards", "stl10"]
    assert options("text_encoder") == ["transformer"]
    assert options("augmentation") == ["byol", "grey", "multicrop", "simclr"]
    assert options("optimizer") == ["adamw", "lars", "lars_simsiam", "lars_vicreg", "lars_wide", "sgd"]
    assert options("logger") == ["csv", "tensorboard", "wandb"]
    assert "fashion_mnist_fast" in options("experiment")


@pytest.mark.parametrize("dataset", options("dataset"))
@pytest.mark.parametrize("encoder", options("encoder"))
def test_encoder_dataset_pairs_build_and_run(dataset, encoder):
    extra = {"imagefolder": ["dataset.source.root=/tmp/x"], "pairs": ["dataset.source.path=/tmp/x.tsv"],
             "shards": ["dataset.source.path=/tmp/x"]}.get(dataset, [])
    cfg = compose_cfg("train", [f"dataset={dataset}", f"encoder={encoder}", *extra])
    validate_train(cfg)
    enc = build(cfg.encoder, "encoder")
    size, ch = cfg.dataset.image_size, cfg.dataset.channels
    x = torch.randint(0, 256, (2, ch, size, size), dtype=torch.uint8)
    views = build(cfg.augmentation, "augmentation")(x, torch.Generator().manual_seed(0))
    assert views[0].shape == (2, ch, size, size)
    if encoder == "small_cnn" or size <= 32:  # the big ResNets at 96 px are slow to run on a CPU
        with torch.no_grad():
            assert enc.eval()(views[0]).shape == (2, enc.feature_dim)
    if encoder.startswith("resnet"):
        small = size <= 64
        assert (enc.conv1.kernel_size == (3, 3)) == small and isinstance(enc.maxpool, torch.nn.Identity) == small
        assert enc.conv1.in_channels == ch


def optimizer_classes() -> list[str]:
    """One optimizer option per class: the lars_* options are LARS at other values, stepped by the same
    code (each is built and stepped on its own in test_every_optimizer_option_builds_and_steps)."""
    first: dict[str, str] = {}
    for o in options("optimizer"):
        first.setdefault(compose_cfg("train", [f"optimizer={o}"]).optimizer._target_, o)
    return sorted(first.values())


# barlow_twins_imagenet differs from barlow_twins only in its 8192-wide heads (slow to step on a CPU)
# clip and siglip with the default augmentation only: they read one view (and a caption), and what the
# augmentations make is the same for every method (the multi-crop refusal is tested with the others)
@pytest.mark.parametrize(("method", "optimizer", "augmentation"), [
    (m, o, a) for a in options("augmentation") for o in optimizer_classes() for m in options("method")
    if m != "barlow_twins_imagenet" and (m not in ("clip", "siglip") or a == "simclr")])
def test_method_optimizer_augmentation_combinations_step(method, optimizer, augmentation):
    cfg = compose_cfg("train", [f"method={method}", f"optimizer={optimizer}", f"augmentation={augmentation}",
                                "encoder.width=4"])
    model = build_model(cfg)[1]  # with the text tower of clip and siglip
    if getattr(build(cfg.augmentation, "augmentation"), "num_views", 2) > 2 and not model.multi_crop:
        # refused before training: crops it would drop (at 32 px multicrop makes none: local_crops=auto)
        with pytest.raises(UserError, match="uses two views"):
            validate_train(cfg)
        return
    validate_train(cfg)
    opt = build_optimizer(build(cfg.optimizer, "optimizer"), model, cfg.optimizer.lr, cfg.optimizer.weight_decay)
    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    v1, v2, *crops = build(cfg.augmentation, "augmentation")(x, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    labels = torch.arange(8) % 3 if model.needs_labels else torch.full((8,), -1)  # -1: unlabeled
    model.use_data(TensorImages(x, labels, [str(i) for i in range(10)]), cfg.dataset)  # clip: captions of classes
    out = model(v1, v2, labels, tuple(crops))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    assert torch.isfinite(out.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_every_optimizer_option_builds_and_steps(optimizer):
    test_method_optimizer_augmentation_combinations_step("simclr", optimizer, "simclr")


def test_barlow_twins_imagenet_preset_has_the_paper_projector():
    method = compose_cfg("train", ["method=barlow_twins_imagenet"]).method
    assert (method.proj_hidden_dim, method.proj_dim, method.proj_layers, method.lambd) == (8192, 8192, 3, 0.005)
    cfg = compose_cfg("train", ["method=barlow_twins_imagenet"])
    # LARS with a trust coefficient for 8192-wide layers: at the default 0.02 it ended below an untrained encoder
    assert cfg.optimizer._target_.endswith("LARS") and cfg.optimizer.trust_coefficient == 0.002
    assert compose_cfg("train", ["method=barlow_twins_imagenet", "optimizer=sgd"]).optimizer._target_ == "torch.optim.SGD"


def test_configs_ship_inside_the_package():
    root = resources.files("contrastive_cli.configs")
    assert root.joinpath("train.yaml").is_file() and root.joinpath("eval.yaml").is_file()


def test_a_method_picks_the_optimizer_it_needs_and_the_command_line_wins():
    assert compose_cfg("train", []).optimizer._target_ == "contrastive_cli.optim.LARS"  # every other method's
    assert compose_cfg("train", ["method=cpc"]).optimizer._target_ == "torch.optim.AdamW"  # CPC v2 trains with Adam
    assert compose_cfg("train", ["method=cpc", "optimizer=sgd"]).optimizer._target_ == "torch.optim.SGD"
    assert compose_cfg("train", ["optimizer=sgd", "method=cpc"]).optimizer._target_ == "torch.optim.SGD"
    # LARS at lr 0.3: at lr 1.0 VICReg diverged and SimSiam ended below an untrained encoder on Fashion-MNIST
    for method in ("vicreg", "simsiam"):
        cfg = compose_cfg("train", [f"method={method}"])
        assert cfg.optimizer._target_ == "contrastive_cli.optim.LARS" and cfg.optimizer.lr == 0.3
        assert compose_cfg("train", [f"method={method}", "optimizer=lars"]).optimizer.lr == 1.0
