"""fit(): the one training loop, the only place that calls backward() and step()."""

from __future__ import annotations

import csv
import functools
import logging
import math
import signal
import threading
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
from .data.batches import iterate_batches, num_batches
from .errors import Interrupted, UserError
from .methods.base import Method

log = logging.getLogger(__name__)

# a loss (at least 1) or a weight norm this many times its start: a diverged run, though floats still
# hold it (VICReg under SGD reached a loss of 1e19 and weights of 1e16, finite); healthy runs stay within 10x
EXPLODED = 1e3
METRIC_FIELDS = ("epoch", "step", "loss", "lr", "time", "emb_std", "neg_cos")
# last.pt after every epoch, unless its writing would take over SAVE_SHARE of the training since the last
# one: a large model on short epochs (barlow_twins_imagenet's 1.1 GB, 4-5 s to write and fsync, after each
# 6.5 s digits epoch) writes it every few epochs instead. Its writing time is estimated from its size at
# SAVE_BYTES_PER_S (measured here: 1.1 GB in 4.1-5.4 s), so the choice does not depend on the disk's load
# of the moment; a checkpoint estimated under ALWAYS_SAVE_S is written after every epoch.
SAVE_SHARE, SAVE_BYTES_PER_S, ALWAYS_SAVE_S = 0.1, 200e6, 1.0


def last_due(size: int, since_s: float, final: bool) -> bool:
    """Whether last.pt is written at this epoch's end: `size` bytes of the last one (0: none yet),
    `since_s` seconds of training since it was written, `final`: the run's last epoch (or a numbered or
    best checkpoint is written too, which last.pt must not be older than)."""
    write_s = size / SAVE_BYTES_PER_S
    return final or write_s < ALWAYS_SAVE_S or since_s * SAVE_SHARE >= write_s


def collapse_stats(z1: Tensor, z2: Tensor, labels: Tensor | None = None) -> Tensor:
    """[std of the L2-normalized embeddings per dimension, averaged over dimensions (about 1/sqrt(d)
    when healthy, 0 when collapsed); mean cosine similarity between views of different images]. With
    `labels` (a method that learns from them, as SupCon), different images means images of different
    classes: the images of one class are its positives, meant to be close."""
    a, b = F.normalize(z1.detach().float(), dim=1), F.normalize(z2.detach().float(), dim=1)
    std = torch.cat([a, b]).std(0).mean()
    sim = a @ b.t()
    apart = ~torch.eye(len(a), dtype=torch.bool, device=a.device)
    if labels is not None:
        apart &= labels[:, None] != labels[None, :]
    neg_cos = (sim * apart).sum() / apart.sum().clamp_min(1)
    return torch.stack([std, neg_cos])


