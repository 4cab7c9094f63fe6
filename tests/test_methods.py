"""MoCo, BYOL, margin contrastive and triplet: losses on hand-checked numbers, momentum encoders,
the queue, mining, and the collapse monitor."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive_cli.encoders import SmallCNN
from contrastive_cli.errors import UserError
from contrastive_cli.losses import (
    byol_loss,
    contrastive_margin,
    info_nce,
    mine_negatives,
    moco_logits,
    pairwise_distance,
    triplet,
)
from contrastive_cli.methods.base import pair_labels
from contrastive_cli.methods.byol import BYOL
from contrastive_cli.methods.moco import MoCo
from contrastive_cli.methods.moco_v3 import MoCoV3
from contrastive_cli.methods.triplet import Triplet
from contrastive_cli.momentum import SplitBatchNorm2d, cosine_momentum, update_ema

# ------------------------------------------------------------------------------------------- losses

def test_moco_logits_put_the_positive_at_index_0():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    logits = moco_logits(q, k, queue, temperature=0.5)
    assert torch.allclose(logits, torch.tensor([[1.2, 0.0, -2.0, 2.0]]))  # [q.k, q.queue...] / T
    expected = -1.2 + math.log(math.exp(1.2) + math.exp(0.0) + math.exp(-2.0) + math.exp(2.0))
    assert info_nce(q, k, queue, 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_byol_loss_is_two_minus_two_cosine():
    p = torch.tensor([[3.0, 4.0], [1.0, 0.0]], requires_grad=True)
    z = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    # cosines 24/25 and 0: (2 - 2 * 0.96 + 2 - 0) / 2 = 1.04
    assert byol_loss(p, z).item() == pytest.approx(1.04, abs=1e-6)
    z.requires_grad_(True)
    byol_loss(p, z).backward()
    assert z.grad is None or not z.grad.any()  # the target takes no gradient


def test_contrastive_margin_formula():
    e1 = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    e2 = torch.tensor([[0.0, 1.0], [3.0, 0.5]])
    same = torch.eye(2, dtype=torch.bool)
    # positives: d(e1_0, e2_0) = 1, d(e1_1, e2_1) = 0.5 -> mean d^2 = (1 + 0.25) / 2
    # negatives: d(e1_0, e2_1) = sqrt(9.25) > m, d(e1_1, e2_0) = sqrt(10) > m for m = 2 -> 0
    assert contrastive_margin(e1, e2, same, margin=2.0).item() == pytest.approx(0.625, abs=1e-6)
    # m = 3.5: negatives contribute ((3.5 - sqrt(9.25))^2 + (3.5 - sqrt(10))^2) / 2
    neg = ((3.5 - math.sqrt(9.25)) ** 2 + (3.5 - math.sqrt(10)) ** 2) / 2
    assert contrastive_margin(e1, e2, same, margin=3.5).item() == pytest.approx(0.625 + neg, abs=1e-5)


def test_triplet_formula():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    n = torch.tensor([[0.0, 1.2], [2.0, 0.0]])
    # max(0, 1 - 1.2 + 0.5) = 0.3 and max(0, 0.5 - 2 + 0.5) = 0
    assert triplet(a, p, n, margin=0.5).item() == pytest.approx(0.15, abs=1e-6)


def test_mining_picks_the_right_negative():
    # one anchor, d(a, p) = 1.0; candidate negatives at distances 0.5, 1.2, 1.4, 3.0 (the last invalid)
    d_an = torch.tensor([[0.5, 1.2, 1.4, 3.0]])
    d_ap = torch.tensor([1.0])
    valid = torch.tensor([[True, True, True, False]])
    assert mine_negatives(d_an, d_ap, valid, "hard", 0.5).item() == 0
    assert mine_negatives(d_an, d_ap, valid, "semi_hard", 0.5).item() == 1  # closest farther than d(a,p)
    # no negative farther than the positive: semi-hard falls back to the farthest valid one
    assert mine_negatives(torch.tensor([[0.2, 0.4, 0.9]]), d_ap, torch.ones(1, 3, dtype=torch.bool),
                          "semi_hard", 0.5).item() == 2
    picks = {mine_negatives(d_an, d_ap, valid, "random", 0.5, torch.Generator().manual_seed(s)).item()
             for s in range(40)}
    assert picks == {0, 1, 2}  # every valid negative, never the invalid one


def test_triplet_method_never_picks_the_same_image_as_negative():
    torch.manual_seed(0)
    model = Triplet(SmallCNN(1, 4), mining="hard", proj_hidden_dim=16, proj_dim=8)
    x = torch.randn(6, 1, 16, 16)
    out = model.training_step(x, x + 0.01 * torch.randn_like(x), torch.full((6,), -1))
    assert torch.isfinite(out.loss)
    e = F.normalize(torch.cat([out.z1, out.z2]), dim=1).detach()
    d = pairwise_distance(e, e)
    same = pair_labels(torch.full((6,), -1), False, 6, e.device).repeat(2, 2)
    neg = mine_negatives(d, d.diagonal(6)[:1].repeat(12), ~same, "hard", 0.5)
    assert not same[torch.arange(12), neg].any()


def test_supervised_pairs_follow_labels():
    labels = torch.tensor([0, 1, 0])
    assert pair_labels(labels, True, 3, torch.device("cpu")).tolist() == [
        [True, False, True], [False, True, False], [True, False, True]]
    with pytest.raises(UserError, match="needs labels"):
        pair_labels(torch.tensor([0, -1, 1]), True, 3, torch.device("cpu"))


# ------------------------------------------------------------------------------- momentum encoders

def _moco(**kw):
    torch.manual_seed(0)
    return MoCo(SmallCNN(1, 4), **{"proj_hidden_dim": 16, "proj_dim": 8, "queue_size": 10, "bn_splits": 2, **kw})


@pytest.mark.parametrize("make", [_moco, lambda: BYOL(SmallCNN(1, 4), proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16),
                                  lambda: MoCoV3(SmallCNN(1, 4), proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16)])
def test_target_is_a_frozen_deep_copy_moved_by_ema(make):
    model = make()
    online = list(model.encoder.parameters()) + list(model.projector.parameters())
    target_mods = [m for name, m in model.named_children() if name.startswith(("key_", "target_", "momentum_"))]
    target = [p for m in target_mods for p in m.parameters()]
    assert len(online) == len(target)
    for o, t in zip(online, target, strict=True):
        assert o is not t and o.data_ptr() != t.data_ptr() and torch.equal(o, t)
        assert not t.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 1, 16, 16)
    model.training_step(x, x.flip(-1), torch.full((4,), -1)).loss.backward()
    assert all(t.grad is None for t in target)
    before = [t.detach().clone() for t in target]
    opt.step()
    model.on_step_end(0.5)
    m = cosine_momentum(0.5, 0.99, 1.0)
    assert m == pytest.approx(0.995)
    for o, t, b in zip(online, target, before, strict=True):
        assert torch.allclose(t, m * b + (1 - m) * o.detach(), atol=1e-7)


def test_momentum_schedule_ends_at_its_end_value():
    assert cosine_momentum(0.0, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_momentum(1.0, 0.99, 1.0) == 1.0
    assert cosine_momentum(0.7, 0.996, 0.996) == pytest.approx(0.996)  # constant when equal
    steps = 7
    assert cosine_momentum(steps / steps, 0.9, 0.999) == pytest.approx(0.999)  # on_step_end(step / total)


def test_update_ema_rule():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    before = [p.detach().clone() for p in b.parameters()]
    update_ema(a, b, 0.9)
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), before, strict=True):
        assert torch.allclose(pb, 0.9 * p0 + 0.1 * pa)


# ------------------------------------------------------------------------------------------- queue

def test_queue_holds_normalized_keys_and_wraps():
    model = _moco()
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(10))
    keys = [F.normalize(torch.randn(4, 8), dim=1) for _ in range(3)]
    for k in keys:
        model._enqueue(k)
    # 12 keys into 10 slots: batch 1 -> 0-3, batch 2 -> 4-7, batch 3 -> 8, 9, then wraps to 0, 1
    assert model.queue_ptr.item() == 2
    assert torch.equal(model.queue[0:2], keys[2][2:4])
    assert torch.equal(model.queue[2:4], keys[0][2:4])
    assert torch.equal(model.queue[4:8], keys[1])
    assert torch.equal(model.queue[8:10], keys[2][0:2])


def test_training_step_enqueues_normalized_keys_after_the_loss():
    model = _moco(symmetric=True)
    x = torch.randn(4, 1, 16, 16)
    queue_before = model.queue.clone()
    out = model.training_step(x, x.flip(-1), torch.full((4,), -1))
    out.loss.backward()  # the in-place enqueue did not touch what backward needs
    assert model.queue_ptr.item() == 8  # both views' keys, symmetric loss
    assert torch.allclose(model.queue[:8].norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.equal(model.queue[8:], queue_before[8:])


def test_split_batch_norm_normalizes_each_group_on_its_own():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3, num_splits=2)
    x = torch.randn(6, 3, 4, 4)
    y = bn(x)
    for j in range(2):  # chunks of consecutive samples, as if each sat on its own GPU
        group = x[3 * j : 3 * j + 3]
        ref = (group - group.mean((0, 2, 3), keepdim=True)) / torch.sqrt(group.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps)
        assert torch.allclose(y[3 * j : 3 * j + 3], ref, atol=1e-5)
    bn.eval()
    assert torch.allclose(bn(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False))
    with pytest.raises(UserError, match="bn_splits"):
        bn.train()(torch.randn(5, 3, 4, 4))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [3, 23])
def test_split_batch_norm_equals_one_batch_norm_per_chunk_and_keeps_the_layout(layout, size):
    """Outputs, gradients (input, weight, bias) and running statistics of a split BN equal those of
    s separate BatchNorm2d layers (one per chunk, as on s GPUs) whose running statistics are averaged.
    23 px: each chunk has 2 x 23 x 23 >= 1024 positions, where a channels-last batch goes through
    group-norm; 3 px and contiguous batches through one batch-norm per chunk."""
    torch.manual_seed(0)
    s, c = 4, 5
    bn = SplitBatchNorm2d(c, num_splits=s).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    refs = [nn.BatchNorm2d(c).double() for _ in range(s)]
    for r in refs:
        r.load_state_dict({k: v for k, v in bn.state_dict().items()})
    x = (torch.randn(8, c, size, size, dtype=torch.double) * 2 + 1).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(8, c, size, size, dtype=torch.double)  # a random loss, so no gradient cancels out
    y = bn(x)
    assert y.is_contiguous(memory_format=layout)
    gx, gw, gb = torch.autograd.grad((y * w).sum(), (x, bn.weight, bn.bias))
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.cat([r(chunk) for r, chunk in zip(refs, x_ref.chunk(s), strict=True)])
    (y_ref * w).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, x_ref.grad)
    torch.testing.assert_close(gw, sum(r.weight.grad for r in refs))
    torch.testing.assert_close(gb, sum(r.bias.grad for r in refs))
    torch.testing.assert_close(bn.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([r.running_var for r in refs]).mean(0))
    assert int(bn.num_batches_tracked) == 1


def _batch_norm_per_chunk(x, bn, s):
    """The reference: one training-mode batch_norm per chunk with the split BN's affine parameters."""
    return torch.cat([nn.functional.batch_norm(chunk, None, None, bn.weight, bn.bias, True) for chunk in x.chunk(s)])


