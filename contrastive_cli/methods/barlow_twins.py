"""Barlow Twins (Zbontar et al. 2021, arXiv:2103.03230): the cross-correlation matrix of the two
views' standardized embeddings is pushed to the identity; no negatives, no momentum encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import gather_with_grad
from ..errors import positive
from ..heads import mlp
from ..losses import barlow_twins
from .base import Method, StepOutput


class BarlowTwins(Method):
    min_batch_size = 2  # the batch standardization needs two samples

    def __init__(self, encoder: nn.Module, proj_hidden_dim: int = 2048, proj_dim: int = 2048, proj_layers: int = 3,
                 lambd: float = 5e-3, scale_loss: float = 1e-3):
        super().__init__(encoder)
        self.lambd = positive("method.lambd", lambd, strict=False)
        self.scale_loss = positive("method.scale_loss", scale_loss)
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers)

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        z1, z2 = self.projector(self.encoder(torch.cat([x1, x2]))).chunk(2)
        # Under DDP the correlation is over the global batch: every rank computes it on the gathered
        # embeddings (the same matrix as the paper's all-reduced sum of per-rank products, with the
        # standardization over the global batch too); gradients return to each rank's slice.
        loss = barlow_twins(gather_with_grad(z1), gather_with_grad(z2), self.lambd) * self.scale_loss
        return StepOutput(loss, z1, z2)
