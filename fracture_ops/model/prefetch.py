"""Decode ahead of the model: a bounded, order-keeping thread pool (shared by the served model's
``predict`` and batch inference)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

_END = object()


def prefetch(values: Iterable, load: Callable[[Any], Any], workers: int,
             window: int) -> Iterator[Any]:
    """``load(v)`` for every value, in order, computed by ``workers`` threads (Pillow, pydicom
    and OpenCV release the GIL) at most ``window`` values ahead of the consumer, so decoding
    overlaps the consumer's work and memory stays bounded. Closing the iterator early cancels
    the loads not started yet."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        it = iter(values)
        pending = deque(pool.submit(load, v) for v in islice(it, max(1, window)))
        try:
            while pending:
                result = pending.popleft().result()
                nxt = next(it, _END)
                if nxt is not _END:
                    pending.append(pool.submit(load, nxt))
                yield result
        finally:
            for fut in pending:
                fut.cancel()
