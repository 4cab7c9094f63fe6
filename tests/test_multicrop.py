"""Multi-crop views, DINO, SwAV (and its Sinkhorn) and CPC: view shapes, the two-view path kept
bit for bit, losses on hand-checked numbers, frozen teachers and prototypes, CPC's causal context."""

import math

import pytest
import torch
import torch.distributed as dist
from conftest import compose_cfg

from contrastive_cli.api import encoder_from_checkpoint
from contrastive_cli.config import build, validate_train
from contrastive_cli.data import iterate_batches
from contrastive_cli.distributed import cleanup
from contrastive_cli.encoders import SmallCNN
from contrastive_cli.engine import Precision, make_views, optimizer_step
from contrastive_cli.errors import UserError
from contrastive_cli.losses import dino_loss, sinkhorn, swav_loss
from contrastive_cli.methods.base import encode_groups
from contrastive_cli.methods.cpc import CPC
from contrastive_cli.methods.dino import DINO
from contrastive_cli.methods.swav import SwAV
from contrastive_cli.momentum import cosine_momentum
from contrastive_cli.parts import build_model
from contrastive_cli.train import seed_everything

CPU = Precision(torch.device("cpu"), None, False)

# ------------------------------------------------------------------------------------ multi-crop


def multicrop(**kw):
    cfg = compose_cfg("train", ["augmentation=multicrop", "dataset.image_size=32",  # 13 px local crops
                                *[f"augmentation.{k}={v}" for k, v in kw.items()]])
    return build(cfg.augmentation, "augmentation")


def test_multicrop_shapes_and_every_sample_draws_its_own_crop():
    aug = multicrop(local_crops=6)  # auto makes none at 32 px
    x = torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8).repeat(5, 1, 1, 1)  # one image, 5 times
    views = aug(x, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(5, 1, 32, 32)] * 2 + [(5, 1, 13, 13)] * 6  # 0.4 x 32 px
    for size in (32, 13):
        crops = torch.cat([v for v in views if v.shape[-1] == size]).flatten(1)
        # the same image: every crop of every sample differs from every other, within each size
        assert torch.cdist(crops, crops).add(torch.eye(len(crops)) * 1e9).min() > 1e-3, size
    again = aug(x, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))  # a seed reproduces them
    assert len(multicrop(local_crops=0)(x, torch.Generator().manual_seed(0))) == 2
    with pytest.raises(UserError, match="local_size=1.5"):
        multicrop(local_size=1.5)


def test_multicrop_views_come_from_the_dataloader_workers_too():
    cfg = compose_cfg("train", ["augmentation=multicrop", "augmentation.local_crops=3", "dataset.image_size=32"])
    aug, data = build(cfg.augmentation, "augmentation"), build(cfg.dataset.source, "dataset").train
    batch = next(iterate_batches(data, 8, 0, 0, augment=aug, aug_seed=1))
    x1, x2, y, crops = make_views(batch, aug, torch.Generator(), CPU, cpu_views=True)
    assert x1.shape == x2.shape == (8, 1, 32, 32) and len(crops) == 3 and crops[0].shape == (8, 1, 13, 13)
    assert y.shape == (8,)


def pinned_simclr_losses(cpu_views: bool) -> list[float]:
    """Three SGD steps of SimCLR on digits through make_views and optimizer_step, as the loop runs them."""
    # dataset.flip_p=0.5, dataset.image_size=32: the pinned losses were computed when digits' views were
    # flipped too, and at 32 px
    cfg = compose_cfg("train", ["method=simclr", "encoder.width=4", "method.proj_hidden_dim=16", "method.proj_dim=8",
                                "dataset.flip_p=0.5", "dataset.image_size=32"])
    seed_everything(0)
    _, method = build_model(cfg)
    augment = build(cfg.augmentation, "augmentation")
    data = build(cfg.dataset.source, "dataset").train
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(0)
    extra = {"augment": augment, "aug_seed": 5} if cpu_views else {}
    losses = []
    for batch, _ in zip(iterate_batches(data, 16, 0, 0, **extra), range(3), strict=False):
        x1, x2, y, crops = make_views(batch, augment, g, CPU, cpu_views)
        assert crops == ()
        losses.append(optimizer_step(method, x1, x2, y, opt, scaler, CPU, crops, lambda: None).loss.item())
    return losses


