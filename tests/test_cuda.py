"""The CUDA-only paths: bf16 autocast on the GPU, fused optimizers, pinned non-blocking copies and
the L-BFGS linear probe on the device. Skipped on machines without a GPU (CI here has none); run
them with `python -m pytest -m cuda` on a GPU machine."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from contrastive_cli.augment import BatchAugment
from contrastive_cli.data import TensorImages, iterate_batches
from contrastive_cli.encoders import SmallCNN
from contrastive_cli.engine import Precision, make_views, optimizer_step
from contrastive_cli.evaluate import linear_probe
from contrastive_cli.methods.simclr import SimCLR
from contrastive_cli.momentum import SplitBatchNorm2d
from contrastive_cli.optim import build_optimizer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MEAN, STD = [0.5], [0.25]


def _digits_uint8(n: int = 256) -> TensorImages:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images[:n] * (255 / 16)).round().to(torch.uint8).unsqueeze(1)  # N x 1 x 8 x 8
    x = F.interpolate(x.float(), size=16, mode="nearest").to(torch.uint8)
    return TensorImages(x, torch.from_numpy(d.target[:n]), [str(i) for i in range(10)])


def test_bf16_autocast_step_on_cuda_runs_the_convolutions_in_bf16_and_keeps_fp32_weights():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    method = SimCLR(SmallCNN(1, 8), proj_hidden_dim=32, proj_dim=16).to(dev).to(memory_format=torch.channels_last)
    before = copy.deepcopy(method.state_dict())
    prec = Precision(dev, torch.bfloat16, channels_last=True)
    seen = []
    hook = method.encoder.net[0][0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = build_optimizer(functools.partial(torch.optim.SGD, momentum=0.9), method, 0.1, 0.0, fused=True)
    x1, x2 = (prec.to_device(torch.randn(32, 1, 16, 16)) for _ in range(2))
    out = optimizer_step(method, x1, x2, torch.full((32,), -1, device=dev), opt,
                         torch.amp.GradScaler("cuda", enabled=False), prec)
    hook.remove()
    assert seen == [torch.bfloat16]
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)  # the loss runs in fp32 (losses.fp32)
    assert all(p.dtype == torch.float32 for p in method.parameters())
    assert any(not torch.equal(before[k], v) for k, v in method.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_batch_norm_on_cuda_equals_batch_norm_per_chunk(dtype):
    """MoCo's split BN on the GPU (one native_batch_norm.out per chunk; the group-norm path is CPU-only):
    output, input and weight gradients as per-chunk batch_norm, fp32 statistics for bf16 activations."""
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(8, num_splits=4).cuda()
    x = (torch.randn(16, 8, 12, 12, device="cuda") * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(16, 8, 12, 12, device="cuda")
    y = bn(x)
    gx, gw = torch.autograd.grad((y.float() * w).sum(), (x, bn.weight))
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.cat([F.batch_norm(c, None, None, bn.weight, bn.bias, True) for c in x_ref.chunk(4)])
    gx_ref, gw_ref = torch.autograd.grad((y_ref.float() * w).sum(), (x_ref, bn.weight))
    tol = {"atol": 2e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(gx.float(), gx_ref.float(), **tol)
    # weight gradients sum over the batch in another order: fp32 to 1e-4, bf16 to its rounding
    torch.testing.assert_close(gw, gw_ref, **({"atol": 0.05, "rtol": 1e-2} if tol else {"atol": 1e-4, "rtol": 1e-4}))
    assert bn.running_mean.dtype == torch.float32 and torch.isfinite(bn.running_var).all()


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_fused_optimizer_on_cuda_matches_the_unfused_step(name):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4)).to(dev)
    twin = copy.deepcopy(model)
    kw = {"momentum": 0.9} if name == "SGD" else {}
    partial = functools.partial(getattr(torch.optim, name), **kw)
    fused = build_optimizer(partial, model, 0.05, 1e-4, fused=True)
    plain = build_optimizer(partial, twin, 0.05, 1e-4, fused=False)
    assert fused.defaults.get("fused") is True and not plain.defaults.get("fused")
    x, y = torch.randn(64, 16, device=dev), torch.randint(0, 4, (64,), device=dev)
    for _ in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pinned_batches_cross_non_blocking_and_views_equal_the_cpu_ones():
    dev = torch.device("cuda")
    data = _digits_uint8()
    batches = list(iterate_batches(data, 64, seed=0, epoch=0, pin=True))
    assert batches and all(x.is_pinned() and y.is_pinned() for x, y in batches)
    cpu_batches = list(iterate_batches(data, 64, seed=0, epoch=0, pin=False))
    augment = BatchAugment(16, MEAN, STD, blur_p=0.0, jitter_p=0.0)  # crop + flip only: same maths on both devices
    augment.to(dev)
    g_cuda = torch.Generator(device=dev).manual_seed(0)
    for pinned, plain in zip(batches, cpu_batches, strict=True):
        assert torch.equal(pinned[0], plain[0])
        x1, x2, y, crops = make_views(pinned, augment, g_cuda, Precision(dev, None, channels_last=True), cpu_views=False)
        copied = Precision(dev, None, False).to_device(pinned[0])  # non-blocking from pinned memory
        torch.cuda.synchronize()
        assert crops == () and x1.device.type == "cuda" and x1.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y.cpu(), plain[1]) and torch.equal(copied.cpu(), plain[0])
        assert x1.shape == (64, 1, 16, 16) and torch.isfinite(x1).all() and torch.isfinite(x2).all()


def test_lbfgs_linear_probe_on_cuda_agrees_with_scikit_learn():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.from_numpy(d.data).float(), torch.from_numpy(d.target)
    train, test = slice(0, 1400), slice(1400, None)
    on_gpu = linear_probe(x[train], y[train], x[test], y[test], device=torch.device("cuda"), backend="torch")
    sk = linear_probe(x[train], y[train], x[test], y[test], backend="sklearn")
    assert on_gpu > 0.9 and abs(on_gpu - sk) <= 0.02, (on_gpu, sk)


def test_linear_probe_auto_picks_the_device_solver_for_large_feature_sets_on_cuda(monkeypatch):
    import contrastive_cli.evaluate as ev

    used = []
    real = ev._linear_probe_torch
    monkeypatch.setattr(ev, "_linear_probe_torch", lambda *a: used.append(a[-1]) or real(*a))
    g = torch.Generator().manual_seed(0)
    n, d = 8200, 512  # 4.2M feature numbers: over auto's threshold
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 2 * F.one_hot(y, d).float()
    acc = ev.linear_probe(x[:8000], y[:8000], x[8000:], y[8000:], max_iter=50, device=torch.device("cuda"))
    assert used and used[0].type == "cuda" and acc > 0.9


def test_training_and_cl_eval_run_on_cuda_in_bf16(tmp_path, fast_train):
    from conftest import compose_cfg

    from contrastive_cli import checkpoint
    from contrastive_cli.evaluate import run_evaluation
    from contrastive_cli.train import run_training

    cfg = compose_cfg("train", [*fast_train, "trainer.device=cuda", "trainer.precision=auto"])
    run_training(cfg, tmp_path / "run")
    ckpt = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert torch.isfinite(torch.tensor(ckpt["history"][-1]["loss"]))
    result = run_evaluation(compose_cfg("eval", [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}",
                                                 "eval.tsne_samples=0", "eval.device=cuda"]), tmp_path / "eval")
    assert 0.3 < result["knn_top1"] <= 1.0


def test_gpu_decode_of_jpeg_shards_serves_what_the_workers_pillow_decode_serves(tmp_path):
    """dataset.decode=gpu: the workers pass the JPEG bytes, nvJPEG decodes the batch on the device."""
    import io

    import numpy as np
    from PIL import Image

    wds = pytest.importorskip("webdataset")
    from contrastive_cli.data.shards import load_shards

    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        for i in range(8):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
            sink.write({"__key__": f"k{i}", "jpg": buf.getvalue(), "cls": str(i)})
    (tmp_path / "sizes.json").write_text('{"a.tar": 8}')
    cpu = load_shards(str(tmp_path), image_size=24, decode="cpu").train
    gpu = load_shards(str(tmp_path), image_size=24, decode="gpu").train
    assert load_shards(str(tmp_path), image_size=24).train.decode == "gpu"  # auto on CUDA, JPEG shards
    (xc, yc), = cpu.stream(8, 0, 0, shuffle=False, drop_last=False)
    (xg, yg), = gpu.stream(8, 0, 0, shuffle=False, drop_last=False)
    assert xg.is_cuda and xg.dtype == torch.uint8 and torch.equal(yc, yg)
    assert (xg.cpu().int() - xc.int()).abs().float().mean() < 3.0  # nvJPEG's IDCT rounds differently
