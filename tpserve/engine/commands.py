"""How the driver's commands reach the workers.

Through the group's shared memory when it has some (``parallel.shm``): one broadcast that the
workers wait in, without a deadline (an idle server may wait for hours) but noticing at once a
driver that died, and napping so that waiting costs almost no CPU. Otherwise, each worker's
pipe. A command is small and picklable: ``("generate", prompts, budgets, greedy)``, ``("close",)``...
"""

from __future__ import annotations

import math

from tpserve.parallel import broadcast_object, shm


def through_shared_memory(group) -> bool:
    return shm.of(group) is not None


def send(group, conns: list, cmd: tuple, timeout: float | None = None) -> None:
    """Rank 0: give every worker ``cmd`` (they are all waiting in :func:`receive`); ``timeout``
    defaults to the group's deadline."""
    if through_shared_memory(group):
        broadcast_object(cmd, 0, group, timeout)
        return
    for conn in conns:
        conn.send(cmd)


def receive(group, conn, parent_alive) -> tuple | None:
    """A worker: the next command, or None once the driver is gone."""
    if through_shared_memory(group):
        return broadcast_object(None, 0, group, timeout=math.inf)
    while not conn.poll(1.0):
        if not parent_alive():
            return None
    return conn.recv()
