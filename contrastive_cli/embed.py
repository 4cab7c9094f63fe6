"""cl-embed: the encoder's features of a folder of images (or of a named dataset), an index of what
each row is, and a picture of nearest neighbours."""

from __future__ import annotations

import csv
import json
import logging
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import checkpoint, files
from .api import Preprocess, check_features, encoder_from_checkpoint
from .config import build
from .data.folder import folder_labels, image_files
from .data.images import TensorImages, decode_batches, warn_unreadable
from .errors import UserError, check, positive
from .parts import resolve_device
from .progress import bar
from .zeroshot import image_text_towers

log = logging.getLogger(__name__)
SHARED = "image_text_embeddings.npy"  # beside embeddings.npy for an image-text checkpoint: what cl-search reads


def dataset_options() -> list[str]:
    """The named datasets `input=` accepts (an image folder is given by its path instead)."""
    folder = resources.files("contrastive_cli.configs").joinpath("dataset")
    yours = ("imagefolder.yaml", "pairs.yaml", "shards.yaml")  # given by their path instead
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml") and p.name not in yours)


def _folder(root: str, size: int, channels: int, batch_size: int, workers: int):
    """Batches of (uint8 images, readable mask) of every image file under root, and its paths."""
    paths = image_files(root)
    if not paths:
        raise UserError(f"input={root}: has no image files (any format Pillow reads, in it or below)")
    return decode_batches(paths, size, channels, batch_size, workers), paths


