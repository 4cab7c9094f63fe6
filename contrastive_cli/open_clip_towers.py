"""open_clip's model configurations as the two towers of method=clip / method=siglip
(`method.towers=open_clip method.model=ViT-B-32 method.pretrained=/path/to/weights.pt`): most users
fine-tune a published CLIP on their own pairs. The weights come from a local file, never a download;
the images must be the size and normalization the model was trained with, and the tokenizer is CLIP's."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor, nn

from .errors import UserError, check

log = logging.getLogger(__name__)


def _open_clip():
    try:
        import open_clip
    except ModuleNotFoundError:
        raise UserError("method.towers=open_clip needs open_clip: pip install 'contrastive-cli[clip]'") from None
    return open_clip


class OpenClipImage(nn.Module):
    """open_clip's image tower; its output is already in the shared space (feature_dim = embed_dim)."""

    def __init__(self, visual: nn.Module, embed_dim: int):
        super().__init__()
        self.visual, self.feature_dim = visual, embed_dim
        size = getattr(visual, "image_size", None)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size) if size is not None else None
        self.preprocess_cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})

    def forward(self, x: Tensor) -> Tensor:
        return self.visual(x)


class OpenClipText(nn.Module):
    """open_clip's text tower (token embedding, transformer, final norm, projection) with CLIP's tokenizer."""

    def __init__(self, model: nn.Module, embed_dim: int):
        super().__init__()
        from .text import BPETokenizer

        self.model, self.feature_dim = model, embed_dim
        self.context_length = int(model.context_length)
        self.tokenizer = BPETokenizer()

    def forward(self, tokens: Tensor, trim: bool = True) -> Tensor:
        # open_clip's positional embedding and causal mask are for the whole context: never trimmed
        return self.model.encode_text(tokens)


def build_towers(model: str, pretrained: str | None = None, model_config: str | None = None):
    """(image tower, text tower, the model's logit scale and bias or None) of an open_clip configuration,
    with the weights of a local file when `pretrained` is given."""
    open_clip = _open_clip()
    if model_config:
        path = Path(model_config).expanduser()
        check(path.is_file(), f"method.model_config={model_config}: no such file (an open_clip model JSON)")
        open_clip.add_model_config(str(path))
    if model not in open_clip.list_models():
        raise UserError(f"method.model={model}: not an open_clip model configuration (e.g. ViT-B-32, RN50, "
                        f"convnext_base; all: open_clip.list_models()), or give method.model_config=FILE.json")
    text_cfg = (open_clip.get_model_config(model) or {}).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
        raise UserError(f"method.model={model}: its text tower is a Hugging Face model and tokenizer, which need a "
                        f"download; choose a configuration with CLIP's own tokenizer (ViT-B-32, RN50, ...)")
    if pretrained is not None:
        check(Path(str(pretrained)).expanduser().is_file(),
              f"method.pretrained={pretrained}: not a file; give a local weights file (nothing is downloaded at run "
              f"time: download it once, e.g. from the model's page, and give its path)")
    try:
        clip = open_clip.create_model(model, pretrained=str(Path(pretrained).expanduser()) if pretrained else None,
                                      load_weights=pretrained is not None)
    except UserError:
        raise
    except Exception as e:  # a file of another model, a truncated file: one line
        raise UserError(f"method.pretrained={pretrained}: could not be loaded into {model} "
                        f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    embed_dim = int(clip.text_projection.shape[1] if isinstance(clip.text_projection, Tensor)
                    else clip.text_projection.out_features)
    visual = clip.visual
    clip.visual = None  # the text tower keeps the rest; each parameter in one tower only
    scale = clip.logit_scale.detach().clone()
    del clip.logit_scale  # the method's own scale starts from it (a published model's, about ln 100)
    bias = None
    if getattr(clip, "logit_bias", None) is not None:
        bias = clip.logit_bias.detach().clone()
        del clip.logit_bias
    return OpenClipImage(visual, embed_dim), OpenClipText(clip, embed_dim), (scale, bias)


def check_data(image: OpenClipImage, ds, model: str) -> None:
    """The dataset must give the images this model was made for."""
    if image.image_size is not None and int(ds.image_size) != image.image_size:
        raise UserError(f"dataset.image_size={ds.image_size}: open_clip {model} takes {image.image_size} px images; "
                        f"set dataset.image_size={image.image_size}")
    check(int(ds.channels) == 3, f"dataset.channels={ds.channels}: open_clip {model} takes RGB images (3 channels)")
    mean, std = image.preprocess_cfg.get("mean"), image.preprocess_cfg.get("std")
    if mean is not None and (max(abs(a - b) for a, b in zip(mean, ds.mean, strict=True)) > 1e-3
                             or max(abs(a - b) for a, b in zip(std, ds.std, strict=True)) > 1e-3):
        log.warning("dataset.mean/std %s/%s differ from what open_clip %s was trained with (%s/%s); give "
                    "dataset.mean='%s' dataset.std='%s'", list(ds.mean), list(ds.std), model,
                    [round(m, 4) for m in mean], [round(s, 4) for s in std], [round(m, 4) for m in mean],
                    [round(s, 4) for s in std])

