"""Caption templates for the image-text methods (CLIP, SigLIP): the class names of a labelled dataset put
into "a photo of a {}." to caption its training images, and the other list that zero-shot classification
prompts with. Your own captions come from a pairs file or shards (the data package)."""

from __future__ import annotations

import logging

from .errors import UserError
from .files import read_text

log = logging.getLogger(__name__)

# What a templated dataset's training images are captioned with, one drawn per image and step
TRAIN_TEMPLATES = (
    "a photo of a {}.", "a picture of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
    "a cropped photo of a {}.", "a close-up photo of a {}.", "an image showing a {}.", "a {}.",
)
# What zero-shot classification prompts with: a different list, so the score is not string matching
EVAL_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a good photo of the {}.", "a rendition of the {}.",
    "art of the {}.", "a grayscale snapshot of one {}.",
)


def read_templates(path: str | None, default: tuple[str, ...], key: str) -> list[str]:
    """Templates from a text file (one per line, `{}` where the class name goes), or `default`."""
    if not path:
        return list(default)
    lines = [ln.strip() for ln in read_text(path, key).splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"{key}={path}: has no templates (one per line, with {{}} where the class name goes)")
    bad = [ln for ln in lines if "{}" not in ln]
    if bad:
        raise UserError(f"{key}={path}: template {bad[0]!r} has no {{}} for the class name")
    return lines


def read_lines(path: str, key: str) -> list[str]:
    """Non-empty lines of a text file (eval.classnames)."""
    return [ln.strip() for ln in read_text(path, key).splitlines() if ln.strip()]
