"""VICReg (Bardes et al. 2022, arXiv:2105.04906): variance, invariance and covariance terms on the
embeddings of the two views; no negatives, no momentum encoder, no predictor."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import gather_with_grad
from ..errors import positive
from ..heads import mlp
from ..losses import vicreg
from .base import Method, StepOutput


class VICReg(Method):
    min_batch_size = 2  # variance and covariance need two samples

    def __init__(self, encoder: nn.Module, proj_hidden_dim: int = 2048, proj_dim: int = 2048, proj_layers: int = 3,
                 sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0):
        super().__init__(encoder)
        self.weights = {k: positive(f"method.{k}", v, strict=False) for k, v in
                        (("sim_weight", sim_weight), ("var_weight", var_weight), ("cov_weight", cov_weight))}
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers)

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        z1, z2 = self.projector(self.encoder(torch.cat([x1, x2]))).chunk(2)
        # under DDP all three terms see the gathered batch (the paper gathers for variance and
        # covariance; its invariance term is a per-sample mean, the same over the gathered batch)
        loss = vicreg(gather_with_grad(z1), gather_with_grad(z2), **self.weights)
        return StepOutput(loss, z1, z2)
