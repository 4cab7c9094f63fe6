import math

import pytest
import torch
import torch.nn.functional as F

from contrastive_cli.losses import nt_xent


def nt_xent_reference(z1, z2, t):
    """Loop-by-loop transcription of SimCLR's algorithm 1."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n = len(z1)

    def pair_loss(i, j):
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        return -math.log(num / den)

    return sum(pair_loss(k, k + n) + pair_loss(k + n, k) for k in range(n)) / (2 * n)


def test_nt_xent_hand_checked():
    # views a0=(1,0) a1=(0,1) | b0=(0.6,0.8) b1=(0,1); T=0.5. Positive pairs: (a0,b0), (a1,b1).
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    e = math.exp
    # each row: -pos/T + log(sum over the 3 other views of exp(sim/T))
    a0 = -1.2 + math.log(e(0.0) + e(1.2) + e(0.0))  # others: a1 0, b0 0.6, b1 0
    a1 = -2.0 + math.log(e(0.0) + e(1.6) + e(2.0))  # others: a0 0, b0 0.8, b1 1
    b0 = -1.2 + math.log(e(1.2) + e(1.6) + e(1.6))  # others: a0 .6, a1 .8, b1 .8
    b1 = -2.0 + math.log(e(0.0) + e(2.0) + e(1.6))  # others: a0 0, a1 1, b0 .8
    expected = (a0 + a1 + b0 + b1) / 4
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.7589, abs=1e-4)  # worked by hand: (0.4715 + 0.5910 + 1.3822 + 0.5910) / 4


def test_nt_xent_matches_reference_and_is_scale_free():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    ref = nt_xent_reference(z1, z2, 0.3)
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(ref, rel=1e-5)
    assert nt_xent(3 * z1, 0.5 * z2, 0.3).item() == pytest.approx(ref, rel=1e-5)


def test_nt_xent_positive_is_the_other_view_not_the_sample():
    eye = torch.eye(4)
    # identical views of orthogonal samples: the positive (view i+N) is a perfect match
    low = nt_xent(eye, eye.clone(), 0.05).item()
    assert low < 1e-6
    # the second view shuffled: the positive is now orthogonal, the loss is large
    high = nt_xent(eye, eye[[1, 2, 3, 0]], 0.05).item()
    assert high > 10


def test_nt_xent_gradient_flows_to_both_views():
    z1 = torch.randn(4, 3, requires_grad=True)
    z2 = torch.randn(4, 3, requires_grad=True)
    nt_xent(z1, z2, 0.5).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_losses_run_in_fp32_under_autocast():
    from contrastive_cli.losses import info_nce

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    queue = F.normalize(torch.randn(64, 32, generator=g), dim=1)
    exact = nt_xent(z1, z2, 0.1), info_nce(F.normalize(z1, dim=1), F.normalize(z2, dim=1), queue, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.1), info_nce(
            F.normalize(z1, dim=1), F.normalize(z2, dim=1), queue, 0.1)
    assert all(m.dtype == torch.float32 for m in mixed)
    assert mixed[1].item() == pytest.approx(exact[1].item(), abs=1e-6)  # fp32 inputs stay exact
    assert mixed[0].item() == pytest.approx(exact[0].item(), rel=2e-2)  # only the bf16 inputs' rounding



def dcl_reference(z1, z2, t):
    """DCL by the pair: as SimCLR's algorithm 1 with the positive also left out of the denominator."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n = len(z1)

    def pair_loss(i, j):
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k not in (i, j))
        return -float(z[i] @ z[j]) / t + math.log(den)

    return sum(pair_loss(k, k + n) + pair_loss(k + n, k) for k in range(n)) / (2 * n)


def test_dcl_hand_checked_and_matches_reference():
    # the hand-checked views above; the positive is out of each denominator now
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    a0 = -1.2 + math.log(2.0)  # others: a1 0, b1 0
    a1 = -2.0 + math.log(1.0 + math.exp(1.6))  # a0 0, b0 0.8
    b0 = -1.2 + math.log(2 * math.exp(1.6))  # a1 .8, b1 .8
    b1 = -2.0 + math.log(1.0 + math.exp(1.6))  # a0 0, b0 .8
    expected = (a0 + a1 + b0 + b1) / 4
    assert expected == pytest.approx(0.0385, abs=1e-4)  # (-0.5069 - 0.2161 + 1.0931 - 0.2161) / 4
    assert nt_xent(z1, z2, 0.5, decoupled=True).item() == pytest.approx(expected, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert nt_xent(z1, z2, 0.3, decoupled=True).item() == pytest.approx(dcl_reference(z1, z2, 0.3), rel=1e-5)
    # always below NT-Xent: removing a positive term from a log-sum-exp lowers it
    assert nt_xent(z1, z2, 0.3, decoupled=True) < nt_xent(z1, z2, 0.3)


def test_simclr_loss_option():
    from contrastive_cli.encoders import SmallCNN
    from contrastive_cli.errors import UserError
    from contrastive_cli.methods.simclr import SimCLR

    with pytest.raises(UserError, match="method.loss=dlc: choose from nt_xent, dcl"):
        SimCLR(SmallCNN(1, 4), loss="dlc")
    assert SimCLR(SmallCNN(1, 4), loss="dcl").decoupled
