"""Momentum (EMA) targets: deep copies, the cosine momentum schedule, the EMA update; split batch-norm."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy (never the same module or storage) that takes no gradient."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def cosine_momentum(progress: float, start: float, end: float) -> float:
    """BYOL's schedule: m = end - (end - start) * (cos(pi * progress) + 1) / 2; start at 0, end at 1."""
    progress = min(max(progress, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def update_ema(online: nn.Module, target: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online, parameter by parameter."""
    t_params, o_params = list(target.parameters()), list(online.parameters())
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, [p.detach() for p in o_params], alpha=1 - m)


def check_momentum(start: float, end: float) -> None:
    if not 0.0 <= start <= end <= 1.0:
        raise UserError(f"method.momentum_start={start}, momentum_end={end}: need 0 <= start <= end <= 1")


class SplitBatchNorm2d(nn.BatchNorm2d):
    """Batch-norm whose training statistics come from `num_splits` chunks of the batch, as if each
    chunk sat on its own GPU (MoCo's CIFAR-10 demo): keeps the key encoder's BN from leaking which
    samples share a batch. Running statistics and parameters are those of a plain BatchNorm2d."""

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        n = x.shape[0]
        if n % s:
            raise UserError(f"batch of {n} does not split into method.bn_splits={s} equal chunks")
        # one batch_norm per chunk: a slice along the batch keeps channels_last, where folding the
        # chunks into channels (one call on an n/s x s*c tensor) copied the activations to and from
        # NCHW at every layer and made MoCo's step 1.8x a plain one (docs/benchmarks.md)
        means = [self.running_mean.clone() for _ in range(s)]
        variances = [self.running_var.clone() for _ in range(s)]
        y = torch.cat([F.batch_norm(chunk, m, v, self.weight, self.bias, True, self.momentum or 0.1, self.eps)
                       for chunk, m, v in zip(x.chunk(s), means, variances, strict=True)])
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked += 1
        return y


def split_batch_norm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a SplitBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            new = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            split_batch_norm(child, num_splits)
    return module


