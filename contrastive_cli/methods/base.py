"""The contract between a method and the shared training loop."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError


@dataclass
class StepOutput:
    loss: Tensor
    z1: Tensor  # embeddings of view 1 and view 2 (what the loss sees), for the collapse monitor
    z2: Tensor


class Method(nn.Module, abc.ABC):
    """`forward(x)` gives encoder features, `forward(x1, x2, labels)` the training step's loss;
    `on_step_end(progress)` runs after each optimizer step (momentum updates, with progress in [0, 1])."""

    min_batch_size = 2

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    @property
    def needs_labels(self) -> bool:
        return bool(getattr(self, "supervised", False))

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size < self.min_batch_size:
            raise UserError(f"trainer.batch_size={batch_size}: {type(self).__name__} needs at least {self.min_batch_size}")

    def forward(self, x1: Tensor, x2: Tensor | None = None, labels: Tensor | None = None):
        """Features of x1; with x2 as well, the training step (so DDP's forward hooks see it)."""
        if x2 is None:
            return self.encoder(x1)
        return self.training_step(x1, x2, labels)

    @abc.abstractmethod
    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        """The loss of one batch; labels are -1 where unknown and unused by label-free methods."""

    def on_step_end(self, progress: float) -> None:
        """Nothing to do for methods without a momentum encoder."""


def pair_labels(labels: Tensor, supervised: bool, n: int, device: torch.device) -> Tensor:
    """N x N, true where (view 1 of i, view 2 of j) is a positive pair: the same image, or with
    `supervised` the same label."""
    if not supervised:
        return torch.eye(n, dtype=torch.bool, device=device)
    if (labels < 0).any():
        raise UserError("method.supervised=true needs labels, but this training split has unlabeled images")
    return labels[:, None] == labels[None, :]


@torch.no_grad()
def enqueue(queue: Tensor, ptr: Tensor, keys: Tensor) -> None:
    """Write keys into a ring buffer (K x D) at the pointer, wrapping around its end, and move the
    pointer: MoCo's queue of keys, NNCLR's support set."""
    size = queue.shape[0]
    keys = keys[-size:]
    idx = (ptr + torch.arange(len(keys), device=keys.device)) % size
    queue[idx] = keys.to(queue.dtype)
    ptr.copy_((ptr + len(keys)) % size)
