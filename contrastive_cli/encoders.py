"""Encoders map images to feature vectors; each exposes `feature_dim`."""

from __future__ import annotations

import difflib

from torch import Tensor, nn

from .errors import UserError, positive

RESNETS = ("resnet18", "resnet34", "resnet50")


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
    # pool before the ReLU: max and ReLU commute (ReLU is monotone), so the outputs and gradients are
    # bitwise those of conv-BN-ReLU-pool, and the ReLU and its backward touch a quarter of the values
    # (a SimCLR step on small_cnn 14% faster, bf16, 1 thread of a 2-core Intel Xeon: these memory-bound
    # passes, not the convolutions, were most of its time)
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks (width, 2w, 4w, 8w), 2x2 max-pooling in the first three (a 32 px input is
    seen at 32, 16, 8 and 4 px: cheap enough for a CPU), then global average pooling."""

    def __init__(self, in_channels: int = 3, width: int = 32):
        super().__init__()
        positive("encoder.in_channels", in_channels, integer=True)
        positive("encoder.width", width, integer=True)
        w = width
        self.net = nn.Sequential(
            _block(in_channels, w, pool=True), _block(w, 2 * w, pool=True),
            _block(2 * w, 4 * w, pool=True), _block(4 * w, 8 * w, pool=False),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = 8 * w

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def resnet(arch: str = "resnet18", in_channels: int = 3, image_size: int = 224, small_stem="auto") -> nn.Module:
    """A torchvision ResNet without its classifier. The small-image stem (3x3 conv1, stride 1, no
    max-pool; SimCLR appendix B.9) keeps 32 px inputs from shrinking to 1x1 before the last stage."""
    import torchvision  # here, not at the top: its import (1.3 s) is most of a small_cnn run's start-up

    if arch not in RESNETS:
        raise UserError(f"encoder.arch={arch}: choose from {', '.join(RESNETS)}")
    positive("encoder.in_channels", in_channels, integer=True)
    if small_stem == "auto":
        small_stem = image_size <= 64
    elif not isinstance(small_stem, bool):
        raise UserError(f"encoder.small_stem={small_stem}: choose from auto, true, false")
    model = getattr(torchvision.models, arch)(weights=None)
    if small_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def timm_model(name: str = "resnet18", in_channels: int = 3, image_size: int = 32, patch_size: int | None = None,
               model_args: dict | None = None) -> nn.Module:
    """Any timm model by name, randomly initialised, without its classifier (`num_classes=0`); the
    feature size is the model's `num_features`. Models that take an image size (ViTs) get
    `image_size`, and `patch_size` when set (a 32 px image needs patches of about 4 px)."""
    try:
        import timm
    except ModuleNotFoundError as e:
        if e.name != "timm":
            raise
        raise UserError("encoder=timm: needs the timm package; pip install 'contrastive_cli[timm]'") from None
    positive("encoder.in_channels", in_channels, integer=True)
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise UserError(f"encoder.name={name}: not a timm model" + (f"; did you mean {', '.join(close)}?" if close
                        else "; timm.list_models() lists them"))
    kw = {"pretrained": False, "num_classes": 0, "in_chans": in_channels, **dict(model_args or {})}
    if patch_size is not None:
        kw["patch_size"] = positive("encoder.patch_size", patch_size, integer=True)
    try:
        model = timm.create_model(name, img_size=image_size, **kw)
    except TypeError:  # convolutional models take no image size
        try:
            model = timm.create_model(name, **kw)
        except (TypeError, ValueError, AssertionError) as e:
            raise UserError(f"encoder.name={name}: {e}") from None
    model.feature_dim = model.num_features
    return model
