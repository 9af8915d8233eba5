import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from distpool import Pool  # noqa: E402

_pools: dict[int, Pool] = {}


@pytest.fixture(scope="session", autouse=True)
def shm_module_built():
    """Build the shared-memory collectives and the decode kernels once, here, before any group of
    ranks wants them."""
    from tpserve.models import attention, fused
    from tpserve.parallel import matvec, shm

    shm.extension()
    attention.extension()
    matvec.extension()
    fused.extension()


@pytest.fixture(scope="session")
def tp_run():
    """``tp_run(world, fn, *args)``: run ``fn`` on every rank of a live gloo group of that size."""

    def run(world: int, fn, *args, **kwargs):
        pool = _pools.get(world)
        if pool is None or not pool.alive:
            pool = _pools[world] = Pool(world)
        return pool.run(fn, *args, **kwargs)

    yield run
    for pool in _pools.values():
        pool.close()
    _pools.clear()
