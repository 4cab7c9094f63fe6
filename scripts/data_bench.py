"""Decode-and-serve throughput of the data paths, on a synthetic-photo set anyone can regenerate.

    python scripts/data_bench.py make --n 50000 --out /tmp/photos          # JPEGs, 256 px short side, 10 classes
    python scripts/data_bench.py pack --src /tmp/photos --out /tmp/photos-shards
    python scripts/data_bench.py serve --src /tmp/photos --shards /tmp/photos-shards --size 64 --batches 60
    python scripts/data_bench.py fashion --out /tmp/fashion                 # a SimCLR epoch: shards vs in memory

`serve` prints one JSON line per path: images/s of uint8 batches of 256 at `--size`, as the training
loop takes them (no model): Pillow per batch from the folder in 2 DataLoader workers (what a folder
beyond cache_gb did before the disk cache), the disk cache (decoded once, then read from the
memory-mapped file), shards streamed with 1 and 2 workers (simplejpeg where installed), and shards
decoded by Pillow with its JPEG draft mode and without it (the full-size decode, then a resize). `fashion` packs
Fashion-MNIST's 60k training images as PNG shards and times one `cl-train` epoch (SimCLR, defaults)
from them and from the in-memory dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def make(n: int, out: Path, seed: int = 0) -> None:
    """n photo-like JPEGs (smooth colour fields, shapes and grain; not noise, which no photo is) of
    256 px on the short side and 256-384 on the long one, in 10 class folders."""
    from PIL import Image, ImageDraw, ImageFilter
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    for i in tqdm(range(n), desc="photos"):
        c = i % 10
        w, h = (int(rng.integers(256, 385)), 256) if i % 2 else (256, int(rng.integers(256, 385)))
        base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(3 + c % 4):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            box = (x0, y0, x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120)))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if c % 2 else draw.rectangle)(box, fill=fill)
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        grain = rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))
        folder = out / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.jpg", quality=90)


def rate(batches, n_batches: int, batch: int) -> float:
    it = iter(batches)
    next(it)  # the workers' start-up is not throughput
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - t0)


def serve(src: Path, shards: Path, size: int, n_batches: int, batch: int = 256) -> list[dict]:
    import torch

    from contrastive_cli.data import samples as sample_mod
    from contrastive_cli.data import shards as shard_mod
    from contrastive_cli.data.batches import iterate_batches
    from contrastive_cli.data.folder import load_imagefolder

    torch.set_num_threads(2)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    out = []

    def record(path: str, value: float, **extra) -> None:
        row = {"path": path, "size": size, "images_per_s": round(value, 1), "machine": machine, **extra}
        print(json.dumps(row), flush=True)
        out.append(row)

    lazy = load_imagefolder(str(src), image_size=size, cache_gb=0, cache_dir=None, test_fraction=0.1).train
    record("folder, Pillow per batch, 2 workers", rate(iterate_batches(lazy, batch, 0, 0, workers=2), n_batches, batch))
    cache = Path(src, ".contrastive_cli_cache")
    t0 = time.perf_counter()
    cached = load_imagefolder(str(src), image_size=size, cache_gb=1e-9, test_fraction=0.1).train
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = load_imagefolder(str(src), image_size=size, cache_gb=1e-9, test_fraction=0.1).train
    opened = time.perf_counter() - t0
    record("disk cache (memory-mapped)", rate(iterate_batches(cached, batch, 0, 0), n_batches, batch),
           build_s=round(built, 1), open_s=round(opened, 2), cache_mb=round(sum(f.stat().st_size for f in cache.glob("*")) / 2**20))
    data = shard_mod.load_shards(str(shards), image_size=size, decode="cpu").train
    decoder = "simplejpeg" if sample_mod.JPEG is not None else "Pillow, draft mode"
    for workers in (1, 2):
        record(f"shards, {workers} worker(s), {decoder}", rate(data.stream(batch, 0, 0, workers=workers), n_batches, batch))
    jpeg, sample_mod.JPEG = sample_mod.JPEG, None
    if jpeg is not None:
        record("shards, 2 workers, Pillow, draft mode", rate(data.stream(batch, 0, 0, workers=2), n_batches, batch))
    sample_mod.DRAFT = False
    record("shards, 2 workers, Pillow, full decode", rate(data.stream(batch, 0, 0, workers=2), n_batches, batch))
    sample_mod.DRAFT, sample_mod.JPEG = True, jpeg
    return out


def fashion(out: Path) -> list[dict]:
    """One SimCLR epoch (cl-train's defaults, Fashion-MNIST's settings) from PNG shards and from memory."""
    import csv
    import shutil
    import subprocess

    from PIL import Image

    from contrastive_cli.data.named import load_mnist

    train = load_mnist("fashion_mnist", str(out / "data"), system_dir="/usr/share/datasets/fashion-mnist").train
    folder = out / "png"
    if not (out / "shards" / "index.json").is_file():
        for i, (x, y) in enumerate(zip(train.images, train.labels.tolist(), strict=True)):
            (folder / f"{y}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[0].numpy()).save(folder / f"{y}" / f"{i:05d}.png")
        subprocess.run([Path(sys.executable).parent / "cl-pack", f"input={folder}", f"out={out / 'shards'}",
                        "image_size=28", "format=png", "channels=1", "test_fraction=0"], check=True)
    same = ["dataset.image_size=28", "dataset.channels=1", "dataset.mean=[0.2860]", "dataset.std=[0.3530]",
            "dataset.num_classes=10", "trainer.epochs=1", "trainer.knn_monitor=false"]
    rows = []
    for name, args in (("in memory", ["dataset=fashion_mnist", "trainer.epochs=1", "trainer.knn_monitor=false"]),
                       ("shards", ["dataset=shards", f"dataset.source.path={out / 'shards'}", *same])):
        run = out / f"run-{name.split(',')[0].replace(' ', '_')}"
        shutil.rmtree(run, ignore_errors=True)  # a run folder of an earlier measurement
        subprocess.run([Path(sys.executable).parent / "cl-train", *args, f"hydra.run.dir={run}"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CL_DATA_DIR": str(out / "data")})
        with open(run / "metrics.csv") as f:
            seconds = float(list(csv.DictReader(f))[-1]["time"])
        steps = 60_000 // 256
        rows.append({"path": name, "epoch_s": seconds, "images_per_s": round(steps * 256 / seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"ratio": round(rows[1]["images_per_s"] / rows[0]["images_per_s"], 3)}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["make", "pack", "serve", "fashion"])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--src", type=Path)
    ap.add_argument("--shards", type=Path)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=60)
    args = ap.parse_args()
    if args.what == "make":
        make(args.n, args.out)
    elif args.what == "pack":
        import subprocess

        t0 = time.perf_counter()
        subprocess.run([Path(sys.executable).parent / "cl-pack", f"input={args.src}", f"out={args.out}",
                        "image_size=256", "test_fraction=0"], check=True)
        print(json.dumps({"path": "cl-pack", "seconds": round(time.perf_counter() - t0, 1)}))
    elif args.what == "fashion":
        fashion(args.out)
    else:
        serve(args.src, args.shards, args.size, args.batches)


if __name__ == "__main__":
    main()
