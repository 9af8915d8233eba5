"""Worker processes: ranks 1..N-1 of a local engine, waiting for rank 0's commands.

Commands arrive over a pipe (not a collective), so an idle worker never times out and a
dead driver is noticed. Once a command arrives every rank runs it in lockstep through
:func:`execute`. Any failure ends the worker: its peers then fail fast instead of waiting.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import torch

from tpserve.parallel import CommError, group_size
from tpserve.utils.fs import pid_alive
from tpserve.utils.heap import freeze_heap

from . import commands
from .runner import full_logits, init_cache, ranks_on_this_host, run_step


def execute(model, cmd: tuple, state: dict):
    """Run one command on this rank (all ranks call this with the same ``cmd``). ``state``
    is this rank's memory between commands (its KV cache)."""
    kind = cmd[0]
    if kind == "step":
        return run_step(model, state["kv"], cmd[1])
    if kind == "kv_init":  # ("kv_init", bytes per rank or None, block size, bytes other engines hold, most blocks)
        state["kv"] = None  # the old cache goes before the new one is made
        state["kv"], blocks = init_cache(model, cmd[1], cmd[2], ranks_on_this_host(group_size(model.group)), cmd[3],
                                         cmd[4])
        return blocks
    if kind == "logits":
        return full_logits(model, cmd[1])
    if kind == "save":  # ("save", path[, overwrite]): every rank writes its own file
        from tpserve.checkpoint.save import save_checkpoint

        return save_checkpoint(model, cmd[1], overwrite=bool(cmd[2]) if len(cmd) > 2 else False)
    if kind == "done":  # torchrun: rank 0's loop is over, the followers return
        return None
    raise ValueError(f"unknown engine command {kind!r}")


def _thread_lock_for_tqdm() -> None:
    """tqdm's default lock is a multiprocessing semaphore, made on first use (torch.compile's FX
    interpreter makes a disabled bar); a worker leaving by ``os._exit`` would leak it, and the
    driver's resource tracker warns about that at exit. A worker's bars need only a thread lock."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _die_with_parent() -> None:
    """Ask Linux to kill this worker if the driver dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(rank: int, world: int, port: int, model_path: str, dtype: str, device: str | None,
                conn, comm_timeout: float, cores: list[int] | None, compile_decode: bool = False,
                quantization: str | None = None) -> None:
    """``cores``: the cores this rank computes on (its threads: one per core); None: not pinned."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    parent = os.getppid()
    try:
        _thread_lock_for_tqdm()
        if cores:
            os.sched_setaffinity(0, cores)  # before torch starts its threads, which inherit it
        torch.set_num_threads(len(cores) if cores else max(1, (os.cpu_count() or 1) // world))
        from tpserve.models import load_model

        from .group import engine_device, engine_store, join_engine_group

        dev = engine_device(device, rank)
        store = engine_store(port, world, is_master=False)
        conn.send(("started", None))  # the driver waits for every worker to get here before its rendezvous
        group = join_engine_group(store, rank, world, dev, comm_timeout)
        model = load_model(model_path, dtype=dtype, device=dev, group=group, progress=False,
                           decode_layout=dev.type == "cpu", compile=compile_decode, quantization=quantization)
        freeze_heap()
        conn.send(("ready", None))
        state: dict = {}
        while True:
            cmd = commands.receive(group, conn, lambda: os.getppid() == parent)
            if cmd is None:  # the driver is gone
                os._exit(0)
            if cmd[0] == "close":
                break
            execute(model, cmd, state)
        conn.send(("closed", None))
    except (EOFError, BrokenPipeError):
        os._exit(0)
    except CommError as exc:
        if os.getppid() != parent or not pid_alive(parent):  # the driver died while we waited for it
            os._exit(0)
        _report(conn, exc)
    except BaseException as exc:
        _report(conn, exc)
    os._exit(0)


def _report(conn, exc: BaseException) -> None:
    """Tell the driver why this worker stops, and stop (its peers then fail fast)."""
    try:
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    except (OSError, BrokenPipeError):
        pass
    sys.stderr.flush()
    os._exit(1)
