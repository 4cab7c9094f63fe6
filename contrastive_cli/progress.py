"""Progress of the long loops outside training (features, embedding, image decoding): a tqdm bar on a
terminal; where the output is a file or a pipe, a log line every 30 s instead of carriage returns
(cl-train's own loop does the same through trainer.progress)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
EVERY_S = 30.0


def bar(items: Iterable, total: int, desc: str, unit: str = "batch", show: bool = True, leave: bool = False,
        delay: float = 0.0) -> Iterable:
    if not show:
        return items
    if sys.stderr.isatty():
        return tqdm(items, total=total, desc=desc, unit=unit, leave=leave, delay=delay)
    return _logged(items, total, desc, unit)


def _logged(items: Iterable, total: int, desc: str, unit: str) -> Iterator:
    start = last = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= EVERY_S:
            log.info("%s: %d/%d %s (%.0f s)", desc, i, total, unit, now - start)
            last = now
