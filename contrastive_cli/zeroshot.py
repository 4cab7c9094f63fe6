"""What an image-text checkpoint (CLIP, SigLIP) is judged by besides its image tower's k-NN: zero-shot
classification from class names put into prompt templates, and image<->caption retrieval on held-out
pairs. Metrics are pure functions on embeddings; `image_text_from_checkpoint` rebuilds both towers."""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError

log = logging.getLogger(__name__)


class ImageTower(nn.Module):
    """The image encoder and its projection: normalized embeddings in the space shared with the text
    (its state_dict holds those two alone: what cl-export writes of it)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.encoder, self.image_proj = method.encoder, method.image_proj

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.image_proj(self.encoder(x)).float(), dim=1)


class TextTower(nn.Module):
    """The text tower: token ids (N, context_length) to normalized embeddings in the shared space."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.text = method.text

    def forward(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.text(tokens, trim=False).float(), dim=1)


def image_text_from_checkpoint(ckpt: dict, source) -> nn.Module:
    """The whole image-text method of a checkpoint (both towers, weights loaded, eval mode, CPU)."""
    from omegaconf import OmegaConf

    from .parts import build_model

    cfg = OmegaConf.create(ckpt["config"])
    if cfg.method.get("pretrained"):  # open_clip's towers: the weights come from the checkpoint, not that file
        cfg.method.pretrained = None
    method = build_model(cfg)[1]
    if not ckpt.get("model"):
        raise UserError(f"{source}: holds no text tower (an untrained-encoder checkpoint); use a cl-train checkpoint")
    method.load_state_dict(ckpt["model"])
    return method.eval()



def image_text_towers(ckpt: dict, source, cfg):
    """(image tower, text tower) of a CLIP / SigLIP checkpoint (eval-ready, CPU), else None: what cl-embed
    and cl-export read. The text tower is put in train mode: it has no dropout and no batch-norm, so it
    computes what eval mode does, without the fused attention kernel that tracing to ONNX cannot read."""
    if not is_image_text(cfg) or not ckpt.get("model"):
        return None
    method = image_text_from_checkpoint(ckpt, source)
    return ImageTower(method).eval(), TextTower(method).train()

