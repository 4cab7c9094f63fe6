"""Build the parts from a composed config in one visible order, then call engine.fit."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoint
from .config import TrainerCfg, build, validate_train
from .data import TensorImages, num_batches
from .engine import CollapseMonitor, Precision, TrainState, fit
from .errors import UserError, check
from .evaluate import extract_features, knn_top1, loss_png
from .optim import build_optimizer, warmup_cosine

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    check(dev.type != "cuda" or torch.cuda.is_available(), f"device={name}: CUDA is not available here (use auto or cpu)")
    return dev


def resolve_precision(t: TrainerCfg, device: torch.device) -> Precision:
    name = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    channels_last = t.channels_last == "true" or (t.channels_last == "auto" and device.type == "cuda")
    return Precision(device, dtype, channels_last)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: DictConfig):
    """Encoder and method from the config; shared by training, resume and evaluation."""
    encoder = build(cfg.encoder, "encoder")
    method = build(cfg.method, "method")(encoder=encoder)
    return encoder, method


def run_training(cfg: DictConfig, run_dir: Path) -> dict:
    t, sched = validate_train(cfg)
    resume = checkpoint.load(t.resume, "trainer.resume") if t.resume else None  # a bad path fails before any work
    device = resolve_device(t.device)
    prec = resolve_precision(t, device)
    seed_everything(t.seed)
    encoder, method = build_model(cfg)
    method.check_batch_size(t.batch_size)
    augment = build(cfg.augmentation, "augmentation")
    splits = build(cfg.dataset.source, "dataset")
    train = splits.train
    if isinstance(train, TensorImages):
        check(train.images.shape[1] == cfg.dataset.channels,
              f"dataset.channels={cfg.dataset.channels}: the images have {train.images.shape[1]}")
    steps = num_batches(train, t.batch_size)
    check(steps > 0, f"trainer.batch_size={t.batch_size}: larger than the training set ({len(train)} images)")

    method.to(device)
    augment.to(device)
    if prec.channels_last:
        method.to(memory_format=torch.channels_last)
    lr = cfg.optimizer.lr * (t.batch_size / 256 if sched.scale_lr else 1.0)
    optimizer = build_optimizer(build(cfg.optimizer, "optimizer"), method, lr, cfg.optimizer.weight_decay)
    factor = warmup_cosine(t.epochs * steps, round(sched.warmup_epochs * steps), sched.final_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler(device.type, enabled=prec.dtype == torch.float16)
    generator = torch.Generator(device=device).manual_seed(t.seed)
    state = TrainState(monitor=CollapseMonitor(t.collapse_ratio, t.collapse_patience))
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if resume is not None:
        state = _restore(resume, method, optimizer, scheduler, scaler, generator, t)
    step_fn = torch.compile(method.training_step) if t.compile else None

    log.info("training %s on %s (%d images, %d steps/epoch) on %s, precision %s; run dir %s",
             cfg.method._target_.rsplit(".", 1)[-1], cfg.dataset.name, len(train), steps, device,
             prec.dtype or "fp32", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    state = fit(method, optimizer, scheduler, scaler, augment, train, epochs=t.epochs, batch_size=t.batch_size,
                seed=t.seed, workers=t.workers, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
                prec=prec, generator=generator, state=state, run_dir=run_dir, config_yaml=config_yaml,
                step_fn=step_fn)
    summary = {"method": cfg.method._target_, "dataset": cfg.dataset.name, "epochs": state.epoch,
               "steps": state.step, "final_loss": state.history[-1]["loss"] if state.history else None,
               "wall_time_s": round(time.perf_counter() - wall, 2),
               "collapse_warning": state.monitor.warned,
               "checkpoint": str(run_dir / "checkpoints" / "last.pt")}
    if state.history:
        loss_png(state.history, run_dir / "loss.png", f"{summary['method'].rsplit('.', 1)[-1]} on {cfg.dataset.name}")
    if t.knn_monitor:
        tr = extract_features(method.encoder, splits.eval_train, cfg.dataset.mean, cfg.dataset.std, device, desc="k-NN train")
        te = extract_features(method.encoder, splits.test, cfg.dataset.mean, cfg.dataset.std, device, desc="k-NN test")
        n_cls = int(max(tr[1].max(), te[1].max())) + 1
        summary["knn_top1"] = round(knn_top1(tr[0], tr[1], te[0], te[1], n_cls), 4)
        log.info("k-NN top-1 (k=200, T=0.1) on the test split: %.4f", summary["knn_top1"])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("checkpoint: %s", summary["checkpoint"])
    return summary


def _restore(ckpt: dict, method, optimizer, scheduler, scaler, generator, t: TrainerCfg) -> TrainState:
    try:
        method.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"trainer.resume={t.resume}: its model does not match this config's method/encoder "
                        "(resume with the same method and encoder as the run that wrote it)") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    checkpoint.set_rng_state(ckpt["rng"], generator)
    if ckpt["epoch"] >= t.epochs:
        log.info("checkpoint already has %d of %d epochs: nothing to train", ckpt["epoch"], t.epochs)
    monitor = CollapseMonitor(t.collapse_ratio, t.collapse_patience)
    return TrainState(epoch=ckpt["epoch"], step=ckpt["step"], history=list(ckpt["history"]), monitor=monitor)
