"""NNCLR (Dwibedi et al. 2021, arXiv:2104.14548): the positive of a view is the nearest neighbour of
the other view's embedding in a support set (a queue of past embeddings), contrasted with a
predictor's output over the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import gather, gather_with_grad, rank_and_world
from ..errors import positive
from ..heads import mlp
from ..losses import nearest_neighbour, nnclr
from .base import Method, RunShape, StepOutput, enqueue


class NNCLR(Method):
    def __init__(self, encoder: nn.Module, temperature: float = 0.2, queue_size: int = 16384,
                 proj_hidden_dim: int = 2048, proj_dim: int = 256, proj_layers: int = 3, pred_hidden_dim: int = 4096):
        super().__init__(encoder)
        self.temperature = positive("method.temperature", temperature)
        positive("method.queue_size", queue_size, integer=True)
        positive("method.pred_hidden_dim", pred_hidden_dim, integer=True)
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bn=True)
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim)
        # the support set starts as random unit vectors and fills with view-1 embeddings, oldest out first
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))  # K x D
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def adapt(self, run: RunShape) -> list[str]:
        return self.cap_queue(run, 1, "NNCLR's support set holds one embedding per image and step")

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        n = x1.shape[0]
        z = self.projector(self.encoder(torch.cat([x1, x2])))
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        with torch.no_grad():
            support = self.queue.clone()  # the enqueue below must not touch what backward reads
            nn1, nn2 = nearest_neighbour(z1, support), nearest_neighbour(z2, support)
        offset = rank_and_world()[0] * n
        t = self.temperature
        loss = (nnclr(nn1, gather_with_grad(p2), t, offset) + nnclr(nn2, gather_with_grad(p1), t, offset)) / 2
        self._enqueue(gather(F.normalize(z1.detach().float(), dim=1)))
        return StepOutput(loss, z1, z2)

    def _enqueue(self, keys: Tensor) -> None:
        enqueue(self.queue, self.queue_ptr, keys)