def test_two_view_methods_give_the_losses_they_gave_before_multi_crop():
    # computed by the code before multi-crop existed (commit f0e6fba), same seeds: exact, not approximate
    assert pinned_simclr_losses(cpu_views=False) == [3.519314765930176, 3.5196452140808105, 3.4166972637176514]
    assert pinned_simclr_losses(cpu_views=True) == [3.5256710052490234, 3.274836540222168, 3.2327404022216797]


@pytest.mark.parametrize("method", ["simclr", "byol", "cpc"])
def test_two_view_method_with_multicrop_is_one_line_error(method):
    with pytest.raises(UserError, match=r"uses two views; this augmentation makes 6 local crops") as e:
        validate_train(compose_cfg("train", [f"method={method}", "augmentation=multicrop", "augmentation.local_crops=6"]))
    assert "\n" not in str(e.value)
    validate_train(compose_cfg("train", [f"method={method}", "augmentation=multicrop", "augmentation.local_crops=0"]))
    validate_train(compose_cfg("train", [f"method={method}", "augmentation=multicrop"]))  # auto: none at 16 px


@pytest.mark.parametrize(("size", "crops"), [(28, 0), (32, 0), (40, 6), (96, 6)])
def test_local_crops_auto_makes_them_only_where_they_are_16_px_or_more(size, crops):
    aug = build(compose_cfg("train", ["method=dino", f"dataset.image_size={size}"]).augmentation, "augmentation")
    assert aug.num_views == 2 + crops and aug.local.size == round(0.4 * size)
    assert len(aug.notes) == (crops == 0)  # the run's log says why there are none
    if not crops:
        assert f"0.4 of {size} px is {round(0.4 * size)} px, under 16 px" in aug.notes[0]


def test_method_yaml_picks_multicrop_and_the_command_line_wins():
    assert compose_cfg("train", ["method=dino"]).augmentation._target_.endswith("MultiCrop")
    assert compose_cfg("train", ["method=swav"]).augmentation._target_.endswith("MultiCrop")
    assert compose_cfg("train", ["method=dino", "augmentation=simclr"]).augmentation._target_.endswith("TwoViews")


def test_encode_groups_runs_the_network_once_per_size():
    calls = []

    def run(x):
        calls.append(x.shape)
        return x.mean((1, 2, 3))[:, None] * torch.arange(3.0)

    views = [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)]
    out = encode_groups(run, views)
    assert calls == [(4, 1, 8, 8), (4, 1, 4, 4)]
    assert all(torch.allclose(o, run(v)) for o, v in zip(out, views, strict=True))
    # a head runs once over every view's features: its batch-norm's statistics are those of all 8 rows
    heads = []
    bn = torch.nn.BatchNorm1d(3)

    def head(f):
        heads.append(f.shape)
        return bn(f)

    out = encode_groups(run, views, head)
    assert heads == [(8, 3)] and [o.shape for o in out] == [(2, 3)] * 4
    feats = torch.cat([run(v) for v in views])
    ref = (feats - feats.mean(0)) / (feats.var(0, unbiased=False) + bn.eps).sqrt()
    torch.testing.assert_close(torch.cat(out), ref)


# ------------------------------------------------------------------------------------------ DINO

def sig(x):
    return 1 / (1 + math.exp(-x))


