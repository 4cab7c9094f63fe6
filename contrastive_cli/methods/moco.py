"""MoCo v2 (He et al. 2020, arXiv:1911.05722; Chen et al. 2020, arXiv:2003.04297): a query encoder
trained against keys from a momentum encoder and a queue of past keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import broadcast, gather, rank_and_world
from ..errors import UserError, positive
from ..heads import mlp
from ..losses import info_nce
from ..momentum import check_momentum, cosine_momentum, frozen_copy, split_batch_norm, update_ema
from .base import Method, RunShape, StepOutput, enqueue


class MoCo(Method):
    """`bn_splits > 1`: split batch-norm in both encoders plus a shuffle of the keys' batch, so a key's
    BN statistics come from other samples than its query's (MoCo's single-GPU stand-in for shuffle-BN)."""

    def __init__(self, encoder: nn.Module, temperature: float = 0.2, queue_size: int = 4096,
                 proj_hidden_dim: int = 512, proj_dim: int = 128, momentum_start: float = 0.99,
                 momentum_end: float = 1.0, symmetric: bool = True, bn_splits: int = 8):
        super().__init__(encoder)
        self.temperature = positive("method.temperature", temperature)
        positive("method.queue_size", queue_size, integer=True)
        self.bn_splits = positive("method.bn_splits", bn_splits, integer=True)
        check_momentum(momentum_start, momentum_end)
        self.momentum_start, self.momentum_end, self.symmetric = momentum_start, momentum_end, symmetric
        self.momentum = momentum_start
        if bn_splits > 1:
            split_batch_norm(self.encoder, bn_splits)
        self.projector = mlp(encoder.feature_dim, proj_hidden_dim, proj_dim, batch_norm=False)
        self.key_encoder, self.key_projector = frozen_copy(self.encoder), frozen_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))  # K x D
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.min_batch_size = max(2, bn_splits)

    def adapt(self, run: RunShape) -> list[str]:
        per_image = 2 if self.symmetric else 1
        return self.cap_queue(run, per_image, f"MoCo's queue holds {per_image} key(s) per image and step")

    def check_batch_size(self, batch_size: int) -> None:
        super().check_batch_size(batch_size)
        if batch_size % self.bn_splits:
            raise UserError(f"trainer.batch_size={batch_size}: must be a multiple of method.bn_splits={self.bn_splits}")

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        n = x1.shape[0]
        q = F.normalize(self.projector(self.encoder(torch.cat([x1, x2]))), dim=1)  # 2N x D
        q1, q2 = q[:n], q[n:]
        with torch.no_grad():
            k1, k2 = self._keys(torch.cat([x1, x2])).chunk(2)
        queue = self.queue.clone().detach()  # the enqueue below must not touch what backward reads
        if self.symmetric:
            loss = (info_nce(q1, k2, queue, self.temperature) + info_nce(q2, k1, queue, self.temperature)) / 2
            self._enqueue(gather(torch.cat([k1, k2])))  # every rank enqueues the same global keys
        else:
            loss = info_nce(q1, k2, queue, self.temperature)
            self._enqueue(gather(k2))
        return StepOutput(loss, q1, q2)

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        """Normalized keys of x, computed on a shuffled batch so that a key's batch-norm statistics
        come from other samples than its query's: across ranks under DDP (shuffle-BN), across the
        split-BN chunks on one device. Returned in x's order."""
        rank, world = rank_and_world()
        if world == 1 and self.bn_splits == 1:
            return F.normalize(self.key_projector(self.key_encoder(x)).float(), dim=1)
        x_all = gather(x)  # world*n x ...
        perm = broadcast(torch.randperm(len(x_all), device=x.device))
        mine = perm.view(world, -1)[rank]
        k_mine = F.normalize(self.key_projector(self.key_encoder(x_all[mine])).float(), dim=1)
        k_shuffled = gather(k_mine)
        k_all = torch.empty_like(k_shuffled)
        k_all[perm] = k_shuffled  # undo the shuffle
        return k_all.view(world, len(x), -1)[rank]

    def _enqueue(self, keys: Tensor) -> None:
        enqueue(self.queue, self.queue_ptr, keys)

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        self.momentum = cosine_momentum(progress, self.momentum_start, self.momentum_end)
        update_ema(self.encoder, self.key_encoder, self.momentum)
        update_ema(self.projector, self.key_projector, self.momentum)
