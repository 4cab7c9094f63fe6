"""The contract between a method and the shared training loop."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError

# A queue of past embeddings (MoCo's keys, NNCLR's support set, SwAV's Sinkhorn queue) holds those of at
# most this fraction of the training images: on digits (1,347 images) MoCo's default 4,096-key queue held
# each image about three times, its own stale keys among its negatives, and k-NN fell below an untrained
# encoder's (0.738 against 0.818); capped, 0.869
QUEUE_FRACTION = 0.25


@dataclass(frozen=True)
class RunShape:
    """What a method's data-dependent settings are derived from, known once the data is loaded."""

    train_images: int
    global_batch: int  # images per optimizer step, over every process


@dataclass
class StepOutput:
    loss: Tensor
    z1: Tensor  # embeddings of view 1 and view 2 (what the loss sees), for the collapse monitor
    z2: Tensor


class Method(nn.Module, abc.ABC):
    """`forward(x)` gives encoder features, `forward(x1, x2, labels)` the training step's loss;
    `on_step_end(progress)` runs after each optimizer step (momentum updates, with progress in [0, 1]).
    A method with `multi_crop = True` also gets a multi-crop augmentation's local crops:
    `training_step(x1, x2, labels, crops)`; the others get exactly the two-view call."""

    min_batch_size = 2
    multi_crop = False

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    @property
    def needs_labels(self) -> bool:
        return bool(getattr(self, "supervised", False))

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size < self.min_batch_size:
            raise UserError(f"trainer.batch_size={batch_size}: {type(self).__name__} needs at least {self.min_batch_size}")

    def check_views(self, num_views: int) -> None:
        """Refuse, before training, crops this method would silently drop."""
        if num_views > 2 and not self.multi_crop:
            raise UserError(f"method {type(self).__name__} uses two views; this augmentation makes {num_views - 2} "
                            "local crops as well (augmentation.local_crops); use a two-view augmentation (simclr, byol, "
                            "grey), augmentation.local_crops=0, or a multi-crop method (dino, swav)")

    def forward(self, x1: Tensor, x2: Tensor | None = None, labels: Tensor | None = None,
                crops: tuple[Tensor, ...] = ()):
        """Features of x1; with x2 as well, the training step (so DDP's forward hooks see it)."""
        if x2 is None:
            return self.encoder(x1)
        if self.multi_crop:
            return self.training_step(x1, x2, labels, tuple(crops))
        return self.training_step(x1, x2, labels)

    @abc.abstractmethod
    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        """The loss of one batch; labels are -1 where unknown and unused by label-free methods."""

    def use_data(self, train, dataset_cfg) -> list[str]:
        """Take what the method reads from the training split beyond its images (the image-text methods'
        captions); returns log lines. Runs before the data checks and before a resumed state is loaded."""
        return []

    def adapt(self, run: RunShape) -> list[str]:
        """Derive the settings whose right value depends on the data or the run's length (a queue's
        size); returns one log line per setting changed. Runs before a resumed state is loaded."""
        return []

    def cap_queue(self, run: RunShape, per_image: int, what: str) -> list[str]:
        """Shrink the `queue` buffer (K x D; `per_image` entries per image and step) to the entries of
        QUEUE_FRACTION of the training images, never below one step's entries. `what` names the queue
        and what its entries are (a log line's words)."""
        size = len(self.queue)
        step = run.global_batch * per_image
        if 0 < size < step:  # it would hold only part of the last batch's own entries
            raise UserError(f"method.queue_size={size}: smaller than one step's entries ({step}: {per_image} per image "
                            f"of a global batch of {run.global_batch}); use method.queue_size>={step}")
        limit = max(step, int(run.train_images * QUEUE_FRACTION) * per_image)
        if size <= limit:
            return []
        self.queue = self.queue[:limit].clone()
        self.queue_ptr.zero_()
        return [f"method.queue_size={size} capped to {limit}: {what}; more than {QUEUE_FRACTION:.0%} of the "
                f"{run.train_images} training images in it puts an image's own stale entries among its comparisons"]

    def before_optimizer_step(self, progress: float) -> None:
        """Runs between backward and the optimizer step, on unscaled gradients, with the fraction of
        training done before this step (gradient clipping, parameters frozen early in training)."""

    def on_step_end(self, progress: float) -> None:
        """Nothing to do for methods without a momentum encoder."""

    @classmethod
    def eval_encoder(cls, encoder: nn.Module, method_cfg) -> nn.Module:
        """The module a checkpoint's `encoder` weights belong to, rebuilt from the config's encoder
        (what cl-eval, cl-embed and cl-export run): the encoder itself, unless the method wraps it."""
        return encoder


def encode_groups(net: Callable[[Tensor], Tensor], views: list[Tensor],
                  head: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
    """`net` on every view, run once per image size (views of one size concatenated, then split back):
    one pass for the global crops, one for the local ones. Then `head`, if given, once over every
    view's features, as the papers' multi-crop wrapper: a batch-norm in the head sees all crops."""
    out: list[Tensor | None] = [None] * len(views)
    sizes = list(dict.fromkeys(v.shape[-2:] for v in views))
    for size in sizes:
        idx = [i for i, v in enumerate(views) if v.shape[-2:] == size]
        parts = net(torch.cat([views[i] for i in idx])).split([len(views[i]) for i in idx])
        for i, part in zip(idx, parts, strict=True):
            out[i] = part
    if head is None:
        return out
    return list(head(torch.cat(out)).split([len(v) for v in views]))


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
