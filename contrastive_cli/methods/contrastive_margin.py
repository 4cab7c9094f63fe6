"""The margin contrastive loss on pairs (Hadsell, Chopra & LeCun 2006) made self-supervised: the two
views of an image are a positive pair, views of different images negative pairs. With
`supervised=true` pairs with equal labels are positives instead."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import positive
from ..heads import mlp
from ..losses import contrastive_margin
from .base import Method, StepOutput, pair_labels


class ContrastiveMargin(Method):
    def __init__(self, encoder: nn.Module, margin: float = 1.4, normalize: bool = True,
                 proj_hidden_dim: int = 512, proj_dim: int = 128, supervised: bool = False):
        super().__init__(encoder)
        self.margin = positive("method.margin", margin)
        self.normalize, self.supervised = normalize, supervised
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim)

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        z1, z2 = self.projector(self.encoder(torch.cat([x1, x2]))).chunk(2)
        e1, e2 = (F.normalize(z1, dim=1), F.normalize(z2, dim=1)) if self.normalize else (z1, z2)
        same = pair_labels(labels, self.supervised, len(x1), x1.device)  # N x N, true on positives
        return StepOutput(contrastive_margin(e1, e2, same, self.margin), z1, z2)
