"""Typed schemas for the plain sections of the configs, and the checks Hydra does not make:
unknown keys anywhere (also those added with `+`), value ranges, and `_target_` keyword names."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, fields

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError, check, positive

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRI_STATE = ("auto", "true", "false")
PROGRESS = ("auto", "bar", "log", "none")


def check_device(name: str, value) -> None:
    check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(value)) is not None, f"{name}={value}: choose from auto, cpu, cuda, cuda:N")


@dataclass
class TrainerCfg:
    epochs: int = 30
    batch_size: int = 256
    device: str = "auto"
    precision: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    workers: int = 2
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 10
    resume: str | None = None
    knn_monitor: bool = True
    knn_every: int = 0
    progress: str = "auto"
    progress_every: int = 100
    collapse_ratio: float = 0.1
    collapse_patience: int = 2
    collapse_neg_cos: float = 0.9
    devices: int = 1
    sync_bn: bool = False
    extend: str = "tail"  # a resume with more epochs: tail (the cosine over the new length) or restart
    extend_peak: float = 0.1  # restart: the extra epochs' cosine starts at this fraction of optimizer.lr

    def __post_init__(self) -> None:
        positive("trainer.epochs", self.epochs, integer=True)
        positive("trainer.batch_size", self.batch_size, integer=True)
        positive("trainer.workers", self.workers, integer=True, strict=False)
        positive("trainer.log_every", self.log_every, integer=True)
        positive("trainer.checkpoint_every", self.checkpoint_every, integer=True)
        positive("trainer.collapse_ratio", self.collapse_ratio, strict=False)
        positive("trainer.collapse_patience", self.collapse_patience, integer=True)
        positive("trainer.knn_every", self.knn_every, integer=True, strict=False)
        positive("trainer.progress_every", self.progress_every, integer=True)
        check(self.extend in ("tail", "restart"), f"trainer.extend={self.extend}: choose from tail, restart")
        check(0 < self.extend_peak <= 1, f"trainer.extend_peak={self.extend_peak}: must be in (0, 1]")
        check(-1.0 < self.collapse_neg_cos <= 1.0, f"trainer.collapse_neg_cos={self.collapse_neg_cos}: must be in (-1, 1] "
                                                   "(1 turns this check off)")
        check(self.progress in PROGRESS, f"trainer.progress={self.progress}: choose from {', '.join(PROGRESS)}")
        positive("trainer.devices", self.devices, integer=True)
        check(self.precision in PRECISIONS, f"trainer.precision={self.precision}: choose from {', '.join(PRECISIONS)}")
        self.channels_last = str(self.channels_last).lower()
        check(self.channels_last in TRI_STATE, f"trainer.channels_last={self.channels_last}: choose from {', '.join(TRI_STATE)}")
        check_device("trainer.device", self.device)
        check(0 <= self.seed < 2**32, f"trainer.seed={self.seed}: must be an integer in [0, 2^32)")


@dataclass
class ScheduleCfg:
    warmup_epochs: float = 2.0
    final_lr_ratio: float = 0.0
    scale_lr: bool = False

    def __post_init__(self) -> None:
        positive("schedule.warmup_epochs", self.warmup_epochs, strict=False)
        check(0.0 <= self.final_lr_ratio <= 1.0, f"schedule.final_lr_ratio={self.final_lr_ratio}: must be in [0, 1]")


@dataclass
class PathsCfg:
    data_dir: str = "data"


@dataclass
class EvalCfg:
    device: str = "auto"
    batch_size: int = 512
    knn_k: int = 200
    knn_temperature: float = 0.1
    tsne_samples: int = 2000
    linear_max_iter: int = 1000
    linear_backend: str = "auto"
    seed: int = 0
    templates: str | None = None  # image-text checkpoints: a file of zero-shot prompts ({} = class name)
    classnames: str | None = None  # ... and of class names, one per line in class order

    def __post_init__(self) -> None:
        check_device("eval.device", self.device)
        positive("eval.batch_size", self.batch_size, integer=True)
        positive("eval.knn_k", self.knn_k, integer=True)
        positive("eval.knn_temperature", self.knn_temperature)
        positive("eval.tsne_samples", self.tsne_samples, integer=True, strict=False)
        positive("eval.linear_max_iter", self.linear_max_iter, integer=True)
        check(self.linear_backend in ("auto", "sklearn", "torch"),
              f"eval.linear_backend={self.linear_backend}: choose from auto, sklearn, torch")


@dataclass
class EvalPathsCfg:
    data_dir: str | None = None  # None: the data folder stored in the checkpoint
    image_root: str | None = None  # None: the image folder stored in the checkpoint


DATASET_KEYS = ("name", "image_size", "channels", "num_classes", "mean", "std", "flip_p", "source", "captions", "decode")
TRAIN_KEYS = ("method", "encoder", "dataset", "augmentation", "optimizer", "trainer", "schedule", "paths", "logger",
              "text_encoder")
EVAL_KEYS = ("checkpoint", "eval", "paths", "dataset")


def typed(section: str, node, schema: type):
    """Merge a config section onto its dataclass schema: wrong types, unknown keys and ranges fail
    here with one line each."""
    allowed = ", ".join(f.name for f in fields(schema))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = f"{section}.{e.full_key}" if getattr(e, "full_key", None) else section
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        if "not in" in msg or "ConfigKeyError" in type(e).__name__:
            raise UserError(f"{key}: unknown key; allowed: {allowed}") from None
        raise UserError(f"{key}: {msg}") from None


def unknown_top_keys(cfg: DictConfig, allowed: tuple[str, ...]) -> None:
    extra = [k for k in cfg if k not in allowed and k != "hydra"]
    check(not extra, f"{extra[0] if extra else ''}: unknown key; top-level keys are {', '.join(allowed)}")


def check_target_keys(node, path: str) -> None:
    """Every key of a `_target_` node must be a keyword of the target (recursively)."""
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        try:
            obj = get_object(node._target_)
        except Exception:
            raise UserError(f"{path}._target_={node._target_}: cannot be imported") from None
        sig = inspect.signature(obj)
        params = sig.parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            for k in node:
                if not str(k).startswith("_") and k not in params:
                    allowed = ", ".join(p for p in params if p not in ("self", "params", "encoder"))
                    raise UserError(f"{path}.{k}: unknown key; allowed: {allowed}")
    for k in node:
        if not str(k).startswith("_") and OmegaConf.is_dict(node._get_node(k)):
            check_target_keys(node[k], f"{path}.{k}")


def finite_and_present(cfg: DictConfig) -> None:
    """No ??? left unset, and no nan / inf anywhere: they pass every range check (nan < 0 is false)."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        hint = {"checkpoint": "<path to a .pt checkpoint>", "dataset.source.root": "<folder of images>",
                "dataset.source.path": "<a .csv/.tsv/.jsonl of image paths and captions>",
                "index": "<a cl-embed output folder made with this checkpoint>"}
        raise UserError(f"{missing[0]}: missing; give {missing[0]}={hint.get(missing[0], '<value>')}")
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items():
        if isinstance(value, float) and not math.isfinite(value) and not key.startswith("hydra"):
            raise UserError(f"{key}={value}: must be a finite number")