@torch.no_grad()
def embed_texts(method: nn.Module, texts: list[str], device: torch.device, batch_size: int = 1024) -> Tensor:
    """Normalized text embeddings, float32 on the CPU."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = method.tokenize(texts[i : i + batch_size]).to(device)
        out.append(F.normalize(method.embed_text(tokens).float(), dim=1).cpu())
    return torch.cat(out)


@torch.no_grad()
def class_embeddings(method: nn.Module, classes: list[str], templates: list[str], device: torch.device) -> Tensor:
    """One row per class: the normalized mean of its normalized prompt embeddings (CLIP's prompt ensembling)."""
    texts = [t.format(c) for c in classes for t in templates]
    emb = embed_texts(method, texts, device).view(len(classes), len(templates), -1)
    return F.normalize(emb.mean(1), dim=1)


def zeroshot_scores(image_emb: Tensor, class_emb: Tensor, labels: Tensor) -> dict:
    """Top-1 / top-5 accuracy of the nearest class embedding (cosine); top-5 is 1.0 with at most 5 classes."""
    ranked = (image_emb @ class_emb.t()).topk(min(5, len(class_emb)), dim=1).indices
    hit = ranked == labels[:, None]
    return {"zeroshot_top1": round(float(hit[:, 0].float().mean()), 4),
            "zeroshot_top5": round(float(hit.any(1).float().mean()), 4)}


def retrieval_scores(image_emb: Tensor, text_emb: Tensor, image_of_text: Tensor, ks=(1, 5, 10)) -> dict:
    """Recall@k both ways over held-out pairs: image->text counts an image as found when ANY of its
    captions is among its k nearest captions; text->image, when a caption's own image is among its k
    nearest images. image_of_text[j] is caption j's image (a row of image_emb)."""
    sim = image_emb @ text_emb.t()  # images x captions
    own = image_of_text[None, :] == torch.arange(len(image_emb))[:, None]  # images x captions: caption j is image i's
    out = {}
    for k in ks:
        top_t = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[f"i2t_r{k}"] = round(float(own.gather(1, top_t).any(1).float().mean()), 4)
        top_i = sim.t().topk(min(k, sim.shape[0]), dim=1).indices
        out[f"t2i_r{k}"] = round(float((top_i == image_of_text[:, None]).any(1).float().mean()), 4)
    return out


def is_image_text(cfg) -> bool:
    from hydra.utils import get_class

    from .methods.clip import ImageText

    return issubclass(get_class(cfg.method._target_), ImageText)


def run_prompts(method_cfg, classes: list[str], same_data: bool = True) -> tuple[list[str], list[str], str, str]:
    """(class names, prompt templates, where each comes from) for a run's own zero-shot score: the online
    monitor's and, unless eval.classnames / eval.templates say otherwise, cl-eval's. Names: the
    method.classnames the run captioned with (on the data it trained on), else the dataset's. Prompts:
    method.eval_templates; else the held-out English list when the run trained on the built-in templates,
    else its own method.templates (a run in another language is then prompted in that language)."""
    from .captions import EVAL_TEMPLATES, TRAIN_TEMPLATES, read_lines, read_templates

    def given(key: str) -> bool:
        path = method_cfg.get(key)
        if path and not os.path.isfile(os.path.expanduser(str(path))):  # a checkpoint read elsewhere, later
            log.warning("method.%s=%s (the run's) is no longer there: zero-shot prompts without it", key, path)
            return False
        return bool(path)

    names, names_from = classes, "the dataset's class names"
    if same_data and given("classnames"):
        names = read_lines(method_cfg.classnames, "method.classnames")
        names_from = f"method.classnames={method_cfg.classnames}"
    if given("eval_templates"):
        templates = read_templates(method_cfg.eval_templates, EVAL_TEMPLATES, "method.eval_templates")
        return names, templates, names_from, f"method.eval_templates={method_cfg.eval_templates}"
    if given("templates"):
        templates = read_templates(method_cfg.templates, TRAIN_TEMPLATES, "method.templates")
        return names, templates, names_from, ("the training templates (method.templates; method.eval_templates="
                                              "FILE for held-out ones)")
    return names, list(EVAL_TEMPLATES), names_from, "the held-out templates"


def image_text_eval(ckpt: dict, source, splits, ds, e, device: torch.device) -> dict:
    """cl-eval's image-text numbers: zero-shot on a labelled test split (class names and prompts: eval.classnames
    / eval.templates, else the run's own, `run_prompts`), retrieval on held-out pairs."""
    from omegaconf import OmegaConf

    from .captions import read_lines, read_templates
    from .features import extract_features

    method = image_text_from_checkpoint(ckpt, source).to(device)
    out: dict = {}
    if splits.test is not None:
        trained = OmegaConf.create(ckpt["config"])
        classes, templates, names_from, templates_from = run_prompts(
            trained.method, list(splits.test.classes), trained.dataset.name == ds.name)
        if e.classnames:
            classes, names_from = read_lines(e.classnames, "eval.classnames"), f"eval.classnames={e.classnames}"
        if e.templates:
            templates, templates_from = read_templates(e.templates, (), "eval.templates"), f"eval.templates={e.templates}"
        n_cls = int(splits.test.labels.max()) + 1 if len(splits.test) else 0
        if len(classes) < n_cls:
            raise UserError(f"{names_from}: names {len(classes)} classes; dataset {ds.name} has {n_cls} (one name per "
                            f"line, in class order; eval.classnames=FILE to give them)")
        log.info("zero-shot prompts: %s; %s", names_from, templates_from)
        img, y = extract_features(ImageTower(method), splits.test, ds.mean, ds.std, device, e.batch_size,
                                  "zero-shot images")
        out.update(zeroshot_scores(img, class_embeddings(method, classes, templates, device), y))
        out["zeroshot_templates"] = len(templates)
    held = getattr(splits, "held_out", None)
    if held is not None:
        out.update(held_out_retrieval(method, held, ds, device, e.batch_size))
        out.update(n_retrieval_images=held.n_images, n_retrieval_captions=len(held.captions))
    return out


def held_out_retrieval(method: nn.Module, held, ds, device: torch.device, batch_size: int = 512,
                       bars: bool = True) -> dict:
    """Recall@1/5/10 both ways on a pairs file's held-out split (each image embedded once)."""
    from .features import extract_features

    img, _ = extract_features(ImageTower(method), held.distinct(), ds.mean, ds.std, device, batch_size,
                              "retrieval images", show=bars)
    return retrieval_scores(img, embed_texts(method, held.captions, device), held.image_of)


def _scored(method: nn.Module, score):
    """score() with the method in eval mode, then back in the mode it was in."""
    was = method.training
    method.eval()
    try:
        return score()
    finally:
        method.train(was)


def zeroshot_monitor(method: nn.Module, test, cfg, device: torch.device, bars: bool = True):
    """The online monitor of an image-text run on labelled data (trainer.knn_every): zero-shot top-1 on the
    test split with the run's own prompts (`run_prompts`), as cl-eval computes it; best.pt is kept by it.
    The prompt files are read here, so a bad one stops the run before its first epoch."""
    from .features import extract_features

    classes, templates, names_from, templates_from = run_prompts(cfg.method, list(test.classes))
    log.info("zero-shot monitor: %s; %d prompts: %s", names_from, len(templates), templates_from)
    ds = cfg.dataset

    def score() -> float:
        img, y = extract_features(ImageTower(method), test, ds.mean, ds.std, device, desc="zero-shot", show=bars)
        return zeroshot_scores(img, class_embeddings(method, classes, templates, device), y)["zeroshot_top1"]

    return lambda: _scored(method, score)


def retrieval_monitor(method: nn.Module, held, ds, device: torch.device, bars: bool = True):
    """The online monitor of an image-text run on a pairs file (trainer.knn_every): the mean of image->text
    and text->image recall@1 on the held-out pairs (`retrieval_r1`); best.pt is kept by it."""

    def score() -> float:
        r = held_out_retrieval(method, held, ds, device, bars=bars)
        return round((r["i2t_r1"] + r["t2i_r1"]) / 2, 4)

    return lambda: _scored(method, score)
