"""BYOL (Grill et al. 2020, arXiv:2006.07733): an online network with a predictor regresses the
projection of a momentum target network; no negatives."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import positive
from ..heads import mlp
from ..losses import byol_loss
from ..momentum import check_momentum, cosine_momentum, frozen_copy, update_ema
from .base import Method, StepOutput


class BYOL(Method):
    def __init__(self, encoder: nn.Module, proj_hidden_dim: int = 1024, proj_dim: int = 128,
                 pred_hidden_dim: int = 1024, momentum_start: float = 0.99, momentum_end: float = 1.0,
                 predictor: bool = True):
        super().__init__(encoder)
        check_momentum(momentum_start, momentum_end)
        positive("method.pred_hidden_dim", pred_hidden_dim, integer=True)
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.momentum = momentum_start
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim)
        # predictor=false exists to show collapse (the paper's ablation): the monitor should flag it
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim) if predictor else nn.Identity()
        self.target_encoder, self.target_projector = frozen_copy(self.encoder), frozen_copy(self.projector)

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        x = torch.cat([x1, x2])
        z = self.projector(self.encoder(x))
        p1, p2 = self.predictor(z).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_projector(self.target_encoder(x)).chunk(2)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)  # symmetrized, as in the paper
        z1, z2 = z.chunk(2)
        return StepOutput(loss, z1, z2)

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        self.momentum = cosine_momentum(progress, self.momentum_start, self.momentum_end)
        update_ema(self.encoder, self.target_encoder, self.momentum)
        update_ema(self.projector, self.target_projector, self.momentum)