@dataclass
class CollapseMonitor:
    """Warns once when, for `patience` epochs in a row, std * sqrt(d) stays under `ratio` (every
    image gets the same embedding) or neg_cos stays over `neg_cos` (different images are no longer
    told apart: seen on a MoCo digits run at neg_cos 0.98, its k-NN below a random encoder's)."""

    ratio: float = 0.1
    patience: int = 2
    neg_cos: float = 0.9
    low_epochs: int = 0
    warned: bool = False  # the std warning (the name older checkpoints store it under)
    high_epochs: int = 0
    warned_cos: bool = False

    def update(self, std: float, dim: int, epoch: int, neg_cos: float = 0.0, quiet: bool = False) -> bool:
        """Each warning once; returns whether either was given."""
        self.low_epochs = self.low_epochs + 1 if std * math.sqrt(dim) < self.ratio else 0
        self.high_epochs = self.high_epochs + 1 if neg_cos > self.neg_cos else 0
        since = epoch - self.patience + 1
        if self.low_epochs >= self.patience and not self.warned:
            self.warned = True
            if not quiet:
                log.warning("embeddings look collapsed since epoch %d (std %.4f < %.2f/sqrt(%d)); likely causes: lr "
                            "too high for the optimizer, EMA momentum too low, or no predictor (BYOL)",
                            since, std, self.ratio, dim)
        if self.high_epochs >= self.patience and not self.warned_cos:
            self.warned_cos = True
            if not quiet:
                log.warning("embeddings of different images look alike since epoch %d (mean cosine %.3f > %.2f "
                            "between views of different images); likely causes: lr too high, temperature too high, "
                            "EMA momentum too low, a queue of stale keys, or no predictor (BYOL)", since, neg_cos,
                            self.neg_cos)
        return self.any

    @property
    def any(self) -> bool:
        return self.warned or self.warned_cos

    def state(self) -> dict:
        return {"low_epochs": self.low_epochs, "warned": self.warned, "high_epochs": self.high_epochs,
                "warned_cos": self.warned_cos}


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
    batch: int = 0  # batches of epoch `epoch` already done (a checkpoint written on a signal)
    partial: dict | None = None  # that epoch's metric sums, view generator state and elapsed time
    trace: list[dict] = field(default_factory=list)  # the synchronised reads inside epochs, for loss.png
    best: dict | None = None  # {"key", "value", "epoch"} of the best held-out score so far (best.pt)
    start_norm: float | None = None  # the trainable weights' norm before the first step (explosion guard)


