"""encoder=timm: any timm model by name, without weights, its feature size read from the model; a
ViT with small patches trains MoCo v3 and evaluates from its checkpoint."""

import sys

import pytest
import torch
from conftest import compose_cfg

from contrastive_cli.encoders import timm_model
from contrastive_cli.errors import UserError
from contrastive_cli.parts import build_model

timm = pytest.importorskip("timm", reason="encoder=timm needs the timm extra")


def test_resnet_by_name_reads_its_feature_size():
    encoder, _ = build_model(compose_cfg("train", ["encoder=timm", "encoder.name=resnet18", "method=simclr"]))
    assert encoder.feature_dim == 512
    assert encoder(torch.randn(2, 1, 32, 32)).shape == (2, 512)  # digits: one channel, 32 px


def test_vit_tiny_is_built_for_the_dataset_image_size_with_small_patches():
    cfg = compose_cfg("train", ["encoder=vit_tiny", "dataset=fashion_mnist", "method=moco_v3"])
    encoder, method = build_model(cfg)
    assert encoder.patch_embed.num_patches == 49  # 28 px / 4 px patches = 7 x 7
    assert encoder.feature_dim == 192 and encoder(torch.randn(2, 1, 28, 28)).shape == (2, 192)
    assert method.projector[0].in_features == 192


def test_unknown_model_is_one_line_with_suggestions():
    with pytest.raises(UserError, match=r"^encoder.name=resnet_18: not a timm model; did you mean .*resnet18"):
        timm_model("resnet_18")


def test_missing_timm_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UserError, match=r"^encoder=timm: needs the timm package; pip install 'contrastive_cli\[timm\]'$"):
        timm_model("resnet18")


def test_moco_v3_on_a_vit_trains_and_cl_eval_rebuilds_it(tmp_path):
    from contrastive_cli.evaluate import run_evaluation
    from contrastive_cli.train import run_training

    cfg = compose_cfg("train", ["method=moco_v3", "encoder=vit_tiny", "+encoder.model_args.depth=2",
                                "trainer.epochs=1", "trainer.batch_size=128", "trainer.knn_monitor=false",
                                "method.proj_hidden_dim=64", "method.pred_hidden_dim=64", "optimizer=adamw",
                                "optimizer.lr=1e-3"])
    summary = run_training(cfg, tmp_path / "run")
    assert summary["epochs"] == 1 and summary["final_loss"] > 0
    out = tmp_path / "eval"
    out.mkdir()
    result = run_evaluation(compose_cfg("eval", [f"checkpoint={tmp_path / 'run/checkpoints/last.pt'}",
                                                 "eval.tsne_samples=0", "eval.linear_max_iter=20"]), out)
    assert 0.1 < result["knn_top1"] <= 1.0
