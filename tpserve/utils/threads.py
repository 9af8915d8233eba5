"""Reading or writing many tensors on a few threads, with one progress bar of bytes."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_in_threads(fn: Callable[[T, Callable[[int], None]], R], items: Iterable[T], threads: int, *,
                   total: int, desc: str, progress: bool) -> list[R]:
    """``fn(item, advance)`` for every item on ``threads`` threads; results in the order of
    ``items``, the first failure raised. ``advance(n)`` moves a tqdm bar of ``total`` bytes (its
    rate column is the GB/s), shown only with ``progress`` and when stderr is a terminal."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=None, mininterval=0.25)
    lock = threading.Lock()

    def advance(n: int) -> None:
        if bar is not None:
            with lock:
                bar.update(n)

    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = [pool.submit(fn, item, advance) for item in items]
            return [f.result() for f in futures]
    finally:
        if bar is not None:
            bar.close()
