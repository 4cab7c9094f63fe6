"""fit(): the one training loop, the only place that calls backward() and step()."""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint, distributed
from .data import iterate_batches, num_batches
from .errors import UserError
from .methods.base import Method

log = logging.getLogger(__name__)

METRIC_FIELDS = ("epoch", "step", "loss", "lr", "time", "emb_std", "neg_cos")


def collapse_stats(z1: Tensor, z2: Tensor) -> Tensor:
    """[std of the L2-normalized embeddings per dimension, averaged over dimensions (about 1/sqrt(d)
    when healthy, 0 when collapsed); mean cosine similarity between views of different images]."""
    a, b = F.normalize(z1.detach().float(), dim=1), F.normalize(z2.detach().float(), dim=1)
    std = torch.cat([a, b]).std(0).mean()
    sim = a @ b.t()
    n = len(a)
    neg_cos = (sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1))
    return torch.stack([std, neg_cos])


@dataclass
class CollapseMonitor:
    """Warns once when std * sqrt(d) stays under `ratio` for `patience` epochs in a row."""

    ratio: float = 0.1
    patience: int = 2
    low_epochs: int = 0
    warned: bool = False

    def update(self, std: float, dim: int, epoch: int) -> bool:
        self.low_epochs = self.low_epochs + 1 if std * math.sqrt(dim) < self.ratio else 0
        if self.low_epochs >= self.patience and not self.warned:
            self.warned = True
            log.warning(
                "embeddings look collapsed since epoch %d (std %.4f < %.2f/sqrt(%d)); likely causes: lr too high "
                "for the optimizer, EMA momentum too low, or no predictor (BYOL)", epoch - self.patience + 1, std,
                self.ratio, dim)
        return self.warned


@dataclass
class Precision:
    """How the step runs on its device: autocast dtype, scaler, memory format, non-blocking copies."""

    device: torch.device
    dtype: torch.dtype | None  # None: fp32, no autocast
    channels_last: bool

    @property
    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0
    history: list[dict] = field(default_factory=list)
    monitor: CollapseMonitor = field(default_factory=CollapseMonitor)


@dataclass
class Loop:
    """What the loop needs to know besides the parts: sizes, seeds, cadence, and this process's rank."""

    epochs: int
    batch_size: int  # per process
    seed: int = 0
    workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 10
    rank: int = 0
    world: int = 1


def make_views(batch, augment: nn.Module, generator: torch.Generator, prec: Precision, cpu_views: bool):
    """(view1, view2, labels) on the device. The views come made from the DataLoader workers when
    `cpu_views`; otherwise the uint8 batch crosses to the device and both views are made there."""
    y = batch[-1].to(prec.device, non_blocking=True)
    if cpu_views:
        return prec.to_device(batch[0]), prec.to_device(batch[1]), y
    with torch.no_grad():
        x1, x2 = augment(prec.to_device(batch[0]), generator)
    if prec.channels_last:
        x1, x2 = (v.contiguous(memory_format=torch.channels_last) for v in (x1, x2))
    return x1, x2, y


