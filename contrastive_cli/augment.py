"""Batched augmentation in which every sample draws its own random parameters.

torchvision's transforms, applied to a batch tensor, use one set of parameters for the whole batch
(vision #8484), so views built that way are correlated across the batch. Here crop, flip and rotation
are one `affine_grid`/`grid_sample`; jitter, grayscale and solarize use per-sample factors and
masks; blur is a per-sample-sigma separable grouped convolution. The same code runs on CPU and GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError, positive, probability

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), torch.zeros_like(maxc))
    dc = delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return h, s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
    out = []
    for c in range(3):
        stack = torch.stack([table[k][c] for k in range(6)])  # 6 x B x H x W
        out.append(stack.gather(0, i.unsqueeze(0)).squeeze(0))
    return torch.stack(out, 1)


class BatchAugment(nn.Module):
    """uint8 (B, C, H, W) -> normalized float (B, C, size, size), parameters drawn per sample."""

    def __init__(
        self, size: int, mean: list[float], std: list[float],
        crop_scale: tuple[float, float] = (0.08, 1.0), crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5, rotate_deg: float = 0.0, jitter_p: float = 0.8, brightness: float = 0.4,
        contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1, gray_p: float = 0.2,
        blur_p: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0), solarize_p: float = 0.0,
    ):
        super().__init__()
        self.size = positive("size", size, integer=True)
        lo, hi = (float(v) for v in crop_scale)
        if not 0 < lo <= hi <= 1:
            raise UserError(f"crop_scale={list(crop_scale)}: need 0 < low <= high <= 1")
        if not 0 < crop_ratio[0] <= crop_ratio[1] < math.inf:
            raise UserError(f"crop_ratio={list(crop_ratio)}: need 0 < low <= high")
        if not 0 < blur_sigma[0] <= blur_sigma[1] < math.inf:
            raise UserError(f"blur_sigma={list(blur_sigma)}: need 0 < low <= high")
        if not 0 <= hue <= 0.5:
            raise UserError(f"hue={hue}: must be in [0, 0.5]")
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation),
                        ("rotate_deg", rotate_deg)):
            positive(name, v, strict=False)
        self.crop_scale, self.crop_ratio = (lo, hi), (float(crop_ratio[0]), float(crop_ratio[1]))
        self.flip_p, self.jitter_p = probability("flip_p", flip_p), probability("jitter_p", jitter_p)
        self.gray_p, self.blur_p = probability("gray_p", gray_p), probability("blur_p", blur_p)
        self.solarize_p = probability("solarize_p", solarize_p)
        self.rotate = math.radians(rotate_deg)
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_size = max(3, int(0.1 * size) // 2 * 2 + 1)  # SimCLR: kernel 10% of the image side
        if len(mean) != len(std):
            raise UserError(f"mean={list(mean)} and std={list(std)}: need one value per channel")
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draw one set of parameters per sample; all in one place so a seed reproduces a view."""
        dev = self.mean.device

        def u(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=dev)

        tries = 10  # RandomResizedCrop's rejection sampling, vectorized: first valid of 10 draws
        area = u(n, tries) * (self.crop_scale[1] - self.crop_scale[0]) + self.crop_scale[0]
        lr = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        ratio = torch.exp(u(n, tries) * (lr[1] - lr[0]) + lr[0])
        w = torch.sqrt(area * height * width * ratio)
        h = torch.sqrt(area * height * width / ratio)
        ok = (w <= width) & (h <= height)
        first = ok.float().argmax(1, keepdim=True)
        w = torch.where(ok.any(1), w.gather(1, first).squeeze(1), torch.full_like(w[:, 0], width))
        h = torch.where(ok.any(1), h.gather(1, first).squeeze(1), torch.full_like(h[:, 0], height))

        def factor(strength: float, mask: Tensor) -> Tensor:
            f = 1.0 + strength * (2 * u(n) - 1)
            return torch.where(mask, f.clamp_min(0.0), torch.ones_like(f))

        jitter = u(n) < self.jitter_p
        lo, hi = self.blur_sigma
        return {
            "w": w, "h": h,
            "cx": w / 2 + (width - w) * u(n), "cy": h / 2 + (height - h) * u(n),
            "flip": u(n) < self.flip_p,
            "angle": (2 * u(n) - 1) * self.rotate,
            "jitter": jitter,
            "brightness": factor(self.brightness, jitter),
            "contrast": factor(self.contrast, jitter),
            "saturation": factor(self.saturation, jitter),
            "hue": torch.where(jitter, self.hue * (2 * u(n) - 1), torch.zeros(n, device=dev)),
            "gray": u(n) < self.gray_p,
            "blur": u(n) < self.blur_p,
            "sigma": lo + (hi - lo) * u(n),
            "solarize": u(n) < self.solarize_p,
        }

    def apply(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        b, c, height, width = x.shape
        if c != self.mean.shape[1]:
            raise UserError(f"images have {c} channels but mean/std give {self.mean.shape[1]}")
        x = x.float().div_(255.0)
        x = self._geometry(x, p, height, width)
        x = self._color(x, p)
        if self.blur_p > 0:
            x = self._blur(x, p["blur"], p["sigma"])
        if self.solarize_p > 0:
            x = torch.where(p["solarize"].view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
        return (x - self.mean) / self.std

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(x, self.sample(x.shape[0], x.shape[2], x.shape[3], generator))

    def _geometry(self, x: Tensor, p: dict[str, Tensor], height: int, width: int) -> Tensor:
        sx = torch.where(p["flip"], -p["w"] / width, p["w"] / width)
        sy = p["h"] / height
        cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
        theta = torch.stack([
            torch.stack([cos * sx, -sin * sy, 2 * p["cx"] / width - 1], 1),
            torch.stack([sin * sx, cos * sy, 2 * p["cy"] / height - 1], 1),
        ], 1)  # B x 2 x 3: output grid -> input coordinates
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], self.size, self.size], align_corners=False)
        # a crop touching the edge repeats the edge pixels, as torchvision's resized crop does; only a
        # rotation, which reaches outside the image, fills with black (as RandomRotation's fill=0)
        padding = "zeros" if self.rotate > 0 else "border"
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)

    def _color(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        def col(t: Tensor) -> Tensor:
            return t.view(-1, 1, 1, 1)

        if self.jitter_p > 0:
            x = (x * col(p["brightness"])).clamp(0, 1)
            m = _gray(x).mean((1, 2, 3), keepdim=True)
            x = ((x - m) * col(p["contrast"]) + m).clamp(0, 1)
            if x.shape[1] == 3 and self.saturation > 0:
                g = _gray(x)
                x = ((x - g) * col(p["saturation"]) + g).clamp(0, 1)
            if x.shape[1] == 3 and self.hue > 0:
                h, s, v = _rgb_to_hsv(x)
                x = _hsv_to_rgb((h + p["hue"].view(-1, 1, 1)) % 1.0, s, v)
        if x.shape[1] == 3 and self.gray_p > 0:
            x = torch.where(col(p["gray"]), _gray(x).expand_as(x), x)
        return x

    def _blur(self, x: Tensor, mask: Tensor, sigma: Tensor) -> Tensor:
        b, c, h, w = x.shape
        k = self.blur_size
        offsets = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
        kernel = torch.exp(-(offsets**2) / (2 * sigma.view(-1, 1) ** 2))
        kernel = kernel / kernel.sum(1, keepdim=True)
        delta = (offsets == 0).to(x.dtype).expand(b, k)
        kernel = torch.where(mask.view(-1, 1), kernel, delta).repeat_interleave(c, 0)  # (B*C) x k
        y = F.pad(x.reshape(1, b * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
        y = F.conv2d(y, kernel.view(b * c, 1, k, 1), groups=b * c)
        y = F.conv2d(y, kernel.view(b * c, 1, 1, k), groups=b * c)
        return y.view(b, c, h, w)


class TwoViews(nn.Module):
    """Two independently drawn views of each image in one pass over the batch. `on_device`: run on
    the training device (uint8 batches cross to it, the views are made there); false: on the CPU,
    in the DataLoader workers."""

    def __init__(self, view1: BatchAugment, view2: BatchAugment, on_device: bool = True):
        super().__init__()
        self.view1, self.view2, self.on_device = view1, view2, bool(on_device)
        self.num_views = 2

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.view1(x, generator), self.view2(x, generator)


# `local_crops: auto` makes local crops only where they are at least this many pixels: an encoder that
# downsamples 8x (small_cnn, a ResNet's small stem) then still sees a 2 x 2 grid. At 32 px the 0.4-size crops
# are 13 px, fragments of a stroke on digits, and DINO and SwAV collapsed with them (k-NN 0.842 and 0.789
# against an untrained encoder's 0.818) and trained without them (0.871, with a batch-norm head, and 0.851;
# SGD both); solo-learn's CIFAR recipes for both use the two global crops only. DINO's local crops are 96 px
# of a 224 px image.
MIN_LOCAL_SIZE = 16
LOCAL_CROPS = 6  # what `auto` makes where they are large enough: SwAV's and DINO's 2 + 6


class MultiCrop(nn.Module):
    """Multi-crop (SwAV, Caron et al. 2020; DINO): two global views at the image size, then
    `local_crops` small views at `local_size` (a fraction of the image size), every sample of every
    crop drawing its own parameters. The local crops are made in one pass over the batch repeated
    `local_crops` times. Returns the views grouped by size: [global 1, global 2, local 1, ..., local V].
    `local_crops="auto"`: LOCAL_CROPS where a local crop has at least MIN_LOCAL_SIZE px, else none
    (`notes` says which, for the run's log)."""

    def __init__(self, global1: BatchAugment, global2: BatchAugment, local, local_crops: int | str = "auto",
                 local_size: float = 0.4, on_device: bool = True):
        super().__init__()
        if not isinstance(local_size, (int, float)) or not 0 < local_size <= 1:
            raise UserError(f"augmentation.local_size={local_size!r}: must be a fraction of the image size in (0, 1]")
        size = max(3, round(local_size * global1.size))
        self.notes: list[str] = []
        if local_crops == "auto":
            local_crops = LOCAL_CROPS if size >= MIN_LOCAL_SIZE else 0
            if not local_crops:
                self.notes.append(f"augmentation.local_crops=auto: no local crops, as {local_size:g} of {global1.size} "
                                  f"px is {size} px, under {MIN_LOCAL_SIZE} px (too little of the image to predict "
                                  "its global crops from); the two global crops only")
        self.local_crops = positive("augmentation.local_crops", local_crops, integer=True, strict=False)
        self.global1, self.global2, self.on_device = global1, global2, bool(on_device)
        # `local` comes as a partial BatchAugment: its size follows the global one
        self.local = local(size=size)

    @property
    def num_views(self) -> int:
        return 2 + self.local_crops

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        views = [self.global1(x, generator), self.global2(x, generator)]
        if self.local_crops:
            views += list(self.local(x.repeat(self.local_crops, 1, 1, 1), generator).split(x.shape[0]))
        return views


def normalize(x: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """The evaluation transform: uint8 -> normalized float, no augmentation."""
    m = torch.tensor(list(mean), device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s
