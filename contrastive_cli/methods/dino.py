"""DINO (Caron et al. 2021, arXiv:2104.14294): self-distillation without labels. A student
(encoder + head) matches the softmax of an EMA teacher on other crops of the image; the teacher sees
the global crops only and its outputs are centered (an EMA of its batch mean) and sharpened (a low
temperature), which together keep it from collapsing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ..distributed import all_reduce_sum, rank_and_world
from ..errors import UserError, positive, probability
from ..losses import dino_loss, fp32
from ..momentum import check_momentum, cosine_momentum, frozen_copy, update_ema
from .base import Method, StepOutput, encode_groups


class DINOHead(nn.Module):
    """The paper's head: MLP (Linear-GELU x 2, then a bottleneck Linear), L2-normalized, then a
    weight-normalized Linear to K logits whose norm is fixed to 1 when `norm_last_layer` (stabler)."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int, norm_last_layer: bool,
                 batch_norm: bool):
        super().__init__()
        for name, v in (("hidden_dim", hidden_dim), ("bottleneck_dim", bottleneck_dim), ("out_dim", out_dim)):
            positive(f"method.{name}", v, integer=True)
        if not isinstance(batch_norm, bool):
            raise UserError(f"method.batch_norm={batch_norm!r}: true or false")

        def block(d_in: int) -> list[nn.Module]:
            return [nn.Linear(d_in, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if batch_norm else []), nn.GELU()]

        self.mlp = nn.Sequential(*block(in_dim), *block(hidden_dim), nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        # the last layer in fp32: its outputs are cosines divided by temperatures down to 0.04, and
        # bf16 autocast would round them to steps of 2^-8 first
        return fp32(self.last_layer)(F.normalize(self.mlp(x).float(), dim=1))


class DINO(Method):
    multi_crop = True

    def __init__(self, encoder: nn.Module, hidden_dim: int = 512, bottleneck_dim: int = 128, out_dim: int = 1024,
                 norm_last_layer: bool = True, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, teacher_temp_warmup: float = 0.3, center_momentum: float = 0.9,
                 momentum_start: float = 0.996, momentum_end: float = 1.0, clip_grad: float = 0.0,
                 freeze_last_layer: float = 0.0, batch_norm: bool = False):
        super().__init__(encoder)
        self.student_temp = positive("method.student_temp", student_temp)
        self.teacher_temp = positive("method.teacher_temp", teacher_temp)
        self.warmup_teacher_temp = positive("method.warmup_teacher_temp", warmup_teacher_temp)
        self.teacher_temp_warmup = probability("method.teacher_temp_warmup", teacher_temp_warmup)
        self.center_momentum = probability("method.center_momentum", center_momentum)
        self.clip_grad = positive("method.clip_grad", clip_grad, strict=False)
        self.freeze_last_layer = probability("method.freeze_last_layer", freeze_last_layer)
        if not isinstance(norm_last_layer, bool):
            raise UserError(f"method.norm_last_layer={norm_last_layer!r}: true or false")
        check_momentum(momentum_start, momentum_end)
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.momentum, self.progress = momentum_start, 0.0
        self.head = DINOHead(encoder.feature_dim, hidden_dim, bottleneck_dim, out_dim, norm_last_layer, batch_norm)
        self.teacher_encoder, self.teacher_head = frozen_copy(self.encoder), frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(out_dim))

    def temperature(self) -> float:
        """The teacher's: linear from warmup_teacher_temp to teacher_temp over the first
        `teacher_temp_warmup` of training (the paper: 0.04 -> 0.07 over 30 epochs), then constant."""
        if self.progress >= self.teacher_temp_warmup:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * (
            self.progress / self.teacher_temp_warmup)

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor, crops: tuple[Tensor, ...] = ()) -> StepOutput:
        views = [x1, x2, *crops]
        student = encode_groups(self.encoder, views, self.head)  # the globals, then the locals
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_encoder(torch.cat([x1, x2]))).chunk(2)
        loss = dino_loss(student, list(teacher), self.center, self.student_temp, self.temperature())
        self._update_center(torch.cat(teacher))
        return StepOutput(loss, student[0], student[1])

    @torch.no_grad()
    def _update_center(self, t: Tensor) -> None:
        """center <- m * center + (1 - m) * the teacher's batch mean over every rank (after the loss read it)."""
        batch_mean = all_reduce_sum(t.float().sum(0)) / (len(t) * rank_and_world()[1])
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)

    def before_optimizer_step(self, progress: float) -> None:
        if self.clip_grad:  # per parameter, as the paper's code: each gradient's own norm at most clip_grad
            for p in self.parameters():
                if p.grad is not None:  # a tensor factor, not an `if`: no host sync on the GPU
                    p.grad.mul_((self.clip_grad / (p.grad.norm() + 1e-6)).clamp(max=1.0))
        if progress < self.freeze_last_layer:  # the paper freezes it for the first epoch: less unstable
            for p in self.head.last_layer.parameters():
                p.grad = None

    def get_extra_state(self) -> dict:
        return {"progress": self.progress}  # in the checkpoint: a resumed run's temperature goes on from here

    def set_extra_state(self, state: dict) -> None:
        self.progress = float(state["progress"])

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        self.progress = progress
        self.momentum = cosine_momentum(progress, self.momentum_start, self.momentum_end)
        update_ema(self.encoder, self.teacher_encoder, self.momentum)
        update_ema(self.head, self.teacher_head, self.momentum)
