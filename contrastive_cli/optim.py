"""Optimizer parameter groups, LARS, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .errors import UserError, positive


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Biases and norm parameters (ndim <= 1) get no weight decay and no LARS adaptation. Parameters
    a method lists in `fixed_lr_parameters()` (SimSiam's predictor) get groups marked `fixed_lr`,
    which the schedule leaves at the base lr."""
    fixed = {id(p) for p in getattr(model, "fixed_lr_parameters", list)()}
    groups = []
    for is_fixed in (False, True):
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad and (id(p) in fixed) == is_fixed:
                (no_decay if p.ndim <= 1 else decay).append(p)
        if is_fixed and not fixed:
            break
        mark = {"fixed_lr": True} if is_fixed else {}
        groups += [
            {"params": decay, "weight_decay": weight_decay, "lars": True, **mark},
            {"params": no_decay, "weight_decay": 0.0, "lars": False, **mark},
        ]
    return groups


def lr_factors(optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> list[Callable[[int], float]]:
    """One multiplier per parameter group for LambdaLR: the schedule, or 1 for `fixed_lr` groups."""
    return [_constant if g.get("fixed_lr") else factor for g in optimizer.param_groups]


def _constant(step: int) -> float:
    return 1.0


def build_optimizer(partial: Callable, model: nn.Module, lr: float, weight_decay: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer over `param_groups`; on CUDA the fused kernels where torch has them."""
    positive("optimizer.lr", lr)
    positive("optimizer.weight_decay", weight_decay, strict=False)
    target = getattr(partial, "func", partial)
    extra = {"fused": True} if fused and target in (torch.optim.SGD, torch.optim.AdamW, torch.optim.Adam) else {}
    try:
        return partial(param_groups(model, weight_decay), lr=lr, weight_decay=weight_decay, **extra)
    except (TypeError, ValueError) as e:
        raise UserError(f"optimizer: {e}") from None


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight tensor is scaled by the trust ratio
    trust_coefficient * |w| / |g + weight_decay * w| (You et al. 2017, as in SimCLR), skipped where lars=False."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        positive("optimizer.lr", lr)
        positive("optimizer.momentum", momentum, strict=False)
        positive("optimizer.trust_coefficient", trust_coefficient)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad  # changed in place: nothing reads a gradient after the step, and a wide head's
                if group["weight_decay"] != 0:  # temporaries were a tenth of its step on a CPU
                    d.add_(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where(
                        (w_norm > 0) & (d_norm > 0),
                        group["trust_coefficient"] * w_norm / (d_norm + group["eps"]),
                        torch.ones_like(w_norm),
                    )
                    d.mul_(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def warmup_cosine(total_steps: int, warmup_steps: int, final_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr at a step: linear warm-up from 0, then cosine to final_ratio."""
    if not 0.0 <= final_ratio <= 1.0:
        raise UserError(f"schedule.final_lr_ratio={final_ratio}: must be in [0, 1]")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return factor


def restarted(base: Callable[[int], float], start: int, total: int, peak: float,
              final_ratio: float) -> Callable[[int], float]:
    """`base` before step `start`; from there a fresh cosine (no warm-up) from `peak` to peak x final_ratio
    at `total`: the extra epochs of an extended run (trainer.extend=restart)."""

    def factor(step: int) -> float:
        if step < start:
            return base(step)
        t = (step - start) / max(1, total - start)
        return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    return factor
