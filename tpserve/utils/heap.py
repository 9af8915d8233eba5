"""Keep Python's cyclic garbage collector from pausing the token loop."""

from __future__ import annotations

import gc


def freeze_heap() -> None:
    """Put every object alive now out of the collector's reach, once a process has loaded what it
    keeps (the model; torch's, transformers' and the server's modules: ~360,000 objects). A full
    collection walks all of them, and the objects of a few hundred steps start one: 100-220 ms on
    the 2-core machine, a gap every running stream sees and, in a worker, every rank waits out at
    its next all-reduce. Later objects are collected as before. vLLM does the same after start-up."""
    gc.collect()
    gc.freeze()
