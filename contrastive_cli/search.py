"""cl-search: sentences (or an image) against the image embeddings cl-embed wrote with a CLIP/SigLIP
checkpoint: exact cosine top-k, a picture of each query's images with their scores, and a table."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import checkpoint, files
from .embed import SHARED, row_picture
from .errors import UserError, check, positive
from .parts import resolve_device
from .progress import bar

log = logging.getLogger(__name__)


def validate_search_job(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    from .config import finite_and_present, unknown_top_keys

    finite_and_present(cfg)
    unknown_top_keys(cfg, ("checkpoint", "index", "text", "image", "k", "device", "batch_size", "paths"))
    positive("k", cfg.k, integer=True)
    positive("batch_size", cfg.batch_size, integer=True)
    texts = query_texts(cfg.text)
    check(texts or cfg.image, "text: give a query, e.g. text='a red dress' or text='[a cat, a dog]' (or image=PATH)")
    return cfg


def query_texts(text) -> list[str]:
    """`text=` as a list of non-empty sentences (one string, or a list of them)."""
    if text is None:
        return []
    texts = [str(t) for t in text] if OmegaConf.is_list(text) or isinstance(text, list) else [str(text)]
    empty = [t for t in texts if not t.strip()]
    check(not empty, f"text={texts}: a query is empty; give words to search for")
    return texts


def read_image(path: str):
    """A query image (image=PATH) as a PIL image, or one line saying why not."""
    from PIL import Image

    try:
        with Image.open(Path(path).expanduser()) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"image={path}: not a readable image ({type(e).__name__})") from None


def load_index(folder: str, ckpt_path: Path, ckpt: dict) -> tuple[torch.Tensor, list[tuple[str, str]], dict]:
    """The shared-space embeddings, rows (path, label) and embed.json of a cl-embed folder made by this checkpoint."""
    root = Path(folder).expanduser()
    meta_path = root / "embed.json"
    if not meta_path.is_file():
        raise UserError(f"index={folder}: not a cl-embed output folder (no embed.json); run cl-embed "
                        f"checkpoint={ckpt_path} input=<your images> and give its folder")
    meta = json.loads(meta_path.read_text())
    if meta.get("checksum") != ckpt.get("checksum") or not (root / SHARED).is_file():
        raise UserError(f"index={folder}: made by the checkpoint {meta.get('checkpoint')}, not {ckpt_path.resolve()} "
                        f"(embeddings of another model are in another space); run cl-embed checkpoint={ckpt_path} "
                        f"input={meta.get('input', '<your images>')}")
    emb = torch.from_numpy(np.load(root / SHARED))
    with open(root / "index.csv", newline="") as f:
        rows = [(r["path"], r["label"]) for r in csv.DictReader(f)]
    check(len(rows) == len(emb), f"index={folder}: index.csv has {len(rows)} rows for {len(emb)} embeddings")
    return emb, rows, meta


def run_search(cfg: DictConfig, out_dir: Path) -> dict:
    from .api import load_clip

    ckpt_path, _ = checkpoint.for_use(cfg.checkpoint)
    device = resolve_device(cfg.device)
    model = load_clip(ckpt_path, device)
    emb, rows, meta = load_index(cfg.index, ckpt_path, model.checkpoint)
    texts = query_texts(cfg.text)
    queries = [(t, model.encode_text([t])) for t in texts]
    if cfg.image:
        queries.append((f"image {cfg.image}", model.encode_image([read_image(str(cfg.image))])))
    k = min(int(cfg.k), len(rows))
    if k < cfg.k:
        log.warning("k=%d: the index holds %d images, so each query gets all of them", cfg.k, len(rows))
    unit = F.normalize(emb.float(), dim=1).to(device)
    hits = []
    for _, q in bar(queries, len(queries), "searching", delay=1.0):
        sim = torch.cat([q.to(device) @ unit[s : s + 65536].t() for s in range(0, len(unit), 65536)], 1)[0]
        top = sim.topk(k)
        hits.append(list(zip(top.indices.tolist(), top.values.tolist(), strict=True)))
    result = {"checkpoint": str(ckpt_path.resolve()), "index": str(Path(cfg.index).expanduser().resolve()),
              "k": k, "queries": [name for name, _ in queries], "n_index": len(rows)}
    with files.whole(out_dir / "search.png", out_dir / "search.csv", out_dir / "search.json") as tmp:
        with open(tmp[1], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["query", "rank", "row", "path", "label", "cosine"])
            for (name, _), row_hits in zip(queries, hits, strict=True):
                w.writerows((name, r + 1, i, rows[i][0], rows[i][1], round(s, 4)) for r, (i, s) in enumerate(row_hits))
        _search_png(tmp[0], queries, hits, rows, meta, cfg.paths.data_dir)
        tmp[2].write_text(json.dumps(result, indent=2) + "\n")
    return result


def _search_png(path: Path, queries, hits, rows, meta: dict, data_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    k = len(hits[0])
    cols = min(k, 8)
    lines = -(-k // cols)
    fig, axes = plt.subplots(len(queries) * lines, cols, figsize=(1.6 * cols, 2.2 * len(queries) * lines), dpi=100,
                             squeeze=False)
    for q, ((name, _), row_hits) in enumerate(zip(queries, hits, strict=True)):
        for j in range(lines * cols):
            ax = axes[q * lines + j // cols][j % cols]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= k:
                ax.axis("off")
                continue
            i, score = row_hits[j]
            img = row_picture(rows[i][0], int(meta.get("image_size", 64)), int(meta.get("channels", 3)), data_dir)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xlabel(f"{score:.3f}", fontsize=8)
        axes[q * lines][0].set_title(f"“{name}”" if not name.startswith("image ") else name, fontsize=9, loc="left",
                                     color="C3")
    fig.suptitle(f"{len(queries)} queries and their {k} nearest images by cosine similarity", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path)
    plt.close(fig)
