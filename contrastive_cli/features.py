"""An encoder's features over a dataset, in the dataset's order: what the k-NN, the probe, zero-shot
classification and the online monitor all start from."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .augment import normalize
from .data.batches import iterate_batches, num_batches
from .progress import bar


@torch.no_grad()
def extract_features(encoder: nn.Module, data, mean, std, device: torch.device, batch_size: int = 512,
                     desc: str = "features", show: bool = True) -> tuple[Tensor, Tensor]:
    """Encoder features (before any projector) of every image, in order; float32 on the CPU."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    batches = iterate_batches(data, batch_size, seed=0, epoch=0, shuffle=False, drop_last=False)
    for x, y in bar(batches, num_batches(data, batch_size, drop_last=False), desc, show=show):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(encoder(normalize(x.to(device, non_blocking=True), mean, std)).float())
        labels.append(y)
    encoder.train(was_training)
    return torch.cat(feats).cpu(), torch.cat(labels)
