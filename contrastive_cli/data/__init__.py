"""The data layer: every source gives uint8 images (N, C, H, W) and labels, and the loop takes batches
from any of them the same way.

- `images`: what every source shares (TensorImages, Splits, the Pillow decode).
- `batches`: the one batch iterator the training loop and the evaluation use (`iterate_batches`).
- `named`: digits, the MNIST family, CIFAR-10/100, STL-10.
- `folder`: your own image folders, held in memory, in a disk cache or decoded per batch.
- `pairs`: your own (image, caption) files for the image-text methods.
- `shards`: WebDataset tar shards, streamed (data larger than memory, several machines); `samples`
  reads and decodes one shard file's samples for it (and for cl-pack and cl-embed).

No source imports another. The loaders are also named here, where the dataset configs of older
checkpoints point (`contrastive_cli.data.load_mnist`)."""

from .batches import iterate_batches, num_batches
from .folder import FolderImages, has_class_folders, load_imagefolder
from .images import Splits, TensorImages, decode_all, decode_batches, pil_to_uint8, warn_unreadable
from .named import load_cifar, load_digits, load_mnist, load_stl10
from .pairs import PairImages, PairSplits, load_pairs

__all__ = [
    "FolderImages", "PairImages", "PairSplits", "Splits", "TensorImages", "decode_all", "decode_batches",
    "has_class_folders", "iterate_batches", "load_cifar", "load_digits", "load_imagefolder", "load_mnist",
    "load_pairs", "load_stl10", "num_batches", "pil_to_uint8", "warn_unreadable",
]
