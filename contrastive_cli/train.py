"""Build the parts from a composed config in one visible order, then call engine.fit."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import checkpoint, distributed
from .augment import MultiCrop
from .config import (
    TrainerCfg,
    build,
    resolve_resume,
    run_settings,
    stand_in_method,
    typed,
    validate_train,
)
from .data.batches import num_batches
from .engine import CollapseMonitor, Loop, Precision, TrainState, fit
from .errors import Interrupted, UserError, check
from .evaluate import knn_top1, loss_png
from .features import extract_features
from .methods.base import Method, RunShape
from .momentum import SplitBatchNorm2d
from .optim import build_optimizer, lr_factors, restarted, warmup_cosine
from .parts import build_model, resolve_device, unlabeled_message
from .zeroshot import held_out_retrieval, retrieval_monitor, zeroshot_monitor

log = logging.getLogger(__name__)


_checked_data: dict[str, object] = {}


def runtime_check(cfg: DictConfig) -> None:
    """What a job of a sweep can be checked for before any job trains: the device, the data
    (loaded once per dataset setting) and the batch size against it."""
    t = typed("trainer", cfg.trainer, TrainerCfg)
    device = resolve_device(t.device)
    key = OmegaConf.to_yaml(cfg.dataset, resolve=True)
    if key not in _checked_data:
        _checked_data[key] = build(cfg.dataset.source, "dataset")
    splits = _checked_data[key]
    check_data(cfg, t, splits, t.devices, stand_in_method(cfg),
               workers=stream_workers(t.workers, splits.train, device, t.devices))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (x86 AVX512-BF16 or AMX-BF16), as torch's
    cpuinfo reports it. Elsewhere bf16 autocast is emulated (slower than fp32) or unmeasured (ARM)."""
    caps = getattr(torch.cpu, "get_capabilities", None)  # newer torch; older releases have the private probes
    if caps is not None:
        found = caps()
        return bool(found.get("avx512_bf16") or found.get("amx_bf16"))
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(t: TrainerCfg, device: torch.device) -> Precision:
    # auto: bf16 on CUDA, and on CPUs with native bf16, where it trained 1.7-1.8x faster at no
    # measured cost in k-NN or linear accuracy (docs/benchmarks.md, "bf16 against fp32")
    auto = "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"
    name = t.precision if t.precision != "auto" else auto
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    # auto: on, for every device: all encoders here are conv nets, and even on the CPU (oneDNN) the
    # small_cnn step ran 1.46x faster in channels_last (docs/benchmarks.md)
    channels_last = t.channels_last in ("true", "auto")
    return Precision(device, dtype, channels_last)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_training(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None,
                 resumed: tuple | None = None) -> dict | None:
    """Train as the config says; under torchrun, as one rank of the job. Returns rank 0's summary.
    With trainer.resume, the checkpoint's own config is used (`config.resolve_resume`; `overrides`
    are the command line's, None compares all of `cfg` with it; `resumed`: its result, if the
    caller has it already)."""
    resume = resume_path = None
    if cfg.trainer.get("resume"):  # a bad path or a changed setting fails before any work
        cfg, resume_path, resume = resumed or resolve_resume(cfg, overrides)
        log.info("resuming from %s (epoch %d, step %d)", resume_path, resume["epoch"], resume["step"])
    t, sched = validate_train(cfg)
    device = resolve_device(t.device)
    rank, world, local = distributed.setup(device.type)
    if rank == 0:
        checkpoint.remove_orphans(run_dir / "checkpoints")
        if resume_path is not None:
            checkpoint.remove_orphans(resume_path.parent)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    prec = resolve_precision(t, device)
    seed_everything(t.seed)
    _, method = build_model(cfg)
    method.check_batch_size(t.batch_size)
    augment = build(cfg.augmentation, "augmentation")
    method.check_views(getattr(augment, "num_views", 2))
    if method.multi_crop and not isinstance(augment, MultiCrop) and rank == 0:  # method=dino augmentation=simclr
        log.warning("%s with a two-view augmentation: no multi-crop (its YAML picks augmentation=multicrop, which "
                    "adds local crops where they are at least 16 px); training on the two views alone",
                    type(method).__name__)
    splits = build(cfg.dataset.source, "dataset")
    train = splits.train
    for line in method.use_data(train, cfg.dataset):
        if rank == 0:
            log.info(line)
    workers = stream_workers(t.workers, train, device, world, say=rank == 0)
    steps = check_data(cfg, t, splits, world, method, warn=rank == 0, workers=workers)
    # derived from the config and the data alone: a resumed run derives the same
    for line in [*getattr(augment, "notes", []), *method.adapt(RunShape(len(train), t.batch_size * world))]:
        if rank == 0:
            log.info(line)

    method.to(device)
    if augment.on_device:
        augment.to(device)
    if prec.channels_last:
        method.to(memory_format=torch.channels_last)
    global_batch = t.batch_size * world
    lr = cfg.optimizer.lr * (global_batch / 256 if sched.scale_lr else 1.0)
    optimizer = build_optimizer(build(cfg.optimizer, "optimizer"), method, lr, cfg.optimizer.weight_decay,
                                fused=device.type == "cuda")
    factor = warmup_cosine(t.epochs * steps, round(sched.warmup_epochs * steps), sched.final_lr_ratio)
    if sched.warmup_epochs > t.epochs and rank == 0:
        log.warning("schedule.warmup_epochs=%g is longer than the run (trainer.epochs=%d): the lr only reaches "
                    "%.0f%% of its peak; lower schedule.warmup_epochs", sched.warmup_epochs, t.epochs,
                    100 * factor(t.epochs * steps - 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factors(optimizer, factor))
    scaler = torch.amp.GradScaler(device.type, enabled=prec.dtype == torch.float16)
    state = TrainState(monitor=CollapseMonitor(t.collapse_ratio, t.collapse_patience, t.collapse_neg_cos))
    extension = None
    if resume is not None:
        extension = resume.get("extension") or _extension(resume, t, steps, lr, factor, rank)
        if extension is not None:
            factor = restarted(factor, extension["from_step"], t.epochs * steps, extension["peak"],
                               sched.final_lr_ratio)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factors(optimizer, factor))
        state = _restore(resume, method, optimizer, scheduler, scaler, t)
        if extension is not None:  # the restored optimizer holds the tail's lr: the next step takes the restart's
            for group, base, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                group["lr"] = base * f(scheduler.last_epoch)
    model = _wrap(method, t, world, device)

    if rank == 0 and resume is not None and (run_dir / ".hydra").is_dir():
        # Hydra saved the config composed from the command line; what runs is the checkpoint's
        (run_dir / ".hydra" / "config.yaml").write_text(
            f"# the config of {resume_path}, which this run resumes\n" + OmegaConf.to_yaml(cfg, resolve=True))
    if rank == 0:
        log.info("training %s on %s (%d images, %d steps/epoch, global batch %d over %d process(es)) on %s, "
                 "precision %s; run dir %s", cfg.method._target_.rsplit(".", 1)[-1], cfg.dataset.name, len(train),
                 steps, global_batch, world, device, prec.dtype or "fp32", run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    progress = t.progress if t.progress != "auto" else ("bar" if sys.stderr.isatty() else "log")
    monitor_name = monitor_key(method, splits)
    if monitor_name is None and (t.knn_every or t.knn_monitor) and rank == 0:
        (log.warning if t.knn_every else log.info)(unlabeled_message(cfg.dataset, "the k-NN monitor is off"))
    score, bars = None, progress == "bar"
    if t.knn_every and monitor_name == "zeroshot_top1":
        score = zeroshot_monitor(method, splits.test, cfg, device, bars)
    elif t.knn_every and monitor_name == "retrieval_r1":
        score = retrieval_monitor(method, splits.held_out, cfg.dataset, device, bars)
    elif t.knn_every and monitor_name == "knn_top1":
        score = knn_score(method.encoder, splits, cfg.dataset, device, bars)
    run = resume.get("run") if resume is not None else None
    run = run or {"overrides": list(overrides or []), "choices": _choices()}
    logger = None
    if rank == 0 and cfg.get("logger") is not None:
        logger = build(cfg.logger, "logger", _recursive_=False, run_dir=run_dir,  # the config is data here
                       run_config=OmegaConf.to_container(cfg, resolve=True))
    wall = time.perf_counter()
    loop = Loop(epochs=t.epochs, batch_size=t.batch_size, seed=t.seed, workers=workers, log_every=t.log_every,
                checkpoint_every=t.checkpoint_every, rank=rank, world=world, progress=progress,
                progress_every=t.progress_every, monitor=score, monitor_every=t.knn_every or 1,
                monitor_name=monitor_name or "knn_top1",
                on_log=logger.log if logger is not None else None, probe=feature_probe(method, train, cfg, device),
                precision=str(t.precision) if prec.dtype != torch.float16 else "fp16", lr=lr)
    try:
        state = fit(method, optimizer, scheduler, scaler, augment, train, loop, prec, state, run_dir,
                    OmegaConf.to_yaml(cfg, resolve=True), model=model,
                    record_extra={"run": run, "extension": extension})
    except BaseException as e:  # an Interrupted run: every rank stops at the same step, after the save
        distributed.cleanup(barrier=isinstance(e, Interrupted))
        if logger is not None:
            logger.close()
        raise
    distributed.cleanup()
    if rank != 0:
        return None
    try:
        written = resume is None or state.step > resume["step"]
        last = run_dir / "checkpoints" / "last.pt" if written else resume_path  # nothing trained: name what was read
        summary = _summarize(cfg, t, method, splits, state, run_dir, device, time.perf_counter() - wall, last, run,
                             overrides if resume is not None else None, progress == "bar", score)
        if logger is not None:  # the settings beside the final numbers, and the pictures
            logger.finish(summary, {"loss": run_dir / "loss.png"})
        return summary
    finally:
        if logger is not None:
            logger.close()


def _extension(resume: dict, t: TrainerCfg, steps: int, lr: float, factor, rank: int) -> dict | None:
    """A resume with more epochs than its run planned: one log line with the lr the extra epochs get;
    with trainer.extend=restart, where the fresh cosine starts (stored in every later checkpoint, so a
    resume of the extended run keeps its schedule)."""
    planned = int(OmegaConf.create(resume["config"]).trainer.epochs)
    if t.epochs <= planned:
        return None
    start, total = int(resume["step"]), t.epochs * steps
    extra = f"the {t.epochs - planned} epoch(s) beyond the {planned} planned (steps {start + 1}-{total})"
    if t.extend == "restart":
        if rank == 0:
            log.info("trainer.extend=restart: %s run a fresh cosine from lr %.3g (trainer.extend_peak=%g x "
                     "optimizer.lr)", extra, t.extend_peak * lr, t.extend_peak)
        return {"from_step": start, "peak": t.extend_peak}
    if rank == 0:
        log.warning("%s run at lr %.3g -> %.3g, the tail of a cosine over the new length; for a fresh cosine over "
                    "them add trainer.extend=restart (from trainer.extend_peak=%g x optimizer.lr = %.3g)", extra,
                    lr * factor(start), lr * factor(total - 1), t.extend_peak, t.extend_peak * lr)
    return None


def untrained_checkpoint(cfg: DictConfig, path: Path) -> Path:
    """A checkpoint of the encoder as `cl-train` with this config starts it (seeded, before any step), for
    cl-eval: the floor a trained encoder is judged against."""
    seed_everything(typed("trainer", cfg.trainer, TrainerCfg).seed)
    encoder = build_model(cfg)[0]
    checkpoint.save_atomic({"config": OmegaConf.to_yaml(cfg, resolve=True), "epoch": 0, "step": 0, "history": [],
                            "model": {}, "encoder": encoder.state_dict(), "optimizer": {}, "scheduler": {},
                            "scaler": {}, "rng": checkpoint.rng_state()}, path)
    return path


def feature_probe(method: Method, train, cfg: DictConfig, device: torch.device) -> Callable[[], str | None]:
    """The check the loop runs before each checkpoint: the encoder's eval-mode features (what cl-eval
    reads, with the batch-norm running statistics) on the first 32 training images are finite."""
    from .augment import normalize

    x = train.head(32) if hasattr(train, "head") else torch.stack([train[i][0] for i in range(min(32, len(train)))])
    encoder = type(method).eval_encoder(method.encoder, cfg.method)  # wraps, shares the weights

    @torch.no_grad()
    def probe() -> str | None:
        was = method.encoder.training
        encoder.eval()
        feats = encoder(normalize(x.to(device), cfg.dataset.mean, cfg.dataset.std))
        method.encoder.train(was)
        return None if bool(torch.isfinite(feats).all()) else "features of a probe batch became non-finite"

    return probe


def knn_score(encoder: nn.Module, splits, ds, device: torch.device, bars: bool = True) -> Callable[[], float]:
    """cl-eval's weighted k-NN (k=200, T=0.1) of the encoder's features on the held-out split, as
    the callable the loop runs every trainer.knn_every epochs (features in batches on the device,
    the similarities in chunks there too)."""

    def score() -> float:
        tr_f, tr_y = extract_features(encoder, splits.eval_train, ds.mean, ds.std, device, desc="k-NN train", show=bars)
        te_f, te_y = extract_features(encoder, splits.test, ds.mean, ds.std, device, desc="k-NN test", show=bars)
        n_cls = int(max(tr_y.max(), te_y.max())) + 1
        return knn_top1(tr_f.to(device), tr_y.to(device), te_f.to(device), te_y.to(device), n_cls)

    return score


def final_knn(encoder: nn.Module, splits, ds, device: torch.device, bars: bool) -> dict:
    """The end-of-training numbers: weighted k-NN (k=200, T=0.1, as cl-eval) and plain 5-NN; a log line
    says when 200 exceeds the smallest class's training images (then 5-NN is the one to read)."""
    tr_f, tr_y = extract_features(encoder, splits.eval_train, ds.mean, ds.std, device, desc="k-NN train", show=bars)
    te_f, te_y = extract_features(encoder, splits.test, ds.mean, ds.std, device, desc="k-NN test", show=bars)
    n_cls = int(max(tr_y.max(), te_y.max())) + 1
    on_dev = [x.to(device) for x in (tr_f, tr_y, te_f, te_y)]
    out = {"knn_top1": round(knn_top1(*on_dev, n_cls), 4), "knn5_top1": round(knn_top1(*on_dev, n_cls, k=5, weighted=False), 4)}
    log.info("k-NN top-1 (k=200, T=0.1) on the test split: %.4f; 5-NN: %.4f", out["knn_top1"], out["knn5_top1"])
    counts = torch.bincount(tr_y[tr_y >= 0], minlength=n_cls)
    smallest = int(counts[counts > 0].min())
    if smallest < 200:
        log.info("k=200 is more than the smallest class's %d training images: those neighbours spill into other "
                 "classes, so the 5-NN number is the fairer one here", smallest)
    return out


def _choices() -> dict:
    """The config group options Hydra composed this job from (method=moco, +experiment=...)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra") and v is not None}


def stream_workers(workers: int, train, device: torch.device, world: int, say: bool = False) -> int:
    """The DataLoader workers a streamed source (shards) is read with. On the CPU they take cores from
    the training's own threads: where those threads already fill every core, the training process
    reads the shards itself, between steps (Fashion-MNIST PNG shards, SimCLR, 2-core Xeon: 0.905 of the
    in-memory epoch's images/s with no worker, 0.86 with 2; docs/benchmarks.md). Fewer threads
    (OMP_NUM_THREADS) leave the workers the other cores."""
    cores = os.cpu_count() or 1
    if not hasattr(train, "stream") or device.type != "cpu" or not workers:
        return workers
    if torch.get_num_threads() * world < cores:
        return workers
    if say:
        log.info("shards on the CPU: read by the training process itself, between steps (trainer.workers=%d would "
                 "share the %d cores with its %d thread(s)); a CUDA run reads them in its workers", workers, cores,
                 torch.get_num_threads())
    return 0


def check_data(cfg: DictConfig, t: TrainerCfg, splits, world: int, method: Method, warn: bool = False,
               workers: int | None = None) -> int:
    """What can be checked on the loaded data before training: channels, labels where the method
    needs them, at least one batch per epoch, enough shards for every worker. Returns the steps per epoch."""
    train = splits.train
    if hasattr(train, "images"):  # held in memory
        check(train.images.shape[1] == cfg.dataset.channels,
              f"dataset.channels={cfg.dataset.channels}: the images have {train.images.shape[1]}")
    if hasattr(train, "check_slots"):  # streamed shards: every worker of every rank reads its own
        train.check_slots(world, t.workers if workers is None else workers)
    if method.needs_labels:  # checked up front: failing inside a DDP step would hang the other ranks
        labeled = getattr(train, "all_labeled", None)  # a stream says; in-memory labels are looked at
        if labeled is None:
            labels = train.labels if isinstance(train.labels, torch.Tensor) else torch.tensor(train.labels)
            labeled = bool((labels >= 0).all())
        who, fix = (("method.supervised=true", " or supervised=false") if "supervised" in cfg.method
                    else (f"method {cfg.method._target_.rsplit('.', 1)[-1]}", ""))
        check(labeled, f"{who} needs labels, but dataset {cfg.dataset.name}'s training split has "
                       f"unlabeled images; use a labeled split{fix}")
    steps = num_batches(train, t.batch_size, world=world)
    check(steps > 0, f"trainer.batch_size={t.batch_size}: x {world} process(es) is larger than the training set "
                     f"({len(train)} images); use trainer.batch_size<={largest_batch(len(train) // world, method)}")
    dropped = len(train) - steps * t.batch_size * world
    if dropped > len(train) / 10 and warn:  # drop_last: full batches only
        even = largest_batch(len(train) // math.ceil(len(train) / (t.batch_size * world)) // world, method)
        log.warning("trainer.batch_size=%d drops %d of the %d training images every epoch (only full batches train; "
                    "a different %d each epoch); trainer.batch_size=%d would drop %d", t.batch_size, dropped, len(train),
                    dropped, even, len(train) - (len(train) // (even * world)) * even * world)
    return steps


def largest_batch(limit: int, method: Method) -> int:
    """The largest batch size up to `limit` the method accepts (MoCo's split batch-norm needs a multiple
    of its splits), or its minimum when none does."""
    for size in range(limit, method.min_batch_size - 1, -1):
        try:
            method.check_batch_size(size)
            return size
        except UserError:
            continue
    return method.min_batch_size


def _wrap(method: Method, t: TrainerCfg, world: int, device: torch.device):
    """What runs the step: the method, under DDP when there are several processes, compiled on request."""
    model = method
    if world > 1:
        if t.sync_bn:
            check(device.type == "cuda", "trainer.sync_bn=true: SyncBatchNorm runs on CUDA only (this run is on the CPU)")
            check(not any(isinstance(m, SplitBatchNorm2d) for m in model.modules()),
                  "trainer.sync_bn=true: would replace MoCo's split batch-norm; set method.bn_splits=1 with it")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # no buffer broadcast each step: MoCo's queue is kept equal by gathering keys (torch 2.14 renamed
        # broadcast_buffers to forward_sync_buffers)
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})
        model = ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    return torch.compile(model) if t.compile else model


def _summarize(cfg, t: TrainerCfg, method: Method, splits, state: TrainState, run_dir: Path,
               device: torch.device, wall: float, last: Path, run: dict, resumed_with: list[str] | None,
               bars: bool, monitor=None) -> dict:
    """summary.json: what was trained and how well, with the overrides and settings a table of runs needs.
    `monitor`: the run's online score (trainer.knn_every), reused for the end's zero-shot when there is one."""
    summary = {"method": cfg.method._target_, "dataset": cfg.dataset.name, "epochs": state.epoch,
               "steps": state.step, "final_loss": state.history[-1]["loss"] if state.history else None,
               "wall_time_s": round(wall, 2), "collapse_warning": state.monitor.any, "checkpoint": str(last),
               "overrides": run.get("overrides", []), "settings": run_settings(cfg, run.get("choices"))}
    if resumed_with is not None:
        summary["resumed_with"] = list(resumed_with)
    if state.best is not None:
        best = "knn" if state.best["key"] == "knn_top1" else state.best["key"]  # zeroshot_top1, retrieval_r1
        summary.update({f"{best}_best": round(state.best["value"], 4), f"{best}_best_epoch": state.best["epoch"],
                        "best_checkpoint": str(run_dir / "checkpoints" / "best.pt")})
    title = f"{summary['settings']['method']} on {cfg.dataset.name}"
    key = monitor_key(method, splits)
    if state.history:
        loss_png(state.history, state.trace, run_dir / "loss.png", title, key or "knn_top1")
    if (t.knn_monitor or t.knn_every) and splits.labeled:
        summary.update(final_knn(method.encoder, splits, cfg.dataset, device, bars))
        if key == "zeroshot_top1":
            summary["zeroshot_top1"] = (monitor or zeroshot_monitor(method, splits.test, cfg, device, bars))()
            log.info("zero-shot top-1 on the test split: %.4f", summary["zeroshot_top1"])
    elif (t.knn_monitor or t.knn_every) and key == "retrieval_r1":
        summary.update(held_out_retrieval(method, splits.held_out, cfg.dataset, device, bars=bars))
        log.info("retrieval on the held-out pairs: recall@1 image->text %.4f, text->image %.4f",
                 summary["i2t_r1"], summary["t2i_r1"])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("checkpoint: %s", summary["checkpoint"])
    return summary


def monitor_key(method, splits) -> str | None:
    """What a run is monitored and its best.pt kept by: the k-NN on labelled data; for CLIP/SigLIP, zero-shot
    top-1 on labelled data, else recall@1 on a pairs file's held-out pairs; None: nothing to score on."""
    if hasattr(method, "embed_text"):
        if splits.labeled:
            return "zeroshot_top1"
        return "retrieval_r1" if getattr(splits, "held_out", None) is not None else None
    return "knn_top1" if splits.labeled else None


def _restore(ckpt: dict, method, optimizer, scheduler, scaler, t: TrainerCfg) -> TrainState:
    try:
        method.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"trainer.resume={t.resume}: its model does not match this config's method/encoder "
                        "(resume with the same method and encoder as the run that wrote it)") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    checkpoint.set_rng_state(ckpt["rng"])
    if ckpt["epoch"] >= t.epochs:
        log.info("checkpoint already has %d of %d epochs: nothing to train", ckpt["epoch"], t.epochs)
    monitor = CollapseMonitor(t.collapse_ratio, t.collapse_patience, t.collapse_neg_cos, **ckpt.get("monitor", {}))
    return TrainState(epoch=ckpt["epoch"], step=ckpt["step"], history=list(ckpt["history"]), monitor=monitor,
                      batch=ckpt.get("batch", 0), partial=ckpt.get("partial"), trace=list(ckpt.get("trace", [])),
                      best=ckpt.get("best"), start_norm=ckpt.get("start_norm"))


if __name__ == "__main__":  # the launch module is the command line's, not this library's
    sys.exit("python -m contrastive_cli.train: the module to launch is now contrastive_cli.cli "
             "(torchrun --nproc_per_node=N -m contrastive_cli.cli [overrides]); cl-torchrun reads the old name too")