def _is_shards(source: str) -> bool:
    """A folder of .tar shards (cl-pack's, or any), a brace list of them, or one .tar."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return any(n.endswith(".tar") for n in os.listdir(path)) and not image_files(path)
    return path.endswith(".tar")


def _shards(source: str, size: int, channels: int, batch_size: int):
    """Batches of every sample of shards (training ones, then held-out ones), rows named shard#key."""
    from .data.samples import IMAGE_KEYS, parse, read_samples, shard_index
    from .data.shards import load_shards

    splits = load_shards(source, image_size=size, channels=channels, decode="cpu")
    parts = [s for s in (splits.train, splits.test) if s is not None]
    classes = splits.train.classes
    rows = [(f"{shard.path}#{key}", (classes[y] if y < len(classes) else str(y)) if y >= 0 else "")
            for part in parts for shard in part.shards for key, y in shard_index(shard.path)]

    def batches():
        x, ok = [], []
        for part in parts:
            for shard in part.shards:
                for _, fields in read_samples(shard.path):
                    got = parse(fields, size, channels, False)
                    if got is None and not any(k in fields for k in IMAGE_KEYS):
                        continue  # no image at all: not a row
                    ok.append(got is not None)
                    if got is not None:
                        x.append(got[0])
                    if len(ok) == batch_size:
                        yield (torch.stack(x) if x else None), torch.tensor(ok)
                        x, ok = [], []
        if ok:
            yield (torch.stack(x) if x else None), torch.tensor(ok)

    return batches(), rows, -(-len(rows) // batch_size)


def _named(name: str, data_dir: str, size: int, channels: int, batch_size: int):
    """Batches of a named dataset's images (its training split, then its test split), all readable."""
    ds = _dataset_cfg(name, data_dir)
    check(ds.channels == channels, f"input={name}: has {ds.channels} channel(s), but the encoder takes {channels}")
    parts = list(_named_splits(name, data_dir).items())
    rows, tensors = [], []
    for split, data in parts:
        check(isinstance(data, TensorImages), f"input={name}: not held in memory; give its folder instead")
        tensors.append(data)
        rows += [(f"{name}:{split}:{i}", data.classes[y] if y >= 0 and data.classes else (str(y) if y >= 0 else ""))
                 for i, y in enumerate(data.labels.tolist())]

    def batches():
        for data in tensors:
            for start in range(0, len(data), batch_size):
                x = data.images[start : start + batch_size]
                if x.shape[-1] != size or x.shape[-2] != size:  # as a folder would be: to the encoder's size
                    x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                                      align_corners=False).round().clamp(0, 255).to(torch.uint8)
                yield x, torch.ones(len(x), dtype=torch.bool)

    return batches(), rows, sum(-(-len(data) // batch_size) for data in tensors)


def _neighbour_png(path: Path, queries: list[int], hits: list[list[tuple[int, float]]], picture) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(hits[0])
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.6 * (k + 1), 1.75 * len(queries)), dpi=100,
                             squeeze=False)
    for r, (q, row_hits) in enumerate(zip(queries, hits, strict=True)):
        for c, (idx, sim) in enumerate([(q, None), *row_hits]):
            ax = axes[r][c]
            img = picture(idx)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_title(f"query {q}" if sim is None else f"{sim:.3f}", fontsize=8, color="C3" if sim is None else "k")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{len(queries)} queries (left) and their {k} nearest neighbours by cosine similarity", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_embed(cfg: DictConfig, out_dir: Path) -> dict:
    positive("batch_size", cfg.batch_size, integer=True)
    positive("neighbours", cfg.neighbours, integer=True, strict=False)
    positive("num_queries", cfg.num_queries, integer=True)
    positive("workers", cfg.workers, integer=True, strict=False)
    ckpt_path, ckpt = checkpoint.for_use(cfg.checkpoint)
    encoder, train_cfg = encoder_from_checkpoint(ckpt, ckpt_path)
    ds = train_cfg.dataset
    size, channels = int(ds.image_size), int(ds.channels)
    device = resolve_device(cfg.device)
    encoder.to(device)
    source = str(cfg.input)
    if _is_shards(source):
        batches, rows, n_batches = _shards(source, size, channels, cfg.batch_size)
        paths, labels = [r[0] for r in rows], [r[1] for r in rows]
    elif os.path.isdir(os.path.expanduser(source)):
        source = os.path.expanduser(source)
        batches, found = _folder(source, size, channels, cfg.batch_size, cfg.workers)
        paths, labels, n_batches = [str(Path(p).resolve()) for p in found], None, len(batches)
    elif source in dataset_options():
        batches, rows, n_batches = _named(source, cfg.paths.data_dir, size, channels, cfg.batch_size)
        paths, labels = [r[0] for r in rows], [r[1] for r in rows]
    else:
        raise UserError(f"input={source}: not a folder, nor a dataset ({', '.join(dataset_options())})")
    queries = _query_keys(cfg, source, paths)  # a wrong query fails before the long pass
    pre = Preprocess(size, channels, ds.mean, ds.std, device)
    towers = image_text_towers(ckpt, ckpt_path, train_cfg)  # CLIP/SigLIP: the space shared with the text too
    tower = towers[0].to(device) if towers is not None else None
    feats, shared, ok = [], [], []
    with torch.no_grad():
        for x, good in bar(batches, n_batches, "embedding", leave=True):
            ok.append(good)
            if x is not None:
                feats.append(encoder(pre(x)).float().cpu())
                if tower is not None:
                    shared.append(tower(pre(x)).cpu())
    ok = torch.cat(ok).tolist()
    skipped = [p for p, good in zip(paths, ok, strict=True) if not good]
    warn_unreadable(skipped)
    if not feats:
        raise UserError(f"input={source}: none of its {len(paths)} image files could be read")
    unreadable_queries = [q for q in queries if q in skipped]
    check(not unreadable_queries, f"queries: {unreadable_queries[0] if unreadable_queries else ''} could not be read")
    if labels is None:  # a folder: labels from its class sub-folders, over the images that were read
        paths = [p for p, good in zip(paths, ok, strict=True) if good]
        ids, classes = folder_labels(source, [p for p, good in zip(found, ok, strict=True) if good])
        labels = [classes[y] if y is not None and y >= 0 else "" for y in ids]
    else:
        labels = [y for y, good in zip(labels, ok, strict=True) if good]
        paths = [p for p, good in zip(paths, ok, strict=True) if good]
    rows = list(zip(paths, labels, strict=True))
    emb = torch.cat(feats)
    check_features(emb, ckpt_path, f"input={source}")
    if cfg.normalize:
        emb = F.normalize(emb, dim=1)
    result = {"checkpoint": str(ckpt_path.resolve()), "input": source, "n": len(rows),
              "feature_dim": int(emb.shape[1]), "normalized": bool(cfg.normalize), "skipped": skipped,
              "epoch": ckpt["epoch"], "method": train_cfg.method._target_, "checksum": ckpt.get("checksum"),
              "image_size": size, "channels": channels}
    names = ["embeddings.npy", "index.csv", "embed.json"] + ["neighbours.png", "neighbours.csv"] * bool(cfg.neighbours)
    if shared:

        names.append(SHARED)
        result["image_text_embeddings"] = str(out_dir / SHARED)  # what cl-search reads
    with files.whole(*(out_dir / n for n in names)) as tmp:  # a stopped cl-embed leaves all of them or none
        np.save(tmp[0], emb.numpy().astype(np.float32))
        if shared:
            np.save(tmp[-1], torch.cat(shared).numpy().astype(np.float32))
        with open(tmp[1], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "path", "label"])
            w.writerows((i, path, label) for i, (path, label) in enumerate(rows))
        if cfg.neighbours:
            result["neighbours"] = _neighbours(cfg, emb, rows, queries, size, channels, tmp[3], tmp[4])
            result["neighbours"]["png"] = str(out_dir / "neighbours.png")
        tmp[2].write_text(json.dumps(result, indent=2) + "\n")
    if cfg.neighbours and ckpt_path.parent.name == "checkpoints":  # the training run's tracker gets the picture
        from .loggers import eval_to_tracker

        eval_to_tracker(train_cfg, ckpt_path.parent.parent, {}, {"neighbours": out_dir / "neighbours.png"},
                        int(ckpt["step"]))
    return result


