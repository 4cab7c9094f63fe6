"""SwAV (Caron et al. 2020, arXiv:2006.09882): online clustering. Each global crop's embeddings are
assigned to K learnable prototypes by Sinkhorn-Knopp (an equal share per prototype, no gradient);
every other crop predicts those codes from its own prototype scores (the swapped prediction)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import positive
from ..heads import mlp
from ..losses import fp32, sinkhorn, swav_loss
from .base import Method, RunShape, StepOutput, encode_groups, enqueue


class SwAV(Method):
    multi_crop = True

    def __init__(self, encoder: nn.Module, proj_hidden_dim: int = 1024, proj_dim: int = 128, num_prototypes: int = 300,
                 temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iters: int = 3, queue_size: int = 0,
                 freeze_prototypes: int = 0):
        super().__init__(encoder)
        self.temperature = positive("method.temperature", temperature)
        self.epsilon = positive("method.epsilon", epsilon)
        self.sinkhorn_iters = positive("method.sinkhorn_iters", sinkhorn_iters, integer=True)
        positive("method.num_prototypes", num_prototypes, integer=True)
        positive("method.queue_size", queue_size, integer=True, strict=False)
        self.freeze_prototypes = positive("method.freeze_prototypes", freeze_prototypes, integer=True, strict=False)
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        self._normalize_prototypes()
        # past embeddings of both global crops, side by side (Q x 2D): with small batches they make the
        # equal-share constraint of Sinkhorn meaningful (the paper: below 256 images per batch)
        self.register_buffer("queue", torch.zeros(queue_size, 2 * proj_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.steps = self.queued = 0  # steps taken, embeddings queued: counted here to need no host sync

    def adapt(self, run: RunShape) -> list[str]:
        return self.cap_queue(run, 1, "SwAV's queue holds the global crops' embeddings of one image per row and step")

    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def _scores(self, z: Tensor) -> Tensor:
        """Cosines to the prototypes in fp32: under bf16 autocast they would be rounded to steps of
        2^-8 before Sinkhorn's exp(s / 0.05) and the loss's division by 0.1."""
        return fp32(F.linear)(z, self.prototypes.weight)

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor, crops: tuple[Tensor, ...] = ()) -> StepOutput:
        n = x1.shape[0]
        z = encode_groups(self.encoder, [x1, x2, *crops], lambda f: F.normalize(self.projector(f), dim=1))
        scores = [self._scores(v) for v in z]  # B x K each, cosines to the unit-norm prototypes
        with torch.no_grad():
            codes = []
            full = 0 < len(self.queue) <= self.queued  # used once filled, as in the paper's code
            for i in range(2):
                s = scores[i].detach()
                if full:
                    s = torch.cat([self._scores(self.queue[:, i * z[i].shape[1]:(i + 1) * z[i].shape[1]]), s])
                codes.append(sinkhorn(s, self.epsilon, self.sinkhorn_iters)[-n:])
            if len(self.queue):
                enqueue(self.queue, self.queue_ptr, torch.cat([z[0], z[1]], 1).detach())
                self.queued += n
        loss = swav_loss(scores, codes, self.temperature)
        return StepOutput(loss, z[0], z[1])

    def before_optimizer_step(self, progress: float) -> None:
        if self.steps < self.freeze_prototypes:  # the paper: the first epoch's iterations, for stability
            self.prototypes.weight.grad = None

    def get_extra_state(self) -> dict:
        return {"steps": self.steps, "queued": self.queued}  # in the checkpoint, for a resumed run

    def set_extra_state(self, state: dict) -> None:
        self.steps, self.queued = int(state["steps"]), int(state["queued"])

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        self.steps += 1
        self._normalize_prototypes()