def test_dino_loss_by_hand():
    # teacher (global views) [1, 0] and [0, 1], center [0.5, 0.5], T_t 0.25: targets [s(4), s(-4)], [s(-4), s(4)]
    teacher = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    # student [0, 0], [1, 0], [0, 1] at T_s 0.5: log-softmax [-ln 2, -ln 2], [-ln(1+e^-2), -ln(1+e^2)], swapped
    student = [torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    a, b = math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))
    p, q = sig(4), sig(-4)
    pairs = [p * a + q * b,  # teacher 0, student 1
             p * b + q * a,  # teacher 0, student 2
             math.log(2),    # teacher 1, student 0
             q * b + p * a]  # teacher 1, student 2 (a student never meets its own teacher view)
    got = dino_loss(student, teacher, torch.tensor([0.5, 0.5]), 0.5, 0.25)
    assert got.item() == pytest.approx(sum(pairs) / 4, abs=1e-6)


def small_dino(**kw):
    torch.manual_seed(0)
    return DINO(SmallCNN(1, 4), **{"hidden_dim": 16, "bottleneck_dim": 8, "out_dim": 12, **kw})


def test_dino_centering_and_sharpening():
    model = small_dino(center_momentum=0.9, teacher_temp_warmup=0.3)
    x1, x2 = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        t = model.teacher_head(model.teacher_encoder(torch.cat([x1, x2])))
    model.training_step(x1, x2, None, (torch.randn(4, 1, 8, 8),))
    assert torch.allclose(model.center, 0.1 * t.mean(0), atol=1e-6)  # EMA from zero, after the loss read it
    # sharpening: the teacher's temperature rises from 0.04 to 0.07 over the first 30% of training
    for progress, temp in ((0.0, 0.04), (0.15, 0.055), (0.3, 0.07), (0.9, 0.07)):
        model.on_step_end(progress)
        assert model.temperature() == pytest.approx(temp)
    restored = small_dino()
    restored.load_state_dict(model.state_dict())  # a resumed run goes on at the same temperature
    assert restored.temperature() == pytest.approx(0.07)


def test_dino_teacher_is_a_frozen_copy_that_follows_by_ema():
    model = small_dino(momentum_start=0.9)
    online = list(model.encoder.parameters()) + list(model.head.parameters())
    teacher = list(model.teacher_encoder.parameters()) + list(model.teacher_head.parameters())
    for o, t in zip(online, teacher, strict=True):
        assert o is not t and o.data_ptr() != t.data_ptr() and torch.equal(o, t) and not t.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16), None, (torch.randn(4, 1, 8, 8),)).loss.backward()
    assert all(t.grad is None for t in teacher)
    before = [t.detach().clone() for t in teacher]
    opt.step()
    model.on_step_end(0.5)
    m = cosine_momentum(0.5, 0.9, 1.0)
    for o, t, b in zip(online, teacher, before, strict=True):
        assert torch.allclose(t, m * b + (1 - m) * o.detach(), atol=1e-7)
    g = model.head.last_layer.parametrizations.weight.original0  # norm_last_layer: the norm stays 1
    assert not g.requires_grad and torch.equal(g, torch.ones_like(g))


