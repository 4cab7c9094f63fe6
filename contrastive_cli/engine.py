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
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .data import iterate_batches, num_batches
from .errors import UserError
from .methods.base import Method

log = logging.getLogger(__name__)

METRIC_FIELDS = ("epoch", "step", "loss", "lr", "time")


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


def fit(
    method: Method, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
    augment: nn.Module, data, *, epochs: int, batch_size: int, seed: int, workers: int, log_every: int,
    checkpoint_every: int, prec: Precision, generator: torch.Generator, state: TrainState,
    run_dir: Path, config_yaml: str, step_fn: Callable | None = None,
) -> TrainState:
    """Train from `state.epoch` to `epochs`, writing metrics.csv and checkpoints after every epoch."""
    step_fn = step_fn or method.training_step
    steps_per_epoch = num_batches(data, batch_size)
    total = epochs * steps_per_epoch
    ckpt_dir = run_dir / "checkpoints"
    start = time.perf_counter() - (state.history[-1]["time"] if state.history else 0.0)
    method.train()
    for epoch in range(state.epoch, epochs):
        loss_sum = torch.zeros((), device=prec.device)
        bar = tqdm(iterate_batches(data, batch_size, seed, epoch, workers, pin=prec.device.type == "cuda"),
                   total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        for x, y in bar:
            x, y = prec.to_device(x), y.to(prec.device, non_blocking=True)
            with torch.no_grad():
                x1, x2 = augment(x, generator)
            if prec.channels_last:
                x1, x2 = (v.contiguous(memory_format=torch.channels_last) for v in (x1, x2))
            with prec.autocast:
                out = step_fn(x1, x2, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state.step += 1
            method.on_step_end(state.step / total)
            loss_sum += out.loss.detach().float()
            if state.step % log_every == 0:  # the only host sync inside the epoch
                loss = out.loss.item()
                _check_finite(loss, epoch, state.step, ckpt_dir)
                bar.set_postfix(step=state.step, loss=f"{loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
        epoch_loss = (loss_sum / max(1, steps_per_epoch)).item()
        _check_finite(epoch_loss, epoch, state.step, ckpt_dir)
        state.epoch = epoch + 1
        row = {"epoch": state.epoch, "step": state.step, "loss": epoch_loss,
               "lr": optimizer.param_groups[0]["lr"], "time": round(time.perf_counter() - start, 3)}
        state.history.append(row)
        bar.close()
        log.info("epoch %d/%d  step %d  loss %.4f  lr %.4g  %.1fs", state.epoch, epochs, state.step,
                 epoch_loss, row["lr"], row["time"])
        write_metrics(state.history, run_dir / "metrics.csv")
        payload = {
            "config": config_yaml, "epoch": state.epoch, "step": state.step, "history": state.history,
            "model": method.state_dict(), "encoder": method.encoder.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": checkpoint.rng_state(generator),
        }
        checkpoint.save_atomic(payload, ckpt_dir / "last.pt")
        if state.epoch % checkpoint_every == 0 or state.epoch == epochs:
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
