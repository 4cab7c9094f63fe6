"""Projection and prediction heads."""

from __future__ import annotations

from torch import nn

from .errors import positive


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False,
        batch_norm: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU x (num_layers - 1), then Linear (and BN without affine when `last_bn`);
    `batch_norm=False` gives MoCo v2's plain Linear-ReLU-Linear."""
    positive("hidden_dim", hidden_dim, integer=True)
    positive("out_dim", out_dim, integer=True)
    positive("num_layers", num_layers, integer=True)
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(num_layers - 1):
        norm = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
        layers += [nn.Linear(d, hidden_dim, bias=not batch_norm), *norm, nn.ReLU(inplace=True)]
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
