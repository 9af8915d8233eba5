"""Real multi-process gloo groups for tests, kept alive between tests.

Starting a process that imports torch costs seconds on a 2-core machine, so one pool of
``world`` spawned processes per TP degree is reused by every test. A test sends a
module-level function; each rank runs it and returns a picklable result. Any failure or
timeout tears the pool down (its collectives may be out of step) and the next test gets a
fresh one.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import time
import traceback

from tpserve.utils.net import free_port

COMM_TIMEOUT_S = 30.0


def comm_error_after(op) -> str:
    """"seconds|message" of the CommError ``op()`` raised (on this rank), or "no error": how
    long a collective took to give up on a gone peer, and what it said."""
    from tpserve.parallel import CommError

    t0 = time.monotonic()
    try:
        op()
    except CommError as e:
        return f"{time.monotonic() - t0:.2f}|{e}"
    return "no error"


def _setup(rank: int, world: int, port: int, comm_timeout: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=comm_timeout))
    from tpserve.parallel import set_default_timeout, shm_setup

    set_default_timeout(comm_timeout)
    shm_setup.attach(dist.group.WORLD, comm_timeout)  # as an engine's group does: the suite runs over shared memory


def _serve(rank: int, world: int, port: int, conn, comm_timeout: float) -> None:
    try:
        _setup(rank, world, port, comm_timeout)
        conn.send(("ready", None))
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:
            conn.send(("err", traceback.format_exc()))


class RankFailure(AssertionError):
    pass


class Pool:
    def __init__(self, world: int, comm_timeout: float = COMM_TIMEOUT_S) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        port = free_port()
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(rank, world, port, child, comm_timeout), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self._collect(120.0, "start")

    def _collect(self, timeout: float, what: str) -> list:
        deadline = time.monotonic() + timeout
        results, errors = [None] * self.world, []
        for rank, conn in enumerate(self.conns):
            while not conn.poll(0.2):
                if not self.procs[rank].is_alive():
                    errors.append(f"rank {rank} died (exit code {self.procs[rank].exitcode})")
                    break
                if time.monotonic() > deadline:
                    errors.append(f"rank {rank} gave no answer within {timeout:.0f}s")
                    break
            else:
                status, value = conn.recv()
                if status == "err":
                    errors.append(f"rank {rank} raised:\n{value}")
                else:
                    results[rank] = value
        if errors:
            self.close()
            raise RankFailure(f"{what} failed on a {self.world}-rank group:\n" + "\n".join(errors))
        return results

    def run(self, fn, *args, timeout: float = 300.0, **kwargs) -> list:
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        return self._collect(timeout, getattr(fn, "__name__", "call"))

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for conn, p in zip(self.conns, self.procs):
            try:
                if p.is_alive():
                    conn.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs, self.conns = [], []


def _once(rank: int, world: int, port: int, fn, args, conn, comm_timeout: float) -> None:
    try:
        _setup(rank, world, port, comm_timeout)
        conn.send(("ok", fn(*args)))
    except BaseException:
        conn.send(("err", traceback.format_exc()))


def spawn_once(fn, world: int, *args, timeout: float = 120.0, comm_timeout: float = COMM_TIMEOUT_S) -> list:
    """Run ``fn(*args)`` on a fresh, throwaway group (for tests that kill or hang a rank).

    Returns each rank's ("ok", value) / ("err", traceback) / ("gone", exitcode).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    pipes = [ctx.Pipe() for _ in range(world)]
    procs = [ctx.Process(target=_once, args=(r, world, port, fn, args, pipes[r][1], comm_timeout), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    out = []
    for rank, (conn, _) in enumerate(pipes):
        while not conn.poll(0.2) and procs[rank].is_alive() and time.monotonic() < deadline:
            pass
        out.append(conn.recv() if conn.poll(0) else ("gone", procs[rank].exitcode))
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    return out
