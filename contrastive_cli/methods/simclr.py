"""SimCLR (Chen et al. 2020, arXiv:2002.05709): encoder + MLP projector, NT-Xent over 2N views."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import gather_with_grad
from ..errors import check, positive
from ..heads import mlp
from ..losses import nt_xent
from .base import Method, StepOutput

LOSSES = ("nt_xent", "dcl")  # dcl: the positive pair left out of the denominator (Yeh et al. 2022)


class SimCLR(Method):
    min_batch_size = 2  # with one image there is no negative

    def __init__(self, encoder: nn.Module, temperature: float = 0.5, proj_hidden_dim: int = 512, proj_dim: int = 128,
                 loss: str = "nt_xent"):
        super().__init__(encoder)
        self.temperature = positive("method.temperature", temperature)
        check(loss in LOSSES, f"method.loss={loss}: choose from {', '.join(LOSSES)}")
        self.decoupled = loss == "dcl"
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim)

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        # one pass over both views: batch-norm statistics over all 2N images, as in the paper
        z1, z2 = self.projector(self.encoder(torch.cat([x1, x2]))).chunk(2)
        # under DDP every rank scores the global batch: negatives from all ranks, gradients back to each
        loss = nt_xent(gather_with_grad(z1), gather_with_grad(z2), self.temperature, self.decoupled)
        return StepOutput(loss, z1, z2)
