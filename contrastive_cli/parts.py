"""What training and evaluation both build from a config: the device and the model. Kept apart
from train.py so evaluate.py needs nothing from the training entry point."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from .config import build
from .errors import check


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    check(dev.type != "cuda" or torch.cuda.is_available(), f"device={name}: CUDA is not available here (use auto or cpu)")
    check(dev.type != "cuda" or dev.index is None or dev.index < torch.cuda.device_count(),
          f"device={name}: this machine has {torch.cuda.device_count() if dev.type == 'cuda' else 0} CUDA device(s)")
    return dev


def build_model(cfg: DictConfig):
    """Encoder and method from the config; shared by training, resume and evaluation. The encoder
    returned is the method's (CPC's wraps the configured one): what checkpoints store and cl-eval runs."""
    towers = {"encoder": build(cfg.encoder, "encoder")}
    if cfg.get("text_encoder") is not None:  # the image-text methods' second tower, in their shared space
        towers["text_encoder"] = build(cfg.text_encoder, "text_encoder", embed_dim=cfg.method.embed_dim)
    method = build(cfg.method, "method")(**towers)
    return method.encoder, method


def unlabeled_message(ds, what: str) -> str:
    """One line for a dataset without labels: what cannot be done, and cl-embed instead."""
    if ds.name == "pairs":
        return f"dataset pairs ({ds.source.path}) has captions but no class labels: {what}; cl-eval scores retrieval on the held-out pairs"
    if ds.name == "shards":
        return (f"dataset shards ({ds.source.path}) has no .cls labels (or no held-out test-*.tar): {what}; pack a "
                f"folder with class sub-folders, give dataset.source.test_path=<labelled shards>, or score on a "
                f"labelled dataset (cl-eval checkpoint=... dataset=fashion_mnist); for embeddings and nearest "
                f"neighbours use cl-embed checkpoint=<run>/checkpoints/last.pt input={ds.source.path}")
    root = ds.source.get("root", "<folder>")
    return (f"dataset {ds.name} at {root} has no labels (a flat folder or a single class): {what}; k-NN and the "
            f"linear probe need class sub-folders (root/<class>/<image>); for embeddings and nearest neighbours "
            f"use cl-embed checkpoint=<run>/checkpoints/last.pt input={root}")
