import math

import pytest
import torch
from torch import nn

from contrastive_cli.optim import LARS, build_optimizer, param_groups, warmup_cosine


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=100, warmup_steps=10, final_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)


def test_bias_and_norm_parameters_skip_weight_decay():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    decay, no_decay = param_groups(model, 0.5)
    assert [p.ndim for p in decay["params"]] == [2]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0 and no_decay["lars"] is False


def test_lars_step_follows_the_trust_ratio():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "lars": True, "weight_decay": 0.0}, {"params": [b], "lars": False, "weight_decay": 0.0}],
               lr=0.1, momentum=0.0, trust_coefficient=0.01)
    w.grad = torch.tensor([0.0, 2.0])  # |g| = 2 -> trust = 0.01 * 5 / 2 = 0.025
    b.grad = torch.tensor([2.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0 - 0.1 * 0.025 * 2.0]))
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # no adaptation on biases


def test_build_optimizer_applies_groups_to_torch_optimizers():
    model = nn.Linear(3, 2)
    opt = build_optimizer(lambda params, **kw: torch.optim.SGD(params, **kw), model, lr=0.2, weight_decay=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert all(g["lr"] == 0.2 for g in opt.param_groups)
