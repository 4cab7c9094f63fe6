"""Triplet loss (Weinberger & Saul 2009; FaceNet, Schroff et al. 2015) made self-supervised: anchor and
positive are the two views of an image, the negative is mined among the views of other images
(`random`, `hard` or FaceNet's `semi_hard`). With `supervised=true`, labels decide positives and
negatives: the positive is a random (hard mining: the farthest) view with the anchor's label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError, positive
from ..heads import mlp
from ..losses import MINING, mine_negatives, pairwise_distance, triplet
from .base import Method, StepOutput, pair_labels


class Triplet(Method):
    def __init__(self, encoder: nn.Module, margin: float = 0.5, mining: str = "semi_hard", normalize: bool = True,
                 proj_hidden_dim: int = 512, proj_dim: int = 128, supervised: bool = False):
        super().__init__(encoder)
        if mining not in MINING:
            raise UserError(f"method.mining={mining}: choose from {', '.join(MINING)}")
        self.margin = positive("method.margin", margin)
        self.mining, self.normalize, self.supervised = mining, normalize, supervised
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim)

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        n = len(x1)
        z = self.projector(self.encoder(torch.cat([x1, x2])))
        e = F.normalize(z, dim=1) if self.normalize else z  # 2N x D: anchors and candidates
        same = pair_labels(labels, self.supervised, n, x1.device).repeat(2, 2)  # 2N x 2N
        itself = torch.eye(2 * n, dtype=torch.bool, device=e.device)
        with torch.no_grad():
            d = pairwise_distance(e.float(), e.float())
            pos_idx = self._positives(d, same & ~itself, n)
            d_ap = d.gather(1, pos_idx[:, None]).squeeze(1)
            neg_idx = mine_negatives(d, d_ap, ~same, self.mining, self.margin)
            has_neg = (~same).any(1)  # supervised: an anchor whose label fills the batch has none
        anchors = has_neg.nonzero().squeeze(1)
        if len(anchors) == 0:
            loss = e.sum() * 0.0
        else:
            # index_select, not e[idx]: the backward of advanced indexing accumulates with parallel
            # atomic adds on the CPU, so two identical runs drifted apart; index_add is ordered
            pick = e.index_select
            loss = triplet(pick(0, anchors), pick(0, pos_idx[anchors]), pick(0, neg_idx[anchors]), self.margin)
        z1, z2 = z.chunk(2)
        return StepOutput(loss, z1, z2)

    def _positives(self, d: Tensor, candidates: Tensor, n: int) -> Tensor:
        if not self.supervised:  # the other view of the same image
            return torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(d.device)
        if self.mining == "hard":
            return d.masked_fill(~candidates, -1.0).argmax(1)
        return torch.rand(d.shape, device=d.device).masked_fill(~candidates, -1.0).argmax(1)
