"""CPC (van den Oord et al. 2018, arXiv:1807.03748; on images, Hénaff et al. 2019, arXiv:1905.09272):
each image is cut into an overlapping grid of patches, every patch is encoded, a masked convolutional
context network reads the grid top to bottom, and one linear map per k predicts the patch features
k rows below the context; InfoNCE scores each prediction against the patch features of every
position of every image in its group of `group_size` images of the batch (0: the whole batch). InfoNCE
is CPC's bound: I(x; c) >= log N - L_N, N the group's patches. Groups, because scoring every patch of a
256-image batch against every other (12,544 x 12,544 at 32 px) took 80% of the step.

Views: CPC needs one image, so only view 1 (augmented) is read; view 2 is left unused (a second
loss on it doubled the step's time on a CPU). The collapse monitor gets the pooled features of the
two halves of the batch, which are different images, as its z1 and z2 are. Evaluation: the encoder cl-eval, cl-embed and cl-export
rebuild is `PatchGrid` (patchify -> encoder -> mean over the grid), so k-NN and the linear probe
read one vector per image, as for every other method. Note that an encoder with batch-norm shares
its batch statistics across every patch in training (Hénaff et al. use layer norm for this reason);
the context network itself sees no row below its own (tests/test_multicrop.py checks the gradient)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError, positive
from ..losses import cpc_info_nce
from .base import Method, StepOutput

# stride=auto: the largest of these whose grid tiles the image with at least MIN_ROWS rows. On digits at
# 16 px a stride-4 grid has 3 rows of half-image patches: CPC's k-NN rose 0.009 over its untrained grid's
# (0.760 against 0.751); stride 2 (5 rows) rose 0.038 (0.804 against 0.767). 28 and 32 px keep stride 4.
STRIDES, MIN_ROWS = (4, 2, 1), 5


def grid_stride(stride: int | str, patch_size: int, image_size: int) -> int:
    """`stride`, or for `auto` the stride the patch grid of an `image_size` px image is cut at."""
    if stride != "auto":
        if isinstance(stride, str):
            raise UserError(f"method.stride={stride}: give a positive integer or auto")
        return stride
    positive("method.patch_size", patch_size, integer=True)
    span = image_size - patch_size
    fits = [s for s in STRIDES if span >= 0 and span % s == 0]
    rows = [s for s in fits if span // s + 1 >= MIN_ROWS]
    return (rows or fits or STRIDES)[0]


class PatchGrid(nn.Module):
    """An encoder applied to the patches of an image: `grid(x)` gives B x D x G x G features,
    `forward(x)` their mean over the grid (the features cl-eval sees)."""

    def __init__(self, encoder: nn.Module, patch_size: int = 8, stride: int = 4):
        super().__init__()
        self.encoder = encoder
        self.patch_size = positive("method.patch_size", patch_size, integer=True)
        self.stride = positive("method.stride", stride, integer=True)
        self.feature_dim = encoder.feature_dim

    def side(self, size: int) -> int:
        """Patches per row and column of a `size` px image; a grid that does not tile the image is refused."""
        p, s = self.patch_size, self.stride
        if size < p or (size - p) % s:
            raise UserError(f"method.patch_size={p}, method.stride={s}: do not tile a {size} px image "
                            f"(need size - patch_size divisible by stride, e.g. patch 8, stride 4 at 28 or 32 px)")
        return (size - p) // s + 1

    def grid(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        rows, cols, p = self.side(h), self.side(w), self.patch_size
        patches = x.unfold(2, p, self.stride).unfold(3, p, self.stride)  # B x C x G x G x p x p
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * rows * cols, c, p, p)
        return self.encoder(patches).reshape(b, rows, cols, -1).permute(0, 3, 1, 2)  # B x D x G x G

    def forward(self, x: Tensor) -> Tensor:
        return self.grid(x).mean((2, 3))


class CausalConv(nn.Conv2d):
    """A convolution whose output row r sees input rows r - kernel + 1 .. r only: the input is padded
    at the top and at both sides, never at the bottom (a masked convolution, as PixelCNN's)."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int] = (2, 3)):
        super().__init__(c_in, c_out, kernel)

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = self.kernel_size
        return super().forward(F.pad(x, (kw // 2, kw // 2, kh - 1, 0)))


class CPC(Method):
    def __init__(self, encoder: nn.Module, image_size: int = 32, patch_size: int = 8, stride: int | str = "auto",
                 context_dim: int = 256, context_layers: int = 3, steps: int = 2, group_size: int = 32):
        positive("dataset.image_size", image_size, integer=True)
        grid = PatchGrid(encoder, patch_size, grid_stride(stride, patch_size, image_size))
        super().__init__(grid)
        self.side = grid.side(image_size)
        self.steps = positive("method.steps", steps, integer=True)
        if self.steps >= self.side:
            raise UserError(f"method.steps={steps}: the grid has {self.side} rows; predict at most {self.side - 1} ahead")
        self.group_size = positive("method.group_size", group_size, integer=True, strict=False)
        positive("method.context_dim", context_dim, integer=True)
        positive("method.context_layers", context_layers, integer=True)
        d = encoder.feature_dim
        layers: list[nn.Module] = []
        for i in range(context_layers):
            layers += [CausalConv(d if i == 0 else context_dim, context_dim), nn.ReLU()]
        self.context = nn.Sequential(*layers)
        self.predictors = nn.ModuleList(nn.Linear(context_dim, d) for _ in range(self.steps))  # W_k, k = 1..K

    @classmethod
    def eval_encoder(cls, encoder: nn.Module, method_cfg) -> nn.Module:
        patch = method_cfg.get("patch_size", 8)  # the grid it was trained on: its own image size, not the eval data's
        stride = grid_stride(method_cfg.get("stride", "auto"), patch, method_cfg.get("image_size", 32))
        return PatchGrid(encoder, patch, stride)

    def loss_of(self, f: Tensor) -> Tensor:
        """InfoNCE of one view's features f (B x D x G x G), averaged over k = 1..K and over groups of
        `group_size` images, each prediction scored against every patch of its group."""
        c = self.context(f)  # B x H x G x G, row r from rows <= r
        size = self.group_size or len(f)
        losses = [self._group_loss(fg, cg) for fg, cg in zip(f.split(size), c.split(size), strict=True)]
        return torch.stack(losses).mean()

    def _group_loss(self, f: Tensor, c: Tensor) -> Tensor:
        b, d, g, _ = f.shape
        keys = f.permute(0, 2, 3, 1).reshape(-1, d)  # every patch of every image: (b, row, col) order
        index = torch.arange(b * g * g, device=f.device).view(b, g, g)
        losses = []
        for k, w in enumerate(self.predictors, start=1):
            pred = w(c[:, :, : g - k].permute(0, 2, 3, 1).reshape(-1, c.shape[1]))  # rows 0 .. G-1-k
            losses.append(cpc_info_nce(pred, keys, index[:, k:].reshape(-1)))  # their targets: k rows below
        return torch.stack(losses).mean()

    def training_step(self, x1: Tensor, x2: Tensor, labels: Tensor) -> StepOutput:
        f = self.encoder.grid(x1)  # one encoder pass over all patches
        z1, z2 = f.mean((2, 3)).chunk(2)
        return StepOutput(self.loss_of(f), z1, z2)