def test_dino_clips_gradients_and_freezes_its_last_layer_in_the_shared_step():
    model = small_dino(clip_grad=0.01, freeze_last_layer=0.1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = (torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16), torch.full((4,), -1), (torch.randn(4, 1, 8, 8),))
    last = model.head.last_layer.parametrizations.weight.original1
    w0 = last.detach().clone()
    seen = {}

    def hook(progress):
        def run():
            seen["before"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.before_optimizer_step(progress)
            seen["after"] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return run

    optimizer_step(model, *x[:3], opt, scaler, CPU, x[3], hook(0.05))
    assert torch.equal(last, w0)  # frozen for the first 10% of training
    optimizer_step(model, *x[:3], opt, scaler, CPU, x[3], hook(0.2))
    assert not torch.equal(last, w0)  # and trained after
    # each parameter's gradient on its own, as the paper's code: scaled to norm 0.01 when above it, else kept
    clipped = kept = 0
    for name, g in seen["after"].items():
        b = seen["before"][name]
        if b.norm() > 0.01:
            assert g.norm().item() == pytest.approx(0.01, rel=1e-3), name
            torch.testing.assert_close(g, b * 0.01 / (b.norm() + 1e-6))
            clipped += 1
        else:
            assert torch.equal(g, b), name
            kept += 1
    assert clipped and kept, (clipped, kept)


# ----------------------------------------------------------------------------------- SwAV, Sinkhorn

def test_sinkhorn_by_hand_and_its_marginals():
    # 2 samples, 2 prototypes, eps 1: exp(scores) = [[1, 3], [1, 1]]; one round of prototype then sample
    # normalisation (worked out in fractions) gives codes [0.4, 0.6] and [2/3, 1/3]
    scores = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    assert torch.allclose(sinkhorn(scores, eps=1.0, iters=1), torch.tensor([[0.4, 0.6], [2 / 3, 1 / 3]]), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    gaps = []
    for iters in (1, 2, 3, 5, 50):
        q = sinkhorn(scores, eps=0.5, iters=iters)
        assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-6)  # each sample's code sums to 1
        gaps.append((q.sum(0) - 12 / 5).abs().max().item())  # each prototype's share: B / K in the limit
    # seen: 0.33, 0.047, 0.0070, 0.00016, then fp32's rounding
    assert gaps[0] > 0.1 and gaps[0] > 5 * gaps[1] > 25 * gaps[2] > 125 * gaps[3] and gaps[4] < 1e-5


def test_swav_loss_is_the_swapped_prediction():
    s = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])]
    codes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.25, 0.75]])]

    def ce(q, p):
        return -(q * torch.log_softmax(p / 0.5, dim=1)).sum().item()

    expected = ((ce(codes[0], s[1]) + ce(codes[0], s[2])) / 2 + (ce(codes[1], s[0]) + ce(codes[1], s[2])) / 2) / 2
    assert swav_loss(s, codes, 0.5).item() == pytest.approx(expected, abs=1e-6)


def small_swav(**kw):
    torch.manual_seed(0)
    return SwAV(SmallCNN(1, 4), **{"proj_hidden_dim": 16, "proj_dim": 8, "num_prototypes": 6, **kw})


def test_swav_prototypes_stay_normalized_and_frozen_for_their_steps():
    model = small_swav(freeze_prototypes=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = (torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16), torch.full((8,), -1), (torch.randn(8, 1, 8, 8),) * 2)
    w0 = model.prototypes.weight.detach().clone()
    for step in range(2):
        optimizer_step(model, *x[:3], opt, scaler, CPU, x[3], lambda: model.before_optimizer_step(0.0))
        if step == 0:
            assert torch.equal(model.prototypes.weight, w0)  # the first step leaves them alone
        model.on_step_end(0.0)
        assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(6), atol=1e-6)
    assert not torch.equal(model.prototypes.weight, w0)


def test_swav_queue_fills_and_then_joins_sinkhorn():
    model, plain = small_swav(queue_size=8), small_swav()  # the same weights, one without a queue
    x1, x2 = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    model.training_step(torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16), None)
    assert model.queued == 4 and model.queue[4:].abs().sum() == 0
    # not full yet: Sinkhorn sees this batch only
    assert torch.equal(model.training_step(x1, x2, None).loss, plain.training_step(x1, x2, None).loss)
    assert model.queued == 8 and torch.allclose(model.queue.norm(dim=1), torch.full((8,), 2**0.5), atol=1e-5)  # [z1|z2]
    # full: the codes come from 12 embeddings, 8 of them from earlier batches
    assert not torch.isclose(model.training_step(x1, x2, None).loss, plain.training_step(x1, x2, None).loss)


# -------------------------------------------------------------------------------------------- CPC

def small_cpc(**kw):
    torch.manual_seed(0)
    return CPC(SmallCNN(1, 4), **{"image_size": 32, "context_dim": 8, **kw})