def test_split_batch_norm_in_bf16_matches_batch_norm_per_chunk():
    """bf16 channels-last activations (MoCo's default on a CPU with bf16) take the group-norm path: the
    output agrees with per-chunk batch_norm to bf16 rounding, and the running statistics stay fp32."""
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(16, num_splits=4)
    x = (torch.randn(16, 16, 23, 23) * 3 + 2).bfloat16().contiguous(memory_format=torch.channels_last)
    y = bn(x)
    ref = _batch_norm_per_chunk(x, bn, 4)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), ref.float(), atol=0.02, rtol=0.01)
    assert bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(bn.running_mean, 0.1 * x.float().mean((0, 2, 3)), atol=1e-4, rtol=1e-3)
    for size in (3, 23):  # without weights, on both paths: still fp32 statistics
        plain = SplitBatchNorm2d(16, num_splits=4, affine=False)
        xs = x[..., :size, :size].contiguous(memory_format=torch.channels_last)
        plain(xs)
        torch.testing.assert_close(plain.running_mean, 0.1 * xs.float().mean((0, 2, 3)), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("size", [3, 23])
def test_split_batch_norm_output_takes_an_in_place_relu(size):
    """conv-BN-ReLU(inplace=True), as in torchvision's ResNets and small_cnn's last block: the split BN's
    output is modified in place on both paths, and the gradient is that of per-chunk batch-norm + ReLU."""
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(4, num_splits=2).double()
    x = torch.randn(8, 4, size, size, dtype=torch.double).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(8, 4, size, size, dtype=torch.double)
    (nn.ReLU(inplace=True)(bn(x)) * w).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = _batch_norm_per_chunk(x_ref, bn, 2)
    (torch.relu(y_ref) * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_split_batch_norm_refuses_one_value_per_channel():
    with pytest.raises(UserError, match="one value per channel.*trainer.batch_size"):
        SplitBatchNorm2d(4, num_splits=8)(torch.randn(8, 4, 1, 1))


# ------------------------------------------------------------------------- training on digits
# Every method at its defaults trains and beats the untrained encoder in tests/test_defaults.py.


@pytest.mark.slow
def test_collapse_monitor_catches_byol_without_predictor(tmp_path, caplog):
    from conftest import compose_cfg

    from contrastive_cli.train import run_training

    cfg = compose_cfg("train", ["method=byol", "method.predictor=false", "trainer.epochs=5", "trainer.batch_size=128",
                                "trainer.knn_monitor=false", "encoder.width=16"])
    with caplog.at_level("WARNING"):
        summary = run_training(cfg, tmp_path)
    assert summary["collapse_warning"]
    # the embeddings sink to one direction: the neg_cos warning (under SGD the std one fired first); once each
    warnings = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage() or "look alike" in r.getMessage()]
    assert 1 <= len(warnings) <= 2 and len(set(w[:40] for w in warnings)) == len(warnings)
    assert all("predictor" in w for w in warnings)


def test_supervised_triplet_without_any_negative_is_zero_not_wrong():
    torch.manual_seed(0)
    model = Triplet(SmallCNN(1, 4), mining="semi_hard", proj_hidden_dim=16, proj_dim=8, supervised=True)
    x = torch.randn(4, 1, 16, 16)
    out = model.training_step(x, x.flip(-1), torch.zeros(4, dtype=torch.long))  # one label: no negatives
    assert out.loss.item() == 0.0
    out.loss.backward()
    mixed = model.training_step(x, x.flip(-1), torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(mixed.loss) and mixed.loss.item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_cnn_pools_before_the_relu_with_the_outputs_and_gradients_of_relu_then_pool(dtype):
    """SmallCNN puts the max-pool before the ReLU to save time; a checkpoint trained with either order
    must give the same numbers, bit for bit, in both precisions (bf16 has many ties in a window)."""
    torch.manual_seed(0)
    model = SmallCNN(1, 4).to(memory_format=torch.channels_last)
    reference = nn.Sequential(*[nn.Sequential(b[0], b[1], b[3], b[2]) if len(b) == 4 else b for b in model.net[:4]],
                              *model.net[4:])
    assert [type(m) for m in model.net[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU]
    x = torch.randn(16, 1, 32, 32).to(memory_format=torch.channels_last)
    grads = []
    for net in (model, reference):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = net(x)
        out.float().pow(2).sum().backward()
        grads.append((out, [p.grad.clone() for p in net.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1], strict=True))
