"""What a training process sets up before its first torch work (the validation of its config, in
config._dry_build): settings that threads started later inherit, or that the allocator reads once."""

from __future__ import annotations

import torch


def flush_denormals() -> None:
    """Read and write denormal floats (below 1.2e-38) as zero on the CPU, in this thread and in the
    threads it starts later: OpenMP's pool inherits the setting when it starts, so the earlier the
    better. A matmul on denormal operands is several times slower on x86, and a softmax over many
    logits makes them: after one Fashion-MNIST epoch CPC's step took 8.2 s instead of 1.7 s."""
    torch.set_flush_denormal(True)


def keep_freed_memory() -> None:
    """Have glibc's malloc serve every block under 1 GiB from its heap and keep up to 2 GiB freed there.
    By default a block over 32 MiB is a fresh mmap, whose pages the kernel zeroes on first touch, on every
    step: a third of barlow_twins_imagenet's CPU step (its 8192 x 8192 weights, their gradients and LARS's
    temporaries; 1.83 s -> 0.95 s on a 2-core Xeon) and a tenth of SimCLR's run (37.4 s -> 34.0 s), with the
    same numbers. The cost: a training process holds on to the freed memory of its largest step. No-op
    elsewhere (macOS, musl)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
