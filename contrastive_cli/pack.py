"""cl-pack: a folder of images (class sub-folders become .cls labels) or a pairs file (captions become
.txt) into WebDataset tar shards and an index.json, for dataset=shards.

Each image is resized to `image_size` on its short side and encoded as JPEG (`quality`) or PNG
(lossless), shard by shard in `workers` processes. A shard is written under a temporary name and
renamed when whole, so a stopped pack leaves complete shards only; run the same command again and it
packs the missing ones. A seeded `test_fraction` (stratified by class, or by image for pairs) goes to
test-*.tar, which dataset=shards evaluates on."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from .config import finite_and_present, unknown_top_keys
from .data.folder import folder_labels, image_files
from .data.images import stratified_split, warn_unreadable
from .data.pairs import held_out_images, read_pairs, resolve
from .data.samples import IMAGE_KEYS, read_samples, webdataset
from .data.shards import FORMAT, INDEX
from .errors import UserError, check, positive
from .progress import bar

log = logging.getLogger(__name__)
KEYS = ("input", "out", "image_size", "shard_size", "format", "quality", "channels", "test_fraction", "seed",
        "workers", "image_key", "caption_key")
PLAN = ".pack.json"  # what this pack is (input, settings, samples): a rerun resumes only the same pack


def validate_pack_job(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    finite_and_present(cfg)
    unknown_top_keys(cfg, KEYS)
    for key in ("image_size", "shard_size"):
        positive(key, cfg[key], integer=True)
    positive("workers", cfg.workers, integer=True, strict=False)
    check(cfg.format in ("jpeg", "png"), f"format={cfg.format}: choose from jpeg, png")
    check(isinstance(cfg.quality, int) and 1 <= cfg.quality <= 100, f"quality={cfg.quality}: a JPEG quality from 1 to 100")
    check(cfg.channels in (1, 3), f"channels={cfg.channels}: 1 (grey) or 3 (RGB)")
    check(isinstance(cfg.test_fraction, (int, float)) and 0 <= cfg.test_fraction < 1,
          f"test_fraction={cfg.test_fraction}: from 0 (none held out) to below 1")
    return cfg


def collect(cfg: DictConfig) -> tuple[list[tuple[str, int, str | None]], list[str], str]:
    """(file, label or -1, caption or None) per sample, the class names, and what the input is."""
    src = os.path.expanduser(str(cfg.input))
    if os.path.isdir(src):
        paths = image_files(src)
        check(bool(paths), f"input={cfg.input}: has no image files (any format Pillow reads, in it or below)")
        labels, classes = folder_labels(src, paths)
        loose = sum(y is None for y in labels)
        if loose:
            log.warning("ignored %d image file(s) directly in %s: with class sub-folders, only their images are packed",
                        loose, src)
        return [(p, y, None) for p, y in zip(paths, labels, strict=True) if y is not None], classes, "folder"
    if os.path.isfile(src):
        rows = read_pairs(src, cfg.image_key, cfg.caption_key, key="input")
        return [(resolve(src, f), -1, c) for f, c in rows], [], "pairs"
    raise UserError(f"input={cfg.input}: no such folder or file (a folder of images, or a .csv/.tsv/.jsonl pairs file)")


def split(samples, classes: list[str], fraction: float, seed: int) -> tuple[list, list]:
    """Held-out samples: stratified by class, or by image (all captions of an image on one side)."""
    if not fraction:
        return samples, []
    if classes:
        labels = np.array([y for _, y, _ in samples])
        check(np.bincount(labels).min() >= 2, f"test_fraction={fraction}: every class folder needs 2 images to hold "
                                              "one out (or set test_fraction=0)")
        tr, te = stratified_split(labels, fraction, seed)
    else:
        files = list(dict.fromkeys(f for f, _, _ in samples))
        check(len(files) >= 2, f"test_fraction={fraction}: needs 2 images (or set test_fraction=0)")
        test_files = {files[i] for i in np.flatnonzero(held_out_images(len(files), fraction, seed))}
        te = [i for i, (f, _, _) in enumerate(samples) if f in test_files]
        tr = [i for i, (f, _, _) in enumerate(samples) if f not in test_files]
    return [samples[i] for i in tr], [samples[i] for i in te]


def encode(path: str, size: int, channels: int, fmt: str, quality: int) -> bytes:
    """The file resized to `size` on its short side, as JPEG or PNG bytes."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        w, h = img.size
        scale = size / min(w, h)
        if scale != 1:
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG" if fmt == "jpeg" else "PNG", **({"quality": quality} if fmt == "jpeg" else {}))
    return buf.getvalue()


