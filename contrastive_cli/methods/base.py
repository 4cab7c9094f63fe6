"""The contract between a method and the shared training loop."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class StepOutput:
    loss: Tensor
    z1: Tensor  # embeddings of view 1 and view 2 (what the loss sees), for the collapse monitor
    z2: Tensor


class Method(nn.Module, abc.ABC):
    """`forward(x)` gives encoder features; `training_step` gives the loss of a batch of two views;
    `on_step_end(progress)` runs after each optimizer step (momentum updates, with progress in [0, 1])."""

    min_batch_size = 2

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    @abc.abstractmethod
    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        """The loss of one batch; labels are -1 where unknown and unused by label-free methods."""

    def on_step_end(self, progress: float) -> None:
        """Nothing to do for methods without a momentum encoder."""
