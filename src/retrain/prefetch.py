"""Work ahead in threads, in order, within a bound: the one pattern scanning, extraction and training share.

ThreadPoolExecutor.map submits every item up front: a million pending futures (~0.5 KB each)
just to hash a million files one after another, or every decoded photo of an epoch held at
once. ordered_map keeps at most `ahead` items in flight and yields results in input order.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """fn(item) for each item, computed in `workers` threads at most `ahead` items early, yielded in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def batched(results: Iterator[R], sizes: Iterable[int]) -> Iterator[list[R]]:
    """Consecutive runs of `results`, one list per size (the batches the items were laid out in)."""
    for size in sizes:
        yield list(islice(results, size))