class StopSignals:
    """While active, SIGTERM and SIGINT set `signum` instead of killing the process, so the loop can
    finish its step, write a checkpoint and leave (clusters send SIGTERM before preemption).
    Repeated signals are ignored: stopping takes at most one step and one save."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._set) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _set(self, signum: int, frame) -> None:
        if not self.signum:
            self.signum = signum
            log.warning("%s received: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


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
    progress: str = "bar"  # bar: a run bar and an epoch bar; log: a log line every progress_every steps; none
    progress_every: int = 100
    # rank 0's held-out score (higher is better), run every monitor_every epochs and after the last;
    # passed in, so this loop knows nothing of how it is computed
    monitor: Callable[[], float] | None = None
    monitor_name: str = "knn_top1"
    monitor_every: int = 1
    on_log: Callable[[dict, int], None] | None = None  # rank 0's scalars for an external logger
    # the encoder's eval-mode features on a few training images: why they are not finite, else None;
    # no checkpoint is written (and none called good) unless they are
    probe: Callable[[], str | None] | None = None
    precision: str = "fp32"  # for the advice a divergence error gives
    lr: float = 0.0


def make_views(batch, augment: nn.Module, generator: torch.Generator, prec: Precision, cpu_views: bool):
    """(view1, view2, labels, crops) on the device: `crops` are the views after the first two (a
    multi-crop augmentation's local crops; empty for two-view augmentations). The views come made
    from the DataLoader workers when `cpu_views`; otherwise the uint8 batch crosses to the device and
    the views are made there."""
    y = batch[-1].to(prec.device, non_blocking=True)
    if cpu_views:
        views = [prec.to_device(v) for v in batch[:-1]]
    else:
        with torch.no_grad():
            views = augment(prec.to_device(batch[0]), generator)
        if prec.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views[0], views[1], y, tuple(views[2:])


def optimizer_step(model: Callable, x1: Tensor, x2: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, prec: Precision, crops: tuple[Tensor, ...] = (),
                   before_step: Callable[[], None] | None = None):
    """Forward under autocast, backward through the scaler, one optimizer step; returns the StepOutput.
    `crops` reach only the methods that read them; `before_step` runs between backward and the step on
    unscaled gradients (clipping, freezing parameters)."""
    with prec.autocast:
        out = model(x1, x2, y, crops) if crops else model(x1, x2, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    if before_step is not None:
        scaler.unscale_(optimizer)
        before_step()
    scaler.step(optimizer)
    scaler.update()
    return out


def fit(
    method: Method, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
    augment: nn.Module, data, loop: Loop, prec: Precision, state: TrainState, run_dir: Path,
    config_yaml: str, model: Callable | None = None, record_extra: dict | None = None,
) -> TrainState:
    """Train from `state.epoch` (batch `state.batch`) to `loop.epochs`; rank 0 writes metrics.csv and
    checkpoints after every epoch, and one more when SIGTERM / SIGINT arrives, after the current
    step, before raising Interrupted. `model` is what runs the step (the method, or it wrapped in
    DDP / torch.compile); `record_extra`: more to store in every checkpoint (the run's overrides)."""
    model = model or method
    main = loop.rank == 0
    steps_per_epoch = num_batches(data, loop.batch_size, world=loop.world)
    total = loop.epochs * steps_per_epoch
    ckpt_dir = run_dir / "checkpoints"
    generator = torch.Generator(device=prec.device)
    elapsed = state.partial["elapsed"] if state.partial else state.history[-1]["time"] if state.history else 0.0
    start = time.perf_counter() - elapsed
    last_size, last_saved = 0, time.perf_counter()
    cpu_views = not getattr(augment, "on_device", True)
    where = {"device": prec.device.type, "processes": loop.world, "steps_per_epoch": steps_per_epoch,
             "images": len(data)}
    if state.partial:
        _check_same_place(state.partial, where)
    method.train()

    if state.start_norm is None:
        state.start_norm = weight_norm(method)

    def payload(**extra) -> dict:
        bad = checkpoint.non_finite(method.state_dict())
        why = f"weights became non-finite ({bad})" if bad else None
        norm = weight_norm(method) if why is None else 0.0
        if state.start_norm and norm > EXPLODED * state.start_norm:
            size = f"{norm:.3g}, {norm / state.start_norm:.3g}x" if math.isfinite(norm) else "beyond float32's range,"
            why = f"weights exploded (norm {size} the start's {state.start_norm:.3g})"
        why = why or (loop.probe() if loop.probe is not None else None)
        # buffers (batch-norm statistics) differ between ranks: decide together, or one rank leaves alone
        if distributed.mean(torch.tensor([float(why is not None)], device=prec.device)).item() > 0:
            raise UserError(f"{why or 'the weights of another rank diverged'} by epoch {state.epoch}, step "
                            f"{state.step}; {_last_good(ckpt_dir)} ({_advice(loop)})")
        return {
            "config": config_yaml, "epoch": state.epoch, "step": state.step, "history": state.history,
            "model": method.state_dict(), "encoder": method.encoder.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": checkpoint.rng_state(), "monitor": state.monitor.state(),
            "trace": state.trace, "best": state.best, "start_norm": state.start_norm,
            **(record_extra or {}), **extra,
        }

    progress = Progress(loop, state, total, main, elapsed)
    with StopSignals() as stop:
        for epoch in range(state.epoch, loop.epochs):
            # the views depend only on (seed, epoch, rank) and the batch's place: a resumed run draws the same
            generator.manual_seed(loop.seed * 1_000_003 + epoch * 1_009 + loop.rank)
            sums = torch.zeros(3, device=prec.device)  # loss, emb_std, neg_cos: read once per epoch
            first = state.batch if epoch == state.epoch else 0
            if first:  # this rank's view generator and metric sums, as they were at the signal
                generator.set_state(state.partial["generator"][loop.rank].clone())  # set_state reads from the
                # start of the storage, not from a row's offset
                sums = state.partial["sums"][loop.rank].to(prec.device)
            streamed = state.partial.get("stream") if first else None  # shards: where each worker had got to
            batches = iterate_batches(data, loop.batch_size, loop.seed, epoch, loop.workers,
                                      pin=prec.device.type == "cuda", rank=loop.rank, world=loop.world,
                                      augment=augment if cpu_views else None,
                                      aug_seed=loop.seed * 1_009 + epoch * 101 + loop.rank, start=first,
                                      resume=streamed[loop.rank] if streamed is not None else None)
            bar = progress.epoch_bar(batches, epoch, first, steps_per_epoch)
            for i, batch in enumerate(bar, start=first):
                x1, x2, y, crops = make_views(batch, augment, generator, prec, cpu_views)
                out = optimizer_step(model, x1, x2, y, optimizer, scaler, prec, crops,
                                     functools.partial(method.before_optimizer_step, state.step / total))
                scheduler.step()
                state.step += 1
                method.on_step_end(state.step / total)
                stats = collapse_stats(out.z1, out.z2, y if method.needs_labels and y.ndim == 1 else None)
                now = torch.cat([out.loss.detach().float().view(1), stats])
                sums += now
                stopping = stop.signum if loop.world == 1 else 0
                # the only host syncs inside the epoch; also its first step, so the loss shows at once (not
                # at a resumed epoch's first batch: its reads stay those of an uninterrupted run)
                if state.step % loop.log_every == 0 or i == 0:
                    # averaged over ranks, so a non-finite loss or a signal stops every rank at the same step
                    loss, std, neg_cos, signum = distributed.mean(
                        torch.cat([now, now.new_tensor([stop.signum])])).tolist()
                    stopping = stopping or (stop.signum or signal.SIGTERM if signum else 0)
                    _check_loss(loss, state, epoch, loop, ckpt_dir)
                    point = {"step": state.step, "epoch": round(epoch + (i + 1) / steps_per_epoch, 4), "loss": loss,
                             "lr": optimizer.param_groups[0]["lr"], "emb_std": std, "neg_cos": neg_cos}
                    state.trace.append(point)
                    progress.step(bar, point, time.perf_counter() - start)
                if stopping and i + 1 < steps_per_epoch:
                    bar.close()
                    progress.close()
                    # every rank's own: rank r draws its views from its own generator
                    gen = distributed.gather(generator.get_state().to(prec.device).view(1, -1)).cpu()
                    partial = {"sums": distributed.gather(sums.view(1, -1)).cpu(), "generator": gen,
                               "elapsed": time.perf_counter() - start, **where}
                    if hasattr(batches, "position"):  # a stream of shards: each rank's workers' reading positions
                        partial["stream"] = distributed.gather(batches.position()[None].to(prec.device)).cpu()
                    _stop(stopping, loop, payload(batch=i + 1, partial=partial), ckpt_dir, state, epoch, i + 1,
                          steps_per_epoch)
            bar.close()
            state.batch, state.partial = 0, None
            epoch_loss, emb_std, neg_cos, signum = distributed.mean(torch.cat(
                [sums / max(1, steps_per_epoch), sums.new_tensor([stop.signum])])).tolist()
            _check_loss(epoch_loss, state, epoch, loop, ckpt_dir)
            state.epoch = epoch + 1
            row = {"epoch": state.epoch, "step": state.step, "loss": epoch_loss,
                   "lr": optimizer.param_groups[0]["lr"], "time": round(time.perf_counter() - start, 3),
                   "emb_std": emb_std, "neg_cos": neg_cos}
            improved = False
            if loop.monitor is not None:
                row[loop.monitor_name] = None
                if main and (state.epoch % loop.monitor_every == 0 or state.epoch == loop.epochs):
                    began = time.perf_counter()
                    score = row[loop.monitor_name] = float(loop.monitor())
                    start += time.perf_counter() - began  # held-out scoring is not training time
                    improved = state.best is None or score > state.best["value"]
                    if improved:
                        state.best = {"key": loop.monitor_name, "value": score, "epoch": state.epoch}
            state.history.append(row)
            # `out` is this epoch's last step: a resumed epoch has one left (_check_same_place)
            state.monitor.update(emb_std, out.z1.shape[1], state.epoch, neg_cos, quiet=not main)
            record = payload(batch=0)
            if main:
                progress.epoch_end(row, loop.monitor_name)
                write_metrics(state.history, run_dir / "metrics.csv")
                write_metrics(state.trace, run_dir / "steps.csv")
                numbered = state.epoch % loop.checkpoint_every == 0 or state.epoch == loop.epochs
                names = [ckpt_dir / "last.pt"] if last_due(last_size, time.perf_counter() - last_saved,
                                                           numbered or improved) else []
                names += [ckpt_dir / "best.pt"] * improved + [ckpt_dir / f"epoch_{state.epoch:04d}.pt"] * numbered
                if names:  # one record under several names is written once (hard links)
                    checkpoint.save_atomic(record, *names)
                    if names[0].name == "last.pt":
                        last_size, last_saved = names[0].stat().st_size, time.perf_counter()
            # under DDP only the all-reduced flag counts: a signal that reached one rank after the
            # all-reduce must not send that rank away alone
            stop_now = signum if loop.world > 1 else stop.signum
            if stop_now and state.epoch < loop.epochs:
                progress.close()
                _stop(stop.signum or signal.SIGTERM, loop, None, ckpt_dir, state, state.epoch, 0, steps_per_epoch)
    progress.close()
    return state


class Progress:
    """What a user watching the run sees (rank 0 only). `bar`: one bar over the run's epochs with
    its ETA and, under it, the epoch's bar with the loss from its first step; `log`: no carriage
    returns (output that is not a terminal), a log line every `progress_every` steps; `none`: the
    per-epoch log lines only. The per-epoch lines and the external logger are there in every mode."""

    def __init__(self, loop: Loop, state: TrainState, total: int, main: bool, elapsed0: float):
        self.loop, self.total, self.main, self.elapsed0 = loop, total, main, elapsed0
        self.bars = main and loop.progress == "bar"
        self.first_step, self.next_line = state.step, state.step + loop.progress_every
        self.run_bar = tqdm(total=loop.epochs, initial=state.epoch, desc="run", unit="epoch", position=0,
                            dynamic_ncols=True, disable=not self.bars)

    def epoch_bar(self, batches, epoch: int, first: int, steps: int):
        return tqdm(batches, total=steps, initial=first, desc=f"epoch {epoch + 1}/{self.loop.epochs}", position=1,
                    leave=False, dynamic_ncols=True, disable=not self.bars)

    def step(self, bar, point: dict, elapsed: float) -> None:
        if not self.main:
            return
        bar.set_postfix(step=point["step"], loss=f"{point['loss']:.4f}", lr=f"{point['lr']:.4g}",
                        std=f"{point['emb_std']:.3f}", neg_cos=f"{point['neg_cos']:.2f}")
        if self.loop.on_log is not None:
            self.loop.on_log({k: point[k] for k in ("loss", "lr", "emb_std", "neg_cos")}, point["step"])
        step = point["step"]
        if self.loop.progress == "log" and (step >= self.next_line or step == self.first_step + 1):
            self.next_line = step + self.loop.progress_every
            done = step - self.first_step
            eta = (elapsed - self.elapsed0) / max(1, done) * (self.total - step)
            log.info("step %d/%d (%.0f%%, epoch %.2f)  loss %.4f  lr %.4g  emb_std %.4f  neg_cos %.3f  eta %s", step,
                     self.total, 100 * step / self.total, point["epoch"], point["loss"], point["lr"], point["emb_std"],
                     point["neg_cos"], _clock(eta))

    def epoch_end(self, row: dict, monitor_name: str) -> None:
        score = row.get(monitor_name)
        loop = self.loop
        log.info("epoch %d/%d  step %d  loss %.4f  lr %.4g  emb_std %.4f  neg_cos %.3f  %.1fs%s", row["epoch"],
                 loop.epochs, row["step"], row["loss"], row["lr"], row["emb_std"], row["neg_cos"], row["time"],
                 f"  {monitor_name} {score:.4f}" if score is not None else "")
        self.run_bar.update(1)
        self.run_bar.set_postfix(loss=f"{row['loss']:.4f}", **({monitor_name: f"{score:.4f}"} if score is not None else {}))
        if loop.on_log is not None:
            self.loop.on_log({"epoch_loss": row["loss"], monitor_name: score}, row["step"])

    def close(self) -> None:
        self.run_bar.close()


def _clock(seconds: float) -> str:
    m, s = divmod(int(max(0.0, seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def _stop(signum: int, loop: Loop, record: dict | None, ckpt_dir: Path, state: TrainState, epoch: int,
          batch: int, steps_per_epoch: int) -> None:
    """Write the checkpoint of a signal (rank 0), then leave the loop with Interrupted; every rank
    waits for the save, so torchrun sees no rank leave before it is written."""
    last = ckpt_dir / "last.pt"
    if loop.rank == 0 and record is not None:
        checkpoint.save_atomic(record, last)
    distributed.barrier()
    where = f"epoch {epoch + 1}, batch {batch} of {steps_per_epoch}" if batch else f"the end of epoch {epoch}"
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at {where} (step {state.step}); "
                              f"saved {last}; continue with trainer.resume={ckpt_dir.parent}")


def _check_same_place(partial: dict, now: dict) -> None:
    """A checkpoint written inside an epoch resumes only where the rest of that epoch is the same:
    the same device type (the view generator's state is per device) and the same data."""
    for key, value in now.items():
        if partial.get(key, value) != value:
            same = {"device": "trainer.device type", "processes": "trainer.devices"}.get(key, "data")
            raise UserError(f"trainer.resume: this checkpoint was written inside an epoch with {key}="
                            f"{partial[key]}, this run has {key}={value}; resume it with the same {same}, or "
                            "from an epoch's checkpoint (checkpoints/epoch_NNNN.pt)")


def _last_good(ckpt_dir: Path) -> str:
    last = ckpt_dir / "last.pt"
    return f"last good checkpoint: {last}" if last.exists() else "no checkpoint was written"


def _check_loss(loss: float, state: TrainState, epoch: int, loop: Loop, ckpt_dir: Path) -> None:
    """A non-finite loss, or one EXPLODED times its first logged value (at least 1): the run has diverged,
    though a float may still hold it. Healthy losses fall, or rise a few-fold at most (warm-up)."""
    first = abs(state.trace[0]["loss"]) if state.trace else abs(loss)
    if not math.isfinite(loss):
        why = f"loss became {loss}"
    elif abs(loss) > EXPLODED * max(first, 1.0):
        why = f"loss exploded to {loss:.3g} (first {first:.3g})"
    else:
        return
    raise UserError(f"{why} at epoch {epoch + 1}, step {state.step}; {_last_good(ckpt_dir)} ({_advice(loop)})")


def _advice(loop: Loop) -> str:
    """What to change: a lower lr always helps a diverging run; fp32 only helps fp16's narrow range
    (bf16 has fp32's range, and VICReg under SGD diverged in fp32 too)."""
    lower = (f"try a lower optimizer.lr than this run's {loop.lr:.3g}, e.g. {loop.lr / 10:.3g}" if loop.lr
             else "try a lower optimizer.lr")
    return lower + (" or trainer.precision=bf16 / fp32" if loop.precision == "fp16" else "")


def weight_norm(method: nn.Module) -> float:
    """The L2 norm of every trainable parameter together."""
    with torch.no_grad():
        sq = [p.detach().float().pow(2).sum() for p in method.parameters() if p.requires_grad]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def write_metrics(rows: list[dict], path: Path) -> None:
    """Rows as CSV; the columns are every key any row has (a resumed run's older rows may lack a newer
    column), in order of first appearance."""
    names = list(dict.fromkeys(k for r in rows for k in r)) or list(METRIC_FIELDS)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names, restval="")
        w.writeheader()
        w.writerows(rows)
