"""Python access to a trained encoder, for notebooks and downstream code:

    from contrastive_cli import load_encoder
    encoder, preprocess = load_encoder("outputs/train/<date>/<time>/checkpoints/last.pt")
    features = encoder(preprocess([Image.open("cat.jpg"), Image.open("dog.png")]))

and to both towers of a CLIP / SigLIP checkpoint:

    from contrastive_cli import load_clip
    model = load_clip("outputs/train/<date>/<time>/checkpoints/last.pt")
    scores = model.encode_image([Image.open("cat.jpg")]) @ model.encode_text(["a cat", "a dog"]).T
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from .augment import normalize
from .errors import UserError


class Preprocess:
    """uint8 images or PIL images -> the normalized float batch (N, C, S, S) the encoder was trained
    on: converted to its channels (grey, RGB, RGBA and palette images alike), resized to its square
    size as training resized an image folder (Pillow, bilinear), scaled by 1/255 and normalized with
    the training dataset's mean and std. Layouts: PIL images (one or a list); numpy arrays as numpy
    and Pillow hold them, H x W, H x W x C or N x H x W x C; torch tensors as torch does, H x W, C x H x W
    or N x C x H x W."""

    def __init__(self, size: int, channels: int, mean: list[float], std: list[float], device="cpu"):
        self.size, self.channels, self.mean, self.std = size, channels, list(mean), list(std)
        self.device = torch.device(device)

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, channels={self.channels}, mean={self.mean}, std={self.std})"

    def to_uint8(self, images) -> Tensor:
        """The batch as uint8 (N, C, S, S), before scaling and normalization."""
        from PIL import Image

        from .data.images import pil_to_uint8

        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, np.ndarray):  # numpy's (and Pillow's) layout: H x W [x C], or N x H x W x C
            arr = images
            if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
                arr = arr.transpose(2, 0, 1)
            elif arr.ndim == 4:
                arr = arr.transpose(0, 3, 1, 2)
            images = torch.from_numpy(np.ascontiguousarray(arr))
        if isinstance(images, Tensor):
            if images.dtype != torch.uint8:
                raise UserError(f"preprocess: images must be uint8 (0..255) or PIL images, not {images.dtype}")
            if images.ndim == 2:  # one grey H x W image
                images = images[None, None]
            elif images.ndim == 3:  # one C x H x W image
                images = images[None]
            if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
                raise UserError(f"preprocess: expected uint8 images (N, C, H, W) with C in 1, 3, 4; got shape "
                                f"{tuple(images.shape)}")
            if images.shape[1:] == (self.channels, self.size, self.size):
                return images.contiguous()
            images = [Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy() if img.shape[0] == 1
                                      else img.permute(1, 2, 0).numpy()) for img in images]
        images = list(images)
        if not images:
            raise UserError("preprocess: no images given")
        out = []
        for img in images:
            if isinstance(img, (Tensor, np.ndarray)):
                out.append(self.to_uint8(img)[0])
            elif isinstance(img, Image.Image):
                out.append(pil_to_uint8(img, self.size, self.channels))
            else:
                raise UserError(f"preprocess: cannot read a {type(img).__name__}; give PIL images or uint8 arrays")
        return torch.stack(out)

    def __call__(self, images) -> Tensor:
        return normalize(self.to_uint8(images).to(self.device), self.mean, self.std)


def encoder_from_checkpoint(ckpt: dict, source: str | Path = "the checkpoint") -> tuple[nn.Module, OmegaConf]:
    """The checkpoint's encoder (weights loaded, eval mode, CPU) and its training config; refused in one
    line naming `source` when its features on a probe batch are not finite (weights of a diverged run)."""
    from hydra.utils import get_class

    from .config import build

    cfg = OmegaConf.create(ckpt["config"])
    # the method may wrap the encoder for evaluation (CPC: patches in, features pooled over the grid)
    encoder = get_class(cfg.method._target_).eval_encoder(build(cfg.encoder, "encoder"), cfg.method)
    encoder.load_state_dict(ckpt["encoder"])
    encoder.eval()
    ds = cfg.dataset
    with torch.no_grad():
        check_features(encoder(probe_batch(ds.image_size, ds.channels, ds.mean, ds.std)), source, "a probe batch")
    return encoder, cfg


@torch.no_grad()
def probe_batch(size: int, channels: int, mean, std, n: int = 4) -> Tensor:
    """n normalized images of seeded noise (the first one mid-gray): features of sane weights are finite
    on them; a diverged encoder's are not."""
    x = torch.randint(0, 256, (n, int(channels), int(size), int(size)), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    x[0] = 128
    return normalize(x, mean, std)


def check_features(feats: Tensor, source: str | Path, what: str) -> None:
    bad = int((~torch.isfinite(feats)).flatten(1).any(1).sum()) if feats.ndim > 1 else int(~torch.isfinite(feats).all())
    if bad:
        raise UserError(f"{source}: its encoder gives non-finite features (nan/inf) on {bad} of {len(feats)} images of "
                        f"{what}: its weights are broken (a run that diverged?); use an earlier checkpoint of that run")


def load_encoder(path: str | Path, device: str | torch.device = "cpu",
                 trainable: bool = False) -> tuple[nn.Module, Preprocess]:
    """The encoder of a cl-train checkpoint (`nn.Module` in eval mode on `device`; features before
    any projector, as cl-eval uses them) and the preprocess function for its inputs. Its parameters
    track gradients only with `trainable=True` (fine-tuning); otherwise `encoder(x).numpy()` works."""
    from . import checkpoint

    encoder, cfg = encoder_from_checkpoint(checkpoint.load(path), path)
    encoder.requires_grad_(trainable)
    ds = cfg.dataset
    device = torch.device(device)
    return encoder.to(device), Preprocess(ds.image_size, ds.channels, ds.mean, ds.std, device)


class ImageTextModel:
    """Both towers of an image-text checkpoint: `encode_image(images)` (anything `preprocess` reads) and
    `encode_text(texts)` give L2-normalized embeddings in one space, float32 on the model's device."""

    def __init__(self, method: nn.Module, preprocess: Preprocess, checkpoint: dict):
        self.method, self.preprocess, self.checkpoint = method, preprocess, checkpoint
        self.tokenizer = method.text.tokenizer
        self.context_length = method.text.context_length

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.method.tokenize([texts] if isinstance(texts, str) else list(texts))

    @torch.no_grad()
    def encode_image(self, images) -> Tensor:
        return torch.nn.functional.normalize(self.method.embed_image(self.preprocess(images)).float(), dim=1)

    @torch.no_grad()
    def encode_text(self, texts) -> Tensor:
        tokens = self.tokenize(texts).to(self.preprocess.device)
        return torch.nn.functional.normalize(self.method.embed_text(tokens).float(), dim=1)


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> ImageTextModel:
    """The image and text towers of a `method=clip` / `method=siglip` checkpoint, with the image
    preprocess and the tokenizer it was trained with; refused in one line for any other checkpoint."""
    from . import checkpoint
    from .zeroshot import image_text_from_checkpoint, is_image_text

    ckpt = checkpoint.load(path)
    cfg = OmegaConf.create(ckpt["config"])
    if not is_image_text(cfg):
        name = cfg.method._target_.rsplit(".", 1)[-1]
        raise UserError(f"{path}: a {name} checkpoint has no text tower; load_clip and cl-search need one of "
                        "method=clip or method=siglip (load_encoder reads any checkpoint's image encoder)")
    device = torch.device(device)
    method = image_text_from_checkpoint(ckpt, path).to(device)
    ds = cfg.dataset
    with torch.no_grad():
        check_features(method.embed_image(probe_batch(ds.image_size, ds.channels, ds.mean, ds.std).to(device)), path,
                       "a probe batch")
    return ImageTextModel(method, Preprocess(ds.image_size, ds.channels, ds.mean, ds.std, device), ckpt)