def test_cpc_context_cannot_see_rows_below():
    model = small_cpc().eval()  # eval: batch-norm statistics would mix patches (see the method's docstring)
    g = model.side
    assert g == 7
    patches = torch.randn(2 * g * g, 1, 8, 8, requires_grad=True)
    f = model.encoder.encoder(patches).view(2, g, g, -1).permute(0, 3, 1, 2)
    c = model.context(f)
    for r in range(g):
        (grad,) = torch.autograd.grad(c[:, :, r].sum(), patches, retain_graph=True)
        rows = grad.view(2, g, g, -1).abs().sum((0, 2, 3))
        assert rows[r + 1:].sum() == 0 and rows[r] > 0, (r, rows)


def test_cpc_grid_and_loss():
    model = small_cpc()
    x = torch.randn(3, 1, 32, 32)
    grid = model.encoder.eval().grid(x)
    assert grid.shape == (3, 32, 7, 7)
    # grid cell (r, c) is the encoder on pixels 4r .. 4r+7, 4c .. 4c+7
    assert torch.allclose(grid[:, :, 2, 5], model.encoder.encoder(x[:, :, 8:16, 20:28]), atol=1e-6)
    out = model.train().training_step(x, x, None)
    assert out.loss.item() > 0 and out.z1.shape[1] == 32
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert small_cpc(image_size=32, stride=2).side == 13  # a stride given is kept (auto: 4, 7 rows)
    with pytest.raises(UserError, match="do not tile a 30 px image"):
        small_cpc(image_size=30, stride=4)
    with pytest.raises(UserError, match="method.stride=wide: give a positive integer or auto"):
        small_cpc(stride="wide")
    with pytest.raises(UserError, match="method.steps=7"):
        small_cpc(steps=7)


def test_cl_eval_reads_cpc_features_pooled_over_the_grid():
    cfg = compose_cfg("train", ["method=cpc", "encoder.width=4", "method.context_dim=8"])
    _, method = build_model(cfg)
    from omegaconf import OmegaConf

    ckpt = {"config": OmegaConf.to_yaml(cfg, resolve=True), "encoder": method.encoder.state_dict()}
    encoder, _ = encoder_from_checkpoint(ckpt)  # what cl-eval, cl-embed and cl-export run
    size = cfg.dataset.image_size
    x = torch.randn(4, 1, size, size)
    method.eval()
    with torch.no_grad():
        expected = method.encoder.grid(x)
        assert expected.shape[2:] == (5, 5) and encoder.stride == 2  # digits' 16 px at stride=auto
        assert torch.equal(encoder(x), expected.mean((2, 3)))


@pytest.mark.parametrize("size, stride, rows", [(32, 4, 7), (28, 4, 6), (16, 2, 5), (12, 1, 5), (10, 2, 2)])
def test_cpc_stride_auto_keeps_five_rows_where_the_image_allows(size, stride, rows):
    model = small_cpc(image_size=size, steps=1)
    assert (model.encoder.stride, model.side) == (stride, rows)


# ------------------------------------------------------------------------------- two processes

def gather_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        scores, t = sharded()
        mine = slice(rank * 3, (rank + 1) * 3)
        model = small_dino(center_momentum=0.5)
        model._update_center(t[mine])
        torch.save({"codes": sinkhorn(scores[mine], eps=0.5, iters=3), "center": model.center}, f"{out}/rank{rank}.pt")
    finally:
        cleanup()


def sharded():
    g = torch.Generator().manual_seed(3)
    return torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1), torch.randn(6, 12, generator=g)


def test_sinkhorn_and_dino_center_over_two_processes_equal_one(tmp_path):
    from test_distributed import run_two_ranks

    ranks = run_two_ranks(gather_worker, tmp_path)
    scores, t = sharded()
    assert torch.allclose(torch.cat([r["codes"] for r in ranks]), sinkhorn(scores, eps=0.5, iters=3), atol=1e-6)
    for r in ranks:
        assert torch.allclose(r["center"], 0.5 * t.mean(0), atol=1e-6)
