"""``freeze_heap``: what a server and each worker call once loaded, so that a full collection
never walks the model and the imported modules between two tokens."""

import gc

from tpserve.utils.heap import freeze_heap


class Node:
    def __init__(self) -> None:
        self.other = self


def test_frozen_objects_leave_the_collector_and_later_garbage_is_still_collected():
    gc.unfreeze()
    gc.disable()  # this test's own collections only
    try:
        kept = [Node() for _ in range(100)]
        freeze_heap()
        assert gc.get_freeze_count() >= len(kept)
        frozen = gc.get_freeze_count()
        for _ in range(1000):
            Node()  # cycles made after the freeze
        found = gc.collect()
        assert found >= 1000 and gc.get_freeze_count() == frozen  # ... are still found, and nothing thawed
    finally:
        gc.unfreeze()
        gc.enable()
