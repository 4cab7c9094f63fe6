"""cl-export: the encoder alone, as a state_dict, TorchScript or ONNX file, with a JSON that says what
it expects (input size, channels, mean/std) and gives (feature size). Every file is checked right
after writing: its features must equal the checkpoint's, else it is removed and the command fails."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import checkpoint, files
from .api import encoder_from_checkpoint
from .config import FORMATS
from .errors import UserError, check
from .zeroshot import image_text_towers

log = logging.getLogger(__name__)

TOLERANCE = {"state_dict": 1e-5, "torchscript": 1e-5, "onnx": 1e-4}


def torchvision_recipe(enc_cfg) -> dict | None:
    """How a ResNet state_dict loads into plain torchvision (None for other encoders)."""
    if not str(enc_cfg.get("_target_", "")).endswith("encoders.resnet"):
        return None
    channels, size = int(enc_cfg.in_channels), int(enc_cfg.image_size)
    small = enc_cfg.small_stem if enc_cfg.small_stem != "auto" else size <= 64
    conv1 = (f"nn.Conv2d({channels}, 64, 3, stride=1, padding=1, bias=False)" if small else
             (f"nn.Conv2d({channels}, 64, 7, stride=2, padding=3, bias=False)" if channels != 3 else None))
    return {"model": f"torchvision.models.{enc_cfg.arch}(weights=None)", "conv1": conv1,
            "maxpool": "nn.Identity()" if small else None, "fc": "nn.Identity()", "small_stem": bool(small),
            "arch": str(enc_cfg.arch), "in_channels": channels}


def plain_torchvision(recipe: dict) -> nn.Module:
    """The torchvision model the recipe describes, built the way the JSON tells a user to."""
    import torchvision

    model = getattr(torchvision.models, recipe["arch"])(weights=None)
    c = recipe["in_channels"]
    if recipe["small_stem"]:
        model.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False)
    model.fc = nn.Identity()
    return model


def _require_onnx() -> None:
    """The exporter needs onnx, the check needs onnxruntime: both, before any work."""
    for package in ("onnx", "onnxruntime"):
        try:
            __import__(package)
        except ModuleNotFoundError:
            raise UserError(f"format=onnx: needs the {package} package; pip install 'contrastive_cli[onnx]'") from None


def _write(fmt: str, encoder: nn.Module, example: torch.Tensor, path: str, name: str = "images") -> None:
    if fmt == "state_dict":
        torch.save(encoder.state_dict(), path)
    elif fmt == "torchscript":
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(encoder, example), path)
    else:  # the TorchScript-based exporter: no onnxscript needed, and dynamic batch size by dynamic_axes
        # PRESERVE: a text tower is exported in train mode (see run_export); EVAL would switch it back
        torch.onnx.export(encoder, (example,), path, input_names=[name], output_names=["features"],
                          dynamic_axes={name: {0: "batch"}, "features": {0: "batch"}}, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE)


def _read_features(fmt: str, path: str, x: torch.Tensor, rebuild, name: str = "images") -> torch.Tensor:
    """Features of x from the written file, read back the way a user without this package would."""
    if fmt == "state_dict":
        model = rebuild()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        with torch.no_grad():
            return model.eval()(x)
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(path, map_location="cpu")(x)
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["features"], {name: x.numpy()})[0])


def _write_checked(fmt: str, encoder: nn.Module, example, check_x, expected, rebuild, tmp: Path,
                   name: str = "images") -> float:
    """Write to `tmp`, read it back and compare; returns the largest difference."""
    with warnings.catch_warnings():  # torch.jit and the TorchScript ONNX exporter warn that they are old
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
        try:
            _write(fmt, encoder, example, str(tmp), name)
            got = _read_features(fmt, str(tmp), check_x, rebuild, name)
        except (UserError, OSError):
            raise
        except Exception as e:  # tracing, exporting or reading back can fail in many ways: one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"format={fmt}: this encoder could not be exported ({reason})") from None
    if got.shape != expected.shape:
        raise UserError(f"format={fmt}: the written file gives features of shape {tuple(got.shape)}, the "
                        f"checkpoint {tuple(expected.shape)}; nothing was written")
    diff = float((got - expected).abs().max())
    allowed = TOLERANCE[fmt] * max(1.0, float(expected.abs().max()))  # relative for large features
    if not diff <= allowed:
        raise UserError(f"format={fmt}: the written file's features differ from the checkpoint's by {diff:.2e} "
                        f"(allowed {allowed:.1e}); nothing was written")
    return diff


def run_export(cfg: DictConfig) -> dict:
    fmt = str(cfg.format)
    check(fmt in FORMATS, f"format={fmt}: choose from {', '.join(FORMATS)}")
    ckpt_path, ckpt = checkpoint.for_use(cfg.checkpoint)
    encoder, train_cfg = encoder_from_checkpoint(ckpt, ckpt_path)
    towers = image_text_towers(ckpt, ckpt_path, train_cfg)
    if towers is not None:  # CLIP / SigLIP: the image tower into the shared space, and the text tower beside it
        encoder = towers[0]
    ds = train_cfg.dataset
    size, channels = int(ds.image_size), int(ds.channels)
    out = (Path(str(cfg.out)).expanduser() if cfg.out else
           ckpt_path.resolve().parent.parent / "export" / f"{ckpt_path.stem}{FORMATS[fmt]}")
    check(not out.is_dir(), f"out={out}: is a folder; give a file name")
    if fmt == "onnx":
        _require_onnx()
    g = torch.Generator().manual_seed(0)
    example, check_x = torch.randn(2, channels, size, size, generator=g), torch.randn(5, channels, size, size, generator=g)
    with torch.no_grad():
        expected = encoder(check_x)
    # a plain torchvision model only where the encoder is the configured one, not a method's wrapper of it
    recipe = torchvision_recipe(train_cfg.encoder) if type(encoder).__module__.startswith("torchvision") else None

    def rebuild() -> nn.Module:  # state_dict: plain torchvision for a ResNet, else the encoder class the JSON names
        if towers is not None:
            return image_text_towers(ckpt, ckpt_path, train_cfg)[0]
        return plain_torchvision(recipe) if recipe is not None else encoder_from_checkpoint(ckpt)[0]

    created = not out.parent.exists()
    meta = {
        "format": fmt, "file": str(out), "checkpoint": str(ckpt_path.resolve()), "epoch": ckpt["epoch"],
        "method": train_cfg.method._target_, "encoder": OmegaConf.to_container(train_cfg.encoder, resolve=True),
        "input_size": size, "channels": channels, "mean": list(ds.mean), "std": list(ds.std),
        "input": f"float32 (N, {channels}, {size}, {size}): uint8 pixels / 255, then (x - mean) / std per channel",
        "feature_dim": int(expected.shape[1]),
    }
    if fmt == "state_dict" and recipe is not None:
        meta["torchvision"] = recipe
    outputs = [out, f"{out}.json"]
    if towers is not None:
        text_out = out.parent / (out.name[: -len(FORMATS[fmt])] if out.name.endswith(FORMATS[fmt]) else out.name)
        text_out = text_out.parent / f"{text_out.name}.text{FORMATS[fmt]}"
        outputs.append(text_out)
        meta["embedding"] = f"L2-normalized {int(expected.shape[1])}-d, in the space shared with the text tower"
    try:  # the files and their JSON, or none (a file without its JSON would be half an export)
        with files.whole(*outputs, label=f"out={out}") as tmp:
            meta["max_abs_diff"] = _write_checked(fmt, encoder, example, check_x, expected, rebuild, tmp[0])
            if towers is not None:
                meta["text"] = _export_text(fmt, towers, ckpt, ckpt_path, train_cfg, tmp[2], outputs[2])
            tmp[1].write_text(json.dumps(meta, indent=2) + "\n")
    except UserError:
        if created and out.parent.is_dir() and not any(out.parent.iterdir()):
            out.parent.rmdir()
        raise
    return meta


def _export_text(fmt: str, towers, ckpt, source, cfg, tmp: Path, final: Path) -> dict:
    text = towers[1]
    tok, length = text.text.tokenizer, text.text.context_length
    example = tok.encode(["a photo of a cat.", "two dogs on a sofa"], length)[0]
    check_x = tok.encode(["x", "a red dress with long sleeves", "一只猫坐在垫子上", "sandal", "a 7."], length)[0]
    with torch.no_grad():
        expected = text(check_x)
    diff = _write_checked(fmt, text, example, check_x, expected, lambda: image_text_towers(ckpt, source, cfg)[1],
                          tmp, name="tokens")
    return {"file": str(final), "tokenizer": tok.name, "context_length": length, "vocab_size": tok.vocab_size,
            "sot": tok.sot, "eot": tok.eot, "pad": tok.pad, "lowercase": tok.lowercase, "max_abs_diff": diff,
            "input": f"int64 (N, {length}) token ids: [sot, the caption's ids, eot, then pad to {length}] "
                     f"({'UTF-8 bytes + 3' if tok.name == 'bytes' else 'open_clip SimpleTokenizer ids'}"
                     f"{' of the lowercased caption' if tok.lowercase else ''})"}
