"""Losses as pure functions on tensors: no state, no modules, testable without a model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent (SimCLR) over the 2N views: the positive of view i is view i+N (and of i+N, i);
    the other 2N-2 views are negatives; the sample itself is masked out.

    z1, z2: N x D projections of the two views (normalized here).
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1).float()  # 2N x D
    sim = z @ z.t() / temperature  # 2N x 2N
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)
