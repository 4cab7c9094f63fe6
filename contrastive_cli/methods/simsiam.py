"""SimSiam (Chen & He 2021, arXiv:2011.10566): a projector and a predictor on one encoder, a
stop-gradient on the other branch, the symmetric negative cosine; no negatives, no momentum encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import positive
from ..heads import mlp
from ..losses import negative_cosine
from .base import Method, StepOutput


class SimSiam(Method):
    def __init__(self, encoder: nn.Module, proj_hidden_dim: int = 2048, proj_dim: int = 2048, proj_layers: int = 2,
                 pred_hidden_dim: int = 512, fix_pred_lr: bool = True):
        super().__init__(encoder)
        positive("method.pred_hidden_dim", pred_hidden_dim, integer=True)
        # the projector ends in an affine-free BN (the paper's code); the predictor is a bottleneck
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bn=True)
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim)
        self.fix_pred_lr = fix_pred_lr

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """The predictor keeps the base lr while the rest follows the schedule (the paper's ImageNet
        recipe, Sec. 4.2 and Table 1: a decayed predictor lr trained worse)."""
        return list(self.predictor.parameters()) if self.fix_pred_lr else []

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        z = self.projector(self.encoder(torch.cat([x1, x2])))
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2  # z is detached inside: the stop-gradient
        return StepOutput(loss, z1, z2)
