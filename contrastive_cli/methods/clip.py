"""Image-text contrastive learning: CLIP (Radford et al. 2021, arXiv:2103.00020) and SigLIP (Zhai et
al. 2023, arXiv:2303.15343). The image tower is the configured encoder plus a linear projection, the text
tower the `text_encoder` group's; both land in one embedding space. A batch's labels say which captions
its images have: the row numbers of a pairs file, or the classes of a labelled dataset, each image then
captioned by a template drawn per step ("a photo of a {}.")."""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch import Tensor, nn

from ..captions import TRAIN_TEMPLATES, read_lines, read_templates
from ..data.pairs import PairImages
from ..distributed import gather_with_grad, rank_and_world
from ..errors import UserError, check, positive
from ..losses import clip_loss, siglip_loss
from ..open_clip_towers import build_towers
from ..open_clip_towers import check_data as check_open_clip_data
from .base import Method, StepOutput

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100)  # CLIP and open_clip clamp exp(logit_scale) to at most 100 after each step


def _tokens(tokenizer, length: int, texts: list[str]) -> Tensor:
    return tokenizer.encode(texts, length)[0].int()


class ImageText(Method):
    """What CLIP and SigLIP share: the towers, the captions, the logit-scale clamp."""

    supervised = True  # a batch's labels are its caption keys: the data check refuses a split without them

    def __init__(self, encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 128, logit_scale: float = 1.0,
                 logit_bias: float | None = None, templates: str | None = None, classnames: str | None = None,
                 towers: str = "own", model: str | None = None, pretrained: str | None = None,
                 model_config: str | None = None, eval_templates: str | None = None):
        check(towers in ("own", "open_clip"), f"method.towers={towers}: choose from own, open_clip")
        scale = torch.tensor(math.log(logit_scale))
        bias = torch.tensor(float(logit_bias)) if logit_bias is not None else None
        if towers == "open_clip":  # a published model's towers and its own starting scale
            check(model is not None, "method.towers=open_clip: give method.model=NAME (e.g. ViT-B-32)")
            encoder, text_encoder, (start, start_bias) = build_towers(model, pretrained, model_config)
            embed_dim, scale = encoder.feature_dim, start
            bias = start_bias if start_bias is not None and bias is not None else bias
        super().__init__(encoder)
        self.open_clip = model if towers == "open_clip" else None  # the configuration's name
        positive("method.embed_dim", embed_dim)
        self.text = text_encoder
        if self.open_clip is not None:
            self.image_proj = nn.Identity()  # open_clip's image tower ends in its own projection
        else:
            self.image_proj = nn.Linear(encoder.feature_dim, embed_dim, bias=False)
            nn.init.normal_(self.image_proj.weight, std=encoder.feature_dim**-0.5)
        self.logit_scale = nn.Parameter(scale)
        self.logit_bias = nn.Parameter(bias) if bias is not None else None
        self.templates, self.classnames, self.eval_templates = templates, classnames, eval_templates
        self.captions: Tensor | None = None  # tokens: (rows, L) for pairs, (templates, classes, L) for templates
        self.by_class = False

    def use_data(self, train, dataset_cfg) -> list[str]:
        """Tokenize the training split's captions once (pairs), or its class names in the templates."""
        tok, length = self.text.tokenizer, self.text.context_length
        name = dataset_cfg.name
        if self.eval_templates:  # read by the zero-shot score after an epoch: a bad file is found now
            read_templates(self.eval_templates, (), "method.eval_templates")
        if self.open_clip is not None:
            check_open_clip_data(self.encoder, dataset_cfg, self.open_clip)
        if isinstance(train, PairImages):
            tokens, cut = tok.encode(train.captions, length)
            self.captions, self.by_class = tokens.int(), False
            what = f"{len(train.captions)} captions"
        elif getattr(train, "has_captions", False):  # shards: the workers tokenize each batch's .txt captions
            train.tokenize = functools.partial(_tokens, tok, length)
            return [f"captions from the shards' .txt files, tokenized per batch ({tok.name}, context {length}; "
                    f"longer ones truncated)"]
        else:
            classes = list(getattr(train, "classes", None) or [])
            labeled = getattr(train, "all_labeled", None)
            if labeled is None:
                labeled = not bool((torch.as_tensor(train.labels) < 0).any())
            if dataset_cfg.get("captions", "templates") != "templates" or not classes or not labeled:
                raise UserError(f"method={self.method_name} needs captions: dataset {name} has none (its images are not "
                                f"all labelled with class names to caption); use dataset=pairs dataset.source.path=FILE "
                                f"(a .csv/.tsv/.jsonl of image paths and captions), or a labelled dataset with "
                                f"dataset.captions=templates")
            if self.classnames:  # the names to caption with (another language, better words than "0".."9")
                n_cls = int(torch.as_tensor(train.labels).max()) + 1 if hasattr(train, "labels") else len(classes)
                classes = read_lines(self.classnames, "method.classnames")
                if len(classes) < n_cls:
                    raise UserError(f"method.classnames={self.classnames}: names {len(classes)} classes; dataset {name} "
                                    f"has {n_cls} (one name per line, in class order)")
            templates = read_templates(self.templates, TRAIN_TEMPLATES, "method.templates")
            texts = [t.format(c) for t in templates for c in classes]
            tokens, cut = tok.encode(texts, length)
            self.captions, self.by_class = tokens.int().view(len(templates), len(classes), -1), True
            what = f"{len(templates)} templates x {len(classes)} class names"
            log.info("%s learns from the labels of dataset %s through text: each image captioned with its class name in "
                     "one of %d templates (\"%s\"); a pairs file of your own captions is what the method is for",
                     self.method_name, name, len(templates), templates[0])
        lines = [f"{what} tokenized ({tok.name}, context {length})"]
        if cut:
            lines.append(f"{cut} caption(s) longer than text_encoder.context_length={length} tokens truncated")
        return lines

    @classmethod
    def eval_encoder(cls, encoder: nn.Module, method_cfg) -> nn.Module:
        """With open_clip's towers, the image tower (its weights come from the checkpoint)."""
        if method_cfg.get("towers", "own") != "open_clip":
            return encoder
        return build_towers(method_cfg.model, None, method_cfg.get("model_config"))[0]

    @property
    def method_name(self) -> str:
        return type(self).__name__.lower()

    def caption_tokens(self, keys: Tensor) -> Tensor:
        """The (B, L) tokens of a batch's captions, looked up by its labels."""
        if keys.ndim == 2:  # the batch carries its captions' tokens (shards with .txt)
            return keys.long()
        if self.captions is None:
            raise RuntimeError("use_data() has not been given the training split")
        if self.captions.device != keys.device:
            self.captions = self.captions.to(keys.device)
        if not self.by_class:
            return self.captions[keys].long()
        pick = torch.randint(len(self.captions), keys.shape, device=keys.device)
        return self.captions[pick, keys].long()

    def embed_image(self, x: Tensor) -> Tensor:
        return self.image_proj(self.encoder(x))

    def embed_text(self, tokens: Tensor) -> Tensor:
        return self.text(tokens)

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        # one augmented view per image: the caption is the other "view"
        image, text = self.embed_image(x1), self.embed_text(self.caption_tokens(labels))
        # under DDP each rank scores its own rows against the global batch (open_clip's local loss)
        offset = rank_and_world()[0] * len(image)
        loss = self.loss(image, text, offset)
        return StepOutput(loss, image, text)

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.text.tokenizer.encode(texts, self.text.context_length)[0]