def _query_keys(cfg: DictConfig, source: str, paths: list[str]) -> list[str]:
    """The index paths of `queries=` (files of the input, or dataset:split:i rows), checked."""
    if not cfg.neighbours:
        return []
    known, keys = set(paths), []
    for q in cfg.queries:
        key = str(q) if str(q).startswith(f"{source}:") else str(Path(os.path.expanduser(str(q))).resolve())
        check(key in known, f"queries: {q} is not one of the images of input={source}")
        keys.append(key)
    return keys


def _neighbours(cfg: DictConfig, emb: torch.Tensor, rows: list, query_keys: list[str], size: int, channels: int,
                png: Path, table: Path) -> dict:
    """The K nearest rows (cosine, itself excluded) of each query: exact search, chunked."""
    k = min(int(cfg.neighbours), len(rows) - 1)
    check(k >= 1, f"neighbours={cfg.neighbours}: the input has {len(rows)} readable image(s), too few for a neighbour")
    if k < cfg.neighbours:
        log.warning("neighbours=%d: the input has %d readable images, so each query gets the other %d", cfg.neighbours,
                    len(rows), k)
    if query_keys:
        where = {path: i for i, (path, _) in enumerate(rows)}
        queries = [where[key] for key in query_keys]
    else:
        g = np.random.default_rng(cfg.seed)
        queries = sorted(g.choice(len(rows), size=min(cfg.num_queries, len(rows)), replace=False).tolist())
    unit = F.normalize(emb, dim=1)
    hits = []
    for q in queries:
        sim = torch.cat([unit[q : q + 1] @ unit[s : s + 65536].t() for s in range(0, len(unit), 65536)], 1)[0]
        sim[q] = -float("inf")
        top = sim.topk(k)
        hits.append(list(zip(top.indices.tolist(), [round(v, 4) for v in top.values.tolist()], strict=True)))

    _neighbour_png(png, queries, hits, lambda i: row_picture(rows[i][0], size, channels, cfg.paths.data_dir))
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query_row", "query_path", "rank", "row", "path", "cosine"])
        for q, row_hits in zip(queries, hits, strict=True):
            w.writerows((q, rows[q][0], r + 1, i, rows[i][0], s) for r, (i, s) in enumerate(row_hits))
    return {"k": k, "queries": queries}


def row_picture(path: str, size: int, channels: int, data_dir: str) -> np.ndarray:
    """The image of an index row, for a picture: a file (at 64 px at least), or a named dataset's row."""
    shard, _, key = path.rpartition("#")
    if os.path.isfile(path) or os.path.isfile(shard):
        import io

        from PIL import Image

        from .data.images import pil_to_uint8
        from .data.samples import shard_image

        with Image.open(path if os.path.isfile(path) else io.BytesIO(shard_image(shard, key))) as img:
            x = pil_to_uint8(img, max(size, 64), channels)
    else:  # dataset:split:index
        x = _named_image(path, data_dir)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


_loaded: dict = {}


def _dataset_cfg(name: str, data_dir: str):
    node = OmegaConf.load(resources.files("contrastive_cli.configs").joinpath("dataset", f"{name}.yaml"))
    return OmegaConf.create({"dataset": node, "paths": {"data_dir": data_dir}}).dataset


def _named_splits(name: str, data_dir: str) -> dict:
    """A named dataset's evaluation splits, loaded once per process."""
    if (name, data_dir) not in _loaded:
        s = build(_dataset_cfg(name, data_dir).source, "dataset")
        _loaded[name, data_dir] = {"train": s.eval_train, "test": s.test}
    return _loaded[name, data_dir]


def _named_image(key: str, data_dir: str) -> torch.Tensor:
    name, split, i = key.split(":")
    return _named_splits(name, data_dir)[split].images[int(i)]
