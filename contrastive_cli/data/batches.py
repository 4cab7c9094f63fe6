"""How the loop takes batches from any source: a shuffled order per (seed, epoch), split between ranks,
served from memory (`take`), through DataLoader workers (lazy files), or from a source that streams
its own batches (`stream`: shards)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError


class _AugmentedBatches(Dataset):
    """Item k is batch k, augmented on the CPU inside a DataLoader worker (augmentation.on_device=false),
    with a generator seeded from (aug_seed, k) so the views do not depend on the worker count."""

    def __init__(self, data: Dataset, batches: list[torch.Tensor], augment, aug_seed: int, start: int = 0):
        self.data, self.batches, self.augment, self.aug_seed, self.start = data, batches, augment, aug_seed, start

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __getitem__(self, k: int):
        k += self.start  # the seed follows the batch's place in the epoch, not in this (resumed) pass
        idx = self.batches[k]
        if hasattr(self.data, "take"):
            x, y = self.data.take(idx)
        else:
            items = [self.data[int(i)] for i in idx]
            x, y = torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])
        with torch.no_grad():
            views = self.augment(x, torch.Generator().manual_seed(self.aug_seed * 1_000_003 + k))
        return (*views, y)


def iterate_batches(
    data: Dataset, batch_size: int, seed: int, epoch: int, workers: int = 0, pin: bool = False,
    shuffle: bool = True, drop_last: bool = True, rank: int = 0, world: int = 1, augment=None, aug_seed: int = 0,
    start: int = 0, resume: torch.Tensor | None = None,
):
    """The batches of one epoch: a source that streams (shards) makes its own, with a `position()` to
    resume from (`resume`); everything else is indexed (`_indexed`)."""
    if hasattr(data, "stream"):
        if augment is not None:
            raise UserError("augmentation.on_device=false: shards are decoded in the DataLoader workers and augmented "
                            "on the device; set augmentation.on_device=true")
        return data.stream(batch_size, seed, epoch, workers, pin, shuffle, drop_last, rank, world, start, resume)
    return _indexed(data, batch_size, seed, epoch, workers, pin, shuffle, drop_last, rank, world, augment, aug_seed,
                    start)


def _indexed(
    data: Dataset, batch_size: int, seed: int, epoch: int, workers: int = 0, pin: bool = False,
    shuffle: bool = True, drop_last: bool = True, rank: int = 0, world: int = 1, augment=None, aug_seed: int = 0,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield (uint8 images, labels) batches of `batch_size` per process. The order depends only on
    (seed, epoch), so a resumed run sees the same batches as a straight one; with `world` processes,
    global batch k is slice k of that order and rank r gets its r-th part (a distributed sampler
    whose union over ranks is exactly the single-process batch of world * batch_size).
    With `augment`, batches are augmented on the CPU in `workers` processes and come as (view1, view2, [crops...,] labels).
    `start`: skip the epoch's first batches (resuming inside an epoch); the rest are as they would have been."""
    n = len(data)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        order = torch.arange(n)
    if world > 1:
        steps = n // (batch_size * world)
        order = order[: steps * batch_size * world].view(steps, world, batch_size)[:, rank].reshape(-1)
    n = len(order)
    if augment is not None:
        stop = n - n % batch_size if drop_last else n
        batches = list(order[:stop].split(batch_size)) if stop else []
        yield from DataLoader(_AugmentedBatches(data, batches, augment, aug_seed, start), batch_size=None,
                              num_workers=workers, pin_memory=pin, persistent_workers=False,
                              generator=_own_generator(seed, epoch, rank))
        return
    if hasattr(data, "take"):  # held in memory
        stop = n - n % batch_size if drop_last else n
        for first in range(start * batch_size, stop, batch_size):
            x, y = data.take(order[first : first + batch_size])
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)
        return
    loader = DataLoader(
        data, batch_size=batch_size, sampler=order[start * batch_size :].tolist(), num_workers=workers,
        pin_memory=pin, drop_last=drop_last, persistent_workers=False, generator=_own_generator(seed, epoch, rank),
    )
    yield from loader


def _own_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """A DataLoader draws its workers' base seed from the global RNG unless given a generator: that
    draw would shift the global stream of a run resumed inside an epoch against a straight one."""
    return torch.Generator().manual_seed(seed * 100_019 + epoch * 1_013 + rank)


def num_batches(data: Dataset, batch_size: int, drop_last: bool = True, world: int = 1) -> int:
    n = len(data)
    return n // (batch_size * world) if drop_last else -(-n // batch_size)


