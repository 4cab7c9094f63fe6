"""Supervised contrastive learning (Khosla et al. 2020, arXiv:2004.11362): the loss L_out over the 2N
views, every view with the same label a positive. Needs a labeled training split."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import gather, gather_with_grad
from ..errors import UserError, positive
from ..heads import mlp
from ..losses import supcon
from .base import Method, StepOutput


class SupCon(Method):
    supervised = True  # read by the up-front data check: an unlabeled split is refused before training

    def __init__(self, encoder: nn.Module, temperature: float = 0.1, proj_hidden_dim: int = 512, proj_dim: int = 128):
        super().__init__(encoder)
        self.temperature = positive("method.temperature", temperature)
        # the paper's code: Linear-ReLU-Linear, no batch-norm
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim, batch_norm=False)

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        if labels is None or (labels < 0).any():
            raise UserError("method=supcon needs labels, but this training split has unlabeled images")
        z1, z2 = self.projector(self.encoder(torch.cat([x1, x2]))).chunk(2)
        # under DDP every rank scores the global 2N views (view 1 of all ranks, then view 2), as one process would
        y = gather(labels)
        loss = supcon(torch.cat([gather_with_grad(z1), gather_with_grad(z2)]), torch.cat([y, y]), self.temperature)
        return StepOutput(loss, z1, z2)