def optimizer_step(model: Callable, x1: Tensor, x2: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, prec: Precision):
    """Forward under autocast, backward through the scaler, one optimizer step; returns the StepOutput."""
    with prec.autocast:
        out = model(x1, x2, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return out


def fit(
    method: Method, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
    augment: nn.Module, data, loop: Loop, prec: Precision, state: TrainState, run_dir: Path,
    config_yaml: str, model: Callable | None = None,
) -> TrainState:
    """Train from `state.epoch` to `loop.epochs`; rank 0 writes metrics.csv and checkpoints after
    every epoch. `model` is what runs the step (the method, or it wrapped in DDP / torch.compile)."""
    model = model or method
    main = loop.rank == 0
    steps_per_epoch = num_batches(data, loop.batch_size, world=loop.world)
    total = loop.epochs * steps_per_epoch
    ckpt_dir = run_dir / "checkpoints"
    generator = torch.Generator(device=prec.device)
    start = time.perf_counter() - (state.history[-1]["time"] if state.history else 0.0)
    method.train()
    for epoch in range(state.epoch, loop.epochs):
        # the views depend only on (seed, epoch, rank): a resumed run draws the same ones
        generator.manual_seed(loop.seed * 1_000_003 + epoch * 1_009 + loop.rank)
        sums = torch.zeros(3, device=prec.device)  # loss, emb_std, neg_cos: read once per epoch
        cpu_views = not getattr(augment, "on_device", True)
        batches = iterate_batches(data, loop.batch_size, loop.seed, epoch, loop.workers,
                                  pin=prec.device.type == "cuda", rank=loop.rank, world=loop.world,
                                  augment=augment if cpu_views else None,
                                  aug_seed=loop.seed * 1_009 + epoch * 101 + loop.rank)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{loop.epochs}", leave=False,
                   dynamic_ncols=True, disable=not main)
        for batch in bar:
            x1, x2, y = make_views(batch, augment, generator, prec, cpu_views)
            out = optimizer_step(model, x1, x2, y, optimizer, scaler, prec)
            scheduler.step()
            state.step += 1
            method.on_step_end(state.step / total)
            now = torch.cat([out.loss.detach().float().view(1), collapse_stats(out.z1, out.z2)])
            sums += now
            if state.step % loop.log_every == 0:  # the only host sync inside the epoch
                # averaged over ranks, so a non-finite loss stops every rank at the same step
                loss, std, neg_cos = distributed.mean(now).tolist()
                _check_finite(loss, epoch, state.step, ckpt_dir)
                bar.set_postfix(step=state.step, loss=f"{loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}",
                                std=f"{std:.3f}", neg_cos=f"{neg_cos:.2f}")
        bar.close()
        epoch_loss, emb_std, neg_cos = distributed.mean(sums / max(1, steps_per_epoch)).tolist()
        _check_finite(epoch_loss, epoch, state.step, ckpt_dir)
        state.epoch = epoch + 1
        row = {"epoch": state.epoch, "step": state.step, "loss": epoch_loss,
               "lr": optimizer.param_groups[0]["lr"], "time": round(time.perf_counter() - start, 3),
               "emb_std": emb_std, "neg_cos": neg_cos}
        state.history.append(row)
        if not main:
            continue
        log.info("epoch %d/%d  step %d  loss %.4f  lr %.4g  emb_std %.4f  neg_cos %.3f  %.1fs", state.epoch,
                 loop.epochs, state.step, epoch_loss, row["lr"], emb_std, neg_cos, row["time"])
        state.monitor.update(emb_std, out.z1.shape[1], state.epoch)
        write_metrics(state.history, run_dir / "metrics.csv")
        payload = {
            "config": config_yaml, "epoch": state.epoch, "step": state.step, "history": state.history,
            "model": method.state_dict(), "encoder": method.encoder.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": checkpoint.rng_state(),
        }
        checkpoint.save_atomic(payload, ckpt_dir / "last.pt")
        if state.epoch % loop.checkpoint_every == 0 or state.epoch == loop.epochs:
            checkpoint.save_atomic(payload, ckpt_dir / f"epoch_{state.epoch:04d}.pt")
    return state


def _check_finite(loss: float, epoch: int, step: int, ckpt_dir: Path) -> None:
    if not math.isfinite(loss):
        last = ckpt_dir / "last.pt"
        kept = f"; last good checkpoint: {last}" if last.exists() else ""
        raise UserError(f"loss became {loss} at epoch {epoch + 1}, step {step} (try a lower optimizer.lr "
                        f"or trainer.precision=fp32){kept}")


def write_metrics(history: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]) if history else METRIC_FIELDS)
        w.writeheader()
        w.writerows(history)