def write_shard(job) -> tuple[str, int, list[str]]:
    """One shard, whole or not at all: written as .NAME.tmp, renamed to NAME when complete."""
    out, name, rows, size, channels, fmt, quality, root = job
    wds = webdataset()
    tmp, bad, n = Path(out, f".{name}.tmp"), [], 0
    ext = "jpg" if fmt == "jpeg" else "png"
    # one time stamp for every member (the input's): packing the same input again writes the same bytes
    # ustar: no pax header before each member (a float time stamp would add one), half the headers to read
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=int(os.path.getmtime(root)), format=tarfile.USTAR_FORMAT) as sink:
        for key, path, label, caption in rows:
            try:
                data = encode(path, size, channels, fmt, quality)
            except Exception:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError ...
                bad.append(path)
                continue
            sample = {"__key__": key, ext: data, "json": {"source": os.path.relpath(path, root)}}
            if label >= 0:
                sample["cls"] = str(label)
            if caption is not None:
                sample["txt"] = caption
            sink.write(sample)
            n += 1
    os.replace(tmp, Path(out, name))
    return name, n, bad


def count(path: Path) -> int:
    return sum(1 for _ in read_samples(str(path), IMAGE_KEYS))


def run_pack(cfg: DictConfig) -> dict:
    webdataset()  # the extra's one line before any work
    samples, classes, kind = collect(cfg)
    train, test = split(samples, classes, float(cfg.test_fraction), int(cfg.seed))
    out = Path(os.path.expanduser(str(cfg.out)))
    settings = {k: cfg[k] for k in ("image_size", "shard_size", "format", "quality", "channels", "test_fraction", "seed")}
    digest = hashlib.sha256(json.dumps([settings, samples], sort_keys=True).encode()).hexdigest()
    plan = {"input": os.path.abspath(os.path.expanduser(str(cfg.input))), "settings": settings, "samples": digest}
    _claim(out, plan)
    root = os.path.dirname(plan["input"]) if kind == "pairs" else plan["input"]
    jobs, names = [], {"train": [], "test": []}
    for part, rows, prefix in (("train", train, "shard"), ("test", test, "test")):
        for i, first in enumerate(range(0, len(rows), int(cfg.shard_size))):
            chunk = rows[first : first + int(cfg.shard_size)]
            name = f"{prefix}-{i:06d}.tar"
            names[part].append(name)
            keyed = [(f"{part}{first + j:09d}", f, y, c) for j, (f, y, c) in enumerate(chunk)]
            if not (out / name).is_file():
                jobs.append((str(out), name, keyed, int(cfg.image_size), int(cfg.channels), cfg.format, int(cfg.quality),
                             root))
    done = sum(len(names[p]) for p in names) - len(jobs)
    if done:
        log.info("%s: %d shard(s) already packed, %d to go", out, done, len(jobs))
    bad = []
    for _, _, miss in bar(_map(write_shard, jobs, int(cfg.workers)), len(jobs), "packing", unit="shard", delay=1.0):
        bad += miss
    warn_unreadable(bad)
    counts = {n: count(out / n) for p in names for n in names[p]}
    if not sum(counts[n] for n in names["train"]):
        raise UserError(f"input={cfg.input}: none of its {len(samples)} images could be read")
    index = {"format": FORMAT, "input": plan["input"], "image_size": int(cfg.image_size), "channels": int(cfg.channels),
             "image_format": cfg.format, "classes": classes, "captions": kind == "pairs",
             **{p: [{"name": n, "count": counts[n]} for n in names[p]] for p in names}}
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX)
    return {"out": str(out), "train": sum(counts[n] for n in names["train"]), "test": sum(counts[n] for n in names["test"]),
            "shards": len(counts), "skipped": bad, "classes": len(classes)}


def _claim(out: Path, plan: dict) -> None:
    """Make `out` this pack's: an empty or new folder, or one a stopped run of the same pack left."""
    out.mkdir(parents=True, exist_ok=True)
    mine = out / PLAN
    if mine.is_file():
        try:
            same = json.loads(mine.read_text()) == plan
        except json.JSONDecodeError:
            same = False
        if not same:
            raise UserError(f"out={out}: holds the shards of another pack (other input, settings or images); "
                            "pick another folder, or empty this one")
        for stale in out.glob(".*.tar.tmp"):  # a shard cut off by a stop: packed again
            stale.unlink()
        return
    others = [p.name for p in out.iterdir() if p.suffix == ".tar" or p.name == INDEX]
    if others:
        raise UserError(f"out={out}: already holds shards ({others[0]}{' ...' if len(others) > 1 else ''}) that cl-pack "
                        "did not start here; pick an empty folder")
    mine.write_text(json.dumps(plan))


def _default_signals() -> None:
    """In a pool worker: SIGTERM ends it. The worker is a fork of cl-pack, whose SIGTERM handler raises for a
    one-line exit: raised inside a worker that held the task queue's lock, it left the lock taken."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _map(fn, jobs, workers: int):
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    import multiprocessing

    # close + join once every result is in: the workers end on the queue's sentinels, no signal sent.
    # `with Pool()` ends in terminate(), which SIGTERMs the workers; one that the inherited handler stopped
    # while it held the task queue's lock left another waiting on that lock, and the join hung (twice in
    # one day's test runs, a cl-pack until the test's 600 s timeout; within 300 pools in a loop)
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_default_signals)
    try:
        yield from pool.imap_unordered(fn, jobs)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
