"""Momentum (EMA) targets: deep copies, the cosine momentum schedule, the EMA update; split batch-norm."""

from __future__ import annotations

import copy
import math

import torch
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


# ATen's channels-last group-norm kernel reads the whole tensor once per thread when a sample has at least
# this many positions (`feature_map_threshold` in group_norm_kernel.cpp); below it, it walks each channel
# with a stride and is slower than one batch-norm call per chunk
_GROUP_NORM_MIN_POSITIONS = 1024


class _ChunkBatchNorm(torch.autograd.Function):
    """Training-mode batch-norm of each of `s` equal chunks of the batch: y and each chunk's mean and
    biased variance (s x C). On a channels-last CPU batch the forward is one group-norm call instead of
    `s` batch_norm calls and a `cat`: each call is a parallel region that waits for its slowest thread, so
    the 8 chunks made MoCo's step sensitive to a shared CPU (2.08x SimCLR's beside a busy process, 1.52x
    alone; 1.62x and 1.36x with this, 2-core Intel Xeon; docs/benchmarks.md). The backward stays one
    batch-norm backward per chunk: the same sums written as tensor reductions were 19x slower."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, s: int, eps: float):
        n, c = x.shape[:2]
        positions = x[0, 0].numel() * (n // s)
        if weight is None:  # fp32 ones: bf16/fp16 inputs then get fp32 statistics, as with an affine BN
            weight = x.new_ones(c, dtype=torch.promote_types(x.dtype, torch.float32))
        stat_dtype = weight.dtype  # ATen's: fp32 statistics for bf16/fp16 activations with fp32 weights
        layout = torch.channels_last if x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format
        if x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
                and positions >= _GROUP_NORM_MIN_POSITIONS:
            # channels-last memory is (s, n/s, h, w, c): each chunk is one "sample" of a group-norm with one
            # group per channel, which normalizes it over its n/s images and h x w positions, as batch-norm
            # normalizes the chunk; a view, no copy
            chunks = x.view(s, n // s, c, *x.shape[2:]).permute(0, 2, 1, 3, 4).reshape(s, c, positions, 1)
            y, mean, invstd = torch.native_group_norm(chunks, weight, bias, s, c, positions, c, eps)
            y = y.view(s, c, n // s, *x.shape[2:]).permute(0, 2, 1, 3, 4).reshape(x.shape)
            # the same memory as a tensor of its own, not a view: autograd forbids modifying a view made
            # inside a Function in place, and an in-place ReLU follows batch-norm in ResNets
            y = y.new_empty(0).set_(y.untyped_storage(), y.storage_offset(), y.shape, y.stride())
            mean, invstd = mean.view(s, c), invstd.view(s, c)
        else:
            x = x.contiguous(memory_format=layout)
            y = torch.empty_like(x, memory_format=layout)
            mean, invstd = x.new_empty((s, c), dtype=stat_dtype), x.new_empty((s, c), dtype=stat_dtype)
            for i, (xi, yi) in enumerate(zip(x.chunk(s), y.chunk(s), strict=True)):
                torch.ops.aten.native_batch_norm.out(xi, weight, bias, None, None, True, 0.0, eps,
                                                     out=yi, save_mean=mean[i], save_invstd=invstd[i])
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.s, ctx.eps, ctx.has_bias, ctx.layout = s, eps, bias is not None, layout
        var = (invstd.double().pow(-2) - eps).clamp_min(0).to(stat_dtype)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_y = grad_y.contiguous(memory_format=ctx.layout)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        parts = [torch.ops.aten.native_batch_norm_backward(gi, xi, weight, None, None, mi, vi, True, ctx.eps, mask)
                 for gi, xi, mi, vi in zip(grad_y.chunk(ctx.s), x.chunk(ctx.s), mean, invstd, strict=True)]
        grad_x = torch.cat([p[0] for p in parts]) if mask[0] else None
        grad_w = torch.stack([p[1] for p in parts]).sum(0) if mask[1] else None
        grad_b = torch.stack([p[2] for p in parts]).sum(0) if mask[2] else None
        return grad_x, grad_w, grad_b, None, None


class SplitBatchNorm2d(nn.BatchNorm2d):
    """Batch-norm whose training statistics come from `num_splits` chunks of the batch, as if each
    chunk sat on its own GPU (MoCo's CIFAR-10 demo): keeps the key encoder's BN from leaking which
    samples share a batch. Running statistics and parameters are those of a plain BatchNorm2d; the
    running statistics move towards the chunks' average, as s BatchNorm2d layers' averaged would."""

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
        positions = n // s * x[0, 0].numel()
        if positions == 1:
            raise UserError(f"batch of {n} in method.bn_splits={s} chunks of {n // s} image(s) at a {x.shape[2]}x"
                            f"{x.shape[3]} feature map: one value per channel, nothing to normalize; raise "
                            f"trainer.batch_size or lower method.bn_splits")
        y, mean, var = _ChunkBatchNorm.apply(x, self.weight, self.bias, s, self.eps)
        if self.track_running_stats:
            m = self.momentum if self.momentum is not None else 0.1
            with torch.no_grad():
                unbiased = var.mean(0) * positions / (positions - 1)
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
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


