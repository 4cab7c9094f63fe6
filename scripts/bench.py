"""Throughput benchmark: the data pipeline alone, the training step alone, and both end to end.

    python scripts/bench.py dataset=fashion_mnist encoder=small_cnn trainer.batch_size=256
    python scripts/bench.py --pipeline=per_image dataset=fashion_mnist encoder=small_cnn trainer.batch_size=256
    python scripts/bench.py --synthetic=50000 dataset=cifar10 encoder=resnet18 trainer.batch_size=512 trainer.precision=bf16
    python scripts/bench.py --methods=simclr,moco,byol dataset=fashion_mnist encoder=small_cnn trainer.batch_size=256

Takes the same Hydra overrides as cl-train and prints one JSON line per measurement: images/s (one
image = its two views) and peak memory. `--pipeline=device` is the toolkit's path (uint8 batches to
the device, per-sample augmentation there in one pass); `per_image` is the usual baseline: torchvision
v2 transforms of the same recipe applied image by image in DataLoader workers. `--synthetic=N` uses
N random uint8 images of the dataset's shape instead of its files (for machines without the data).
`--methods=a,b,...` measures the step alone for each method (the same encoder, batch and views) and
ends with a markdown table of each method's step time over the first one's.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hydra import compose, initialize_config_module  # noqa: E402

from contrastive_cli.config import build, validate_train  # noqa: E402
from contrastive_cli.data import TensorImages, iterate_batches  # noqa: E402
from contrastive_cli.engine import make_views, optimizer_step  # noqa: E402
from contrastive_cli.optim import build_optimizer  # noqa: E402
from contrastive_cli.parts import build_model, resolve_device  # noqa: E402
from contrastive_cli.train import resolve_precision, seed_everything  # noqa: E402


def per_image_transform(view, channels: int):
    """torchvision v2 transforms with the same recipe as one BatchAugment view, applied per image."""
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(view.size, scale=view.crop_scale, ratio=view.crop_ratio, antialias=True),
           v2.RandomHorizontalFlip(view.flip_p)]
    if view.rotate:
        ops.append(v2.RandomRotation(view.rotate * 180 / 3.141592653589793))
    if view.jitter_p:
        color = dict(saturation=view.saturation, hue=view.hue) if channels == 3 else {}
        ops.append(v2.RandomApply([v2.ColorJitter(brightness=view.brightness, contrast=view.contrast, **color)],
                                  p=view.jitter_p))
    if channels == 3 and view.gray_p:
        ops.append(v2.RandomGrayscale(view.gray_p))
    if view.blur_p:
        ops.append(v2.RandomApply([v2.GaussianBlur(view.blur_size, view.blur_sigma)], p=view.blur_p))
    if view.solarize_p:
        ops.append(v2.RandomSolarize(128, p=view.solarize_p))
    ops += [v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(view.mean.flatten().tolist(), view.std.flatten().tolist())]
    return v2.Compose(ops)


class PerImageViews(torch.utils.data.Dataset):
    def __init__(self, data: TensorImages, t1, t2):
        self.data, self.t1, self.t2 = data, t1, t2

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x = self.data.images[i]
        return self.t1(x), self.t2(x), self.data.labels[i]


def batches(args, cfg, data, augment, device, prec, epoch: int = 0):
    """Yield (view1, view2, crops) on the device, made by the chosen pipeline (crops: a multi-crop
    augmentation's local crops, else empty)."""
    t = cfg.trainer
    if args.pipeline == "per_image":
        if not hasattr(augment, "view1"):
            sys.exit(f"bench.py: --pipeline=per_image needs a two-view augmentation, not {cfg.augmentation._target_}")
        ds = PerImageViews(data, per_image_transform(augment.view1, cfg.dataset.channels),
                           per_image_transform(augment.view2, cfg.dataset.channels))
        loader = torch.utils.data.DataLoader(ds, batch_size=t.batch_size, shuffle=True, drop_last=True,
                                             num_workers=t.workers, pin_memory=device.type == "cuda",
                                             persistent_workers=t.workers > 0)
        while True:
            for v1, v2, _ in loader:
                yield prec.to_device(v1), prec.to_device(v2), ()
    g = torch.Generator(device=device).manual_seed(0)
    while True:
        for batch in iterate_batches(data, t.batch_size, t.seed, epoch, pin=device.type == "cuda"):
            x1, x2, _, crops = make_views(batch, augment, g, prec, cpu_views=False)
            yield x1, x2, crops
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn, steps: int, warmup: int, device: torch.device, images: int) -> tuple[float, float]:
    """(images/s over `steps` calls, seconds the `warmup` calls took: torch.compile's compilation)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return images * steps / (time.perf_counter() - start), warm


def setup(args, overrides: list[str]) -> SimpleNamespace:
    """Everything one measurement needs, built as cl-train builds it."""
    with initialize_config_module(config_module="contrastive_cli.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    t, _ = validate_train(cfg)
    device = resolve_device(t.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    prec = resolve_precision(t, device)
    seed_everything(t.seed)
    if args.synthetic:
        shape = (args.synthetic, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
        data = TensorImages(torch.randint(0, 256, shape, dtype=torch.uint8), torch.arange(args.synthetic) % 10,
                            [str(i) for i in range(10)])
    else:
        data = build(cfg.dataset.source, "dataset").train
    _, method = build_model(cfg)
    method.use_data(data, cfg.dataset)  # clip, siglip: the captions (templated class names)
    method.to(device).to(memory_format=torch.channels_last if prec.channels_last else torch.contiguous_format)
    augment = build(cfg.augmentation, "augmentation").to(device)
    optimizer = build_optimizer(build(cfg.optimizer, "optimizer"), method, cfg.optimizer.lr,
                                cfg.optimizer.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=prec.dtype == torch.float16)
    model = torch.compile(method) if t.compile else method
    labels = torch.full((t.batch_size,), -1, device=device)
    if method.needs_labels:  # SupCon: a fixed labelling with several images per class
        labels = torch.arange(t.batch_size, device=device) % 10
    method.train()

    def step(v1, v2, crops=()):
        optimizer_step(model, v1, v2, labels, optimizer, scaler, prec, crops,
                       functools.partial(method.before_optimizer_step, 0.5))
        method.on_step_end(0.5)

    base = {"pipeline": args.pipeline, "overrides": " ".join(overrides), "batch_size": t.batch_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "precision": str(prec.dtype or "fp32"), "compile": t.compile,
            "channels_last": prec.channels_last}
    return SimpleNamespace(cfg=cfg, t=t, device=device, prec=prec, data=data, augment=augment, step=step, base=base)


def emit(run: SimpleNamespace, part: str, rate: float, warmup_s: float) -> None:
    print(json.dumps({**run.base, "part": part, "images_per_s": round(rate, 1),
                      "ms_per_step": round(1000 * run.t.batch_size / rate, 1), "warmup_s": round(warmup_s, 1),
                      "peak_mem_mib": round(peak_mib(run.device), 1)}), flush=True)


def parts(args, overrides: list[str]) -> None:
    run = setup(args, overrides)
    stream = batches(args, run.cfg, run.data, run.augment, run.device, run.prec)
    n = run.t.batch_size
    results = {}
    results["pipeline"] = timed(lambda: next(stream), args.steps, args.warmup, run.device, n)
    resident = next(stream)
    results["step"] = timed(lambda: run.step(*resident), args.steps, args.warmup, run.device, n)
    results["end_to_end"] = timed(lambda: run.step(*next(stream)), args.steps, args.warmup, run.device, n)
    for part, (rate, warm) in results.items():
        emit(run, part, rate, warm)
    e2e, step = results["end_to_end"][0], results["step"][0]
    print(json.dumps({**run.base, "part": "summary", "end_to_end_over_step": round(e2e / step, 3),
                      "epoch_50k_s": round(50_000 / e2e, 1)}), flush=True)


def method_steps(args, overrides: list[str]) -> None:
    """The step alone for each method, on the same resident views, measured `--repeats` times in
    turn (so a slow spell of the machine hits every method alike) and reported as the median; then
    one markdown table."""
    names = args.methods.split(",")
    runs = [setup(args, [*overrides, f"method={name}"]) for name in names]
    views = [next(batches(args, run.cfg, run.data, run.augment, run.device, run.prec)) for run in runs]
    rates: list[list[float]] = [[] for _ in names]
    warmups = [0.0] * len(names)
    for r in range(args.repeats):
        for i, (run, resident) in enumerate(zip(runs, views, strict=True)):
            rate, warm = timed(lambda run=run, resident=resident: run.step(*resident), args.steps,
                               args.warmup if r == 0 else 1, run.device, run.t.batch_size)
            rates[i].append(rate)
            warmups[i] = warmups[i] or warm
    rows = []
    for name, run, measured, warm in zip(names, runs, rates, warmups, strict=True):
        rate = statistics.median(measured)
        emit(run, f"step {name}", rate, warm)
        rows.append((name, 1000 * run.t.batch_size / rate, rate))
    print(f"\n| method | step (ms) | images/s | step over {rows[0][0]}'s |\n|---|---|---|---|")
    for name, ms, rate in rows:
        print(f"| {name} | {ms:.1f} | {rate:,.0f} | {ms / rows[0][1]:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", choices=("device", "per_image"), default="device")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation, caches); their time is warmup_s")
    ap.add_argument("--synthetic", type=int, default=0, help="N random uint8 images instead of the dataset")
    ap.add_argument("--methods", default="", help="comma-separated methods: the step alone for each, and a table")
    ap.add_argument("--repeats", type=int, default=3, help="with --methods: rounds over the methods; the median is kept")
    args, overrides = ap.parse_known_args()
    if args.methods:
        method_steps(args, overrides)
    else:
        parts(args, overrides)


if __name__ == "__main__":
    main()