def validate_train_job(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config a cl-train job will run with (a resume's stored one), validated."""
    if cfg.trainer.get("resume"):
        cfg = resolve_resume(cfg, overrides)[0]
    validate_train(cfg)
    return cfg


def validate_train(cfg: DictConfig) -> tuple[TrainerCfg, ScheduleCfg]:
    finite_and_present(cfg)
    unknown_top_keys(cfg, TRAIN_KEYS)
    for group in ("method", "encoder", "augmentation", "optimizer"):
        check("_target_" in cfg[group], f"{group}: needs a _target_")
        check_target_keys(cfg[group], group)
    for group in ("logger", "text_encoder"):
        if cfg.get(group) is not None:
            check_target_keys(cfg[group], group)
    extra = [k for k in cfg.dataset if k not in DATASET_KEYS]
    check(not extra, f"dataset.{extra[0] if extra else ''}: unknown key; allowed: {', '.join(DATASET_KEYS)}")
    check_target_keys(cfg.dataset.source, "dataset.source")
    ds = cfg.dataset
    positive("dataset.image_size", ds.image_size, integer=True, minimum=3)
    positive("dataset.channels", ds.channels, integer=True)
    check(len(ds.mean) == ds.channels == len(ds.std),
          f"dataset.mean/std: need {ds.channels} value(s) each, one per channel")
    typed("paths", cfg.paths, PathsCfg)
    positive("optimizer.lr", cfg.optimizer.get("lr"))
    trainer, schedule = typed("trainer", cfg.trainer, TrainerCfg), typed("schedule", cfg.schedule, ScheduleCfg)
    _dry_build(cfg, trainer.batch_size)
    return trainer, schedule


def _dry_build(cfg: DictConfig, batch_size: int) -> None:
    """Build the method on a stand-in encoder, and the augmentation, so their range checks run
    before any data is loaded (and before any job of a sweep starts)."""
    from .runtime import flush_denormals, keep_freed_memory

    flush_denormals()  # a training process's first torch work is here: before OpenMP's threads start
    keep_freed_memory()
    method = stand_in_method(cfg)
    method.check_batch_size(batch_size)
    method.check_views(getattr(build(cfg.augmentation, "augmentation"), "num_views", 2))


def stand_in_method(cfg: DictConfig):
    """The configured method built on a tiny stand-in encoder: its checks and properties without the model."""
    import torch

    stand_in = torch.nn.Linear(1, 8)
    stand_in.feature_dim = 8
    towers = {"encoder": stand_in}
    if cfg.get("text_encoder") is not None:  # the real one: its settings' checks run here too
        towers["text_encoder"] = build(cfg.text_encoder, "text_encoder", embed_dim=cfg.method.get("embed_dim", 8))
    return build(cfg.method, "method")(**towers)


EMBED_KEYS = ("checkpoint", "input", "batch_size", "normalize", "neighbours", "queries", "num_queries", "seed",
              "device", "workers", "paths")
EXPORT_KEYS = ("checkpoint", "format", "out")
FORMATS = {"state_dict": ".pt", "torchscript": ".torchscript.pt", "onnx": ".onnx"}  # cl-export format: file suffix


def validate_embed_job(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    finite_and_present(cfg)
    unknown_top_keys(cfg, EMBED_KEYS)
    check(isinstance(cfg.checkpoint, str) and cfg.checkpoint != "",
          f"checkpoint={cfg.checkpoint}: give the path of a checkpoint file")
    for key in ("batch_size", "num_queries"):
        positive(key, cfg[key], integer=True)
    for key in ("neighbours", "workers"):
        positive(key, cfg[key], integer=True, strict=False)
    check(isinstance(cfg.normalize, bool), f"normalize={cfg.normalize}: true or false")
    check(OmegaConf.is_list(cfg.queries), f"queries={cfg.queries}: a list of image paths, e.g. 'queries=[a.png,b.png]'")
    check(not cfg.queries or cfg.neighbours, f"queries={list(cfg.queries)}: given with neighbours=0, which finds no "
                                             "neighbours; add neighbours=K (e.g. 8)")
    return cfg


def validate_export_job(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    finite_and_present(cfg)
    unknown_top_keys(cfg, EXPORT_KEYS)
    check(isinstance(cfg.checkpoint, str) and cfg.checkpoint != "",
          f"checkpoint={cfg.checkpoint}: give the path of a checkpoint file")
    check(cfg.format in FORMATS, f"format={cfg.format}: choose from {', '.join(FORMATS)}")
    return cfg


def validate_eval_job(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    validate_eval(cfg)
    return cfg


def validate_eval(cfg: DictConfig) -> tuple[EvalCfg, EvalPathsCfg]:
    finite_and_present(cfg)
    unknown_top_keys(cfg, EVAL_KEYS)
    check(isinstance(cfg.checkpoint, str) and cfg.checkpoint != "",
          f"checkpoint={cfg.checkpoint}: give the path of a checkpoint file")
    if cfg.get("dataset") is not None:  # transfer evaluation
        check_target_keys(cfg.dataset.source, "dataset.source")
    return typed("eval", cfg.eval, EvalCfg), typed("paths", cfg.paths, EvalPathsCfg)


def build(node, what: str, **kwargs):
    """hydra.utils.instantiate, with a UserError raised inside the target passed through as is and
    any other construction error turned into one line naming the config group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        reason = str(cause or e).strip().splitlines()[0] if str(cause or e).strip() else type(cause).__name__
        raise UserError(f"{what}: {reason}") from None


# Settings a resumed run may change: they decide how long, where and how visibly it runs, not what
# it computes (the schedule follows the new trainer.epochs from the resumed step on).
RESUMABLE = ("trainer.epochs", "trainer.device", "trainer.workers", "trainer.log_every", "trainer.checkpoint_every",
             "trainer.knn_monitor", "trainer.knn_every", "trainer.progress", "trainer.progress_every",
             "trainer.compile", "trainer.collapse_ratio", "trainer.collapse_patience", "trainer.collapse_neg_cos",
             "trainer.resume", "trainer.extend", "trainer.extend_peak", "logger", "paths.data_dir", "dataset.source.root")


def run_settings(cfg: DictConfig, choices: dict | None = None) -> dict:
    """The settings a table of runs compares, resolved (`choices`: Hydra's group options, when known)."""
    choices = choices or {}

    def name(group: str) -> str:
        node = cfg[group]
        return choices.get(group) or str(node.get("arch") or node._target_.rsplit(".", 1)[-1]).lower()

    return {"experiment": choices.get("experiment"), "method": name("method"), "encoder": name("encoder"),
            "dataset": cfg.dataset.name, "optimizer": name("optimizer"), "epochs": cfg.trainer.epochs,
            "batch_size": cfg.trainer.batch_size, "lr": cfg.optimizer.lr, "temperature": cfg.method.get("temperature"),
            "precision": cfg.trainer.precision, "seed": cfg.trainer.seed}


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys (or group names) that command-line overrides set, hydra.* left out."""
    keys = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        if key and not key.startswith(("hydra.", "hydra/")) and key != "hydra":
            keys.append(key.replace("/", "."))
    return keys


def flatten(node, prefix: str = "") -> dict:
    """{dotted key: leaf value} of a nested dict (a config as a container)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def move_data(cfg: DictConfig, data_dir: str) -> None:
    """Point a resolved config at another paths.data_dir: the dataset's root moves with it where
    it came from there (the named datasets; an image folder's root is its own setting)."""
    source = cfg.dataset.source
    if "root" in source and source.root == cfg.paths.data_dir:
        source.root = data_dir
    cfg.paths.data_dir = data_dir


def resolve_resume(cfg: DictConfig, overrides: list[str] | None = None):
    """The config a resume runs with: the checkpoint's own, plus the RESUMABLE settings asked for.
    `overrides`: the command line's (only the keys it names are compared); None compares all of
    `cfg`. Any other asked-for difference is one UserError naming the keys. Returns (cfg, path, ckpt)."""
    from . import checkpoint

    path, ckpt = checkpoint.locate(cfg.trainer.resume)
    stored = OmegaConf.create(ckpt["config"])
    mine = flatten(OmegaConf.to_container(cfg, resolve=True))
    mine.pop("hydra", None)
    theirs = flatten(OmegaConf.to_container(stored, resolve=True))
    asked = list(mine) if overrides is None else override_keys(overrides)

    def under(key: str, prefix: str) -> bool:
        return key == prefix or key.startswith(prefix + ".")

    changed = {}
    for a in dict.fromkeys(asked):
        keys = sorted(k for k in set(mine) | set(theirs)
                      if under(k, a) and not any(under(k, r) for r in RESUMABLE) and mine.get(k) != theirs.get(k))
        if len(keys) == 1:
            changed[keys[0]] = f"{keys[0]} ({theirs.get(keys[0], '-')} -> {mine.get(keys[0], '-')})"
        elif keys:  # a group: name it once
            changed[a] = f"{a} ({', '.join(k.split('.', 1)[-1] for k in keys[:3])}{' ...' if len(keys) > 3 else ''})"
    if changed:
        allowed = ", ".join(k.split(".", 1)[1] for k in RESUMABLE if k.startswith("trainer."))
        raise UserError(f"trainer.resume={cfg.trainer.resume}: a resumed run keeps the settings it was started "
                        f"with; these differ: {', '.join(changed.values())}. Only trainer.{{{allowed}}}, "
                        "paths.data_dir and dataset.source.root may change (start a new run for the rest)")
    for key in RESUMABLE:
        if any(under(key, a) or under(a, key) for a in asked) and key != "paths.data_dir" and OmegaConf.select(
                cfg, key) is not None:
            OmegaConf.update(stored, key, OmegaConf.select(cfg, key), merge=False)
    if any(under("paths.data_dir", a) for a in asked) and mine["paths.data_dir"] != theirs.get("paths.data_dir"):
        move_data(stored, mine["paths.data_dir"])
    return stored, path, ckpt