class CLIP(ImageText):
    """Symmetric cross-entropy over the image-caption similarities, temperature learnt (from 1/0.07)."""

    def __init__(self, encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 128, init_scale: float = 1 / 0.07,
                 templates: str | None = None, classnames: str | None = None, towers: str = "own",
                 model: str | None = None, pretrained: str | None = None, model_config: str | None = None,
                 eval_templates: str | None = None):
        super().__init__(encoder, text_encoder, embed_dim, positive("method.init_scale", init_scale), None, templates,
                         classnames, towers, model, pretrained, model_config, eval_templates)

    def loss(self, image: Tensor, text: Tensor, offset: int) -> Tensor:
        return clip_loss(image, text, gather_with_grad(image), gather_with_grad(text), self.logit_scale, offset)


class SigLIP(ImageText):
    """A sigmoid per (image, caption) pair, with a learnt scale (from 10) and bias (from -10)."""

    def __init__(self, encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 128, init_scale: float = 10.0,
                 init_bias: float = -10.0, templates: str | None = None, classnames: str | None = None,
                 towers: str = "own", model: str | None = None, pretrained: str | None = None,
                 model_config: str | None = None, eval_templates: str | None = None):
        super().__init__(encoder, text_encoder, embed_dim, positive("method.init_scale", init_scale), init_bias,
                         templates, classnames, towers, model, pretrained, model_config, eval_templates)

    def loss(self, image: Tensor, text: Tensor, offset: int) -> Tensor:
        return siglip_loss(image, gather_with_grad(text), self.logit_scale, self.logit_bias, offset)
