"""MoCo v3 (Chen, Xie & He 2021, arXiv:2104.02057): no queue; each view's prediction is contrasted
with the momentum encoder's keys of the other view over the batch (symmetric InfoNCE, scaled by 2T)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import gather, rank_and_world
from ..errors import positive
from ..heads import mlp
from ..losses import batch_info_nce
from ..momentum import check_momentum, cosine_momentum, frozen_copy, update_ema
from .base import Method, StepOutput


class MoCoV3(Method):
    def __init__(self, encoder: nn.Module, temperature: float = 0.2, proj_hidden_dim: int = 2048, proj_dim: int = 256,
                 proj_layers: int = 2, pred_hidden_dim: int = 2048, momentum_start: float = 0.99,
                 momentum_end: float = 1.0):
        super().__init__(encoder)
        self.temperature = positive("method.temperature", temperature)
        positive("method.pred_hidden_dim", pred_hidden_dim, integer=True)
        check_momentum(momentum_start, momentum_end)
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.momentum = momentum_start
        # the paper's heads for ResNets: a projector ending in an affine-free BN (2 layers; 3 for ViTs),
        # a 2-layer predictor without it
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bn=True)
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim)
        self.momentum_encoder, self.momentum_projector = frozen_copy(self.encoder), frozen_copy(self.projector)

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        n = x1.shape[0]
        x = torch.cat([x1, x2])
        z = self.projector(self.encoder(x))
        q1, q2 = self.predictor(z).chunk(2)
        with torch.no_grad():
            k1, k2 = self.momentum_projector(self.momentum_encoder(x)).chunk(2)
        # under DDP the keys of every rank are the negatives; this rank's positives sit at rank * n
        offset = rank_and_world()[0] * n
        t = self.temperature
        loss = batch_info_nce(q1, gather(k2), t, offset) + batch_info_nce(q2, gather(k1), t, offset)
        z1, z2 = z.chunk(2)
        return StepOutput(loss, z1, z2)

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        self.momentum = cosine_momentum(progress, self.momentum_start, self.momentum_end)
        update_ema(self.encoder, self.momentum_encoder, self.momentum)
        update_ema(self.projector, self.momentum_projector, self.momentum)
