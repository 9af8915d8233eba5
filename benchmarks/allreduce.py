"""All-reduce latency and bandwidth against message size, on local processes: shared memory
(what tpserve uses between ranks of one host) beside gloo, in one run.

    .venv/bin/python benchmarks/allreduce.py --tp 2 4

Two timings per size: "synced" is the median of single calls that start together (a barrier
before each); "back to back" is the mean of consecutive calls with nothing in between, as a
decode step makes them (two per layer). Bus bandwidth uses the ring formula (nccl-tests'
busbw): algbw x 2(n-1)/n, so numbers for different TP degrees compare. fp32 messages unless
``--dtype bfloat16`` (or float16): a prefill's sums at bf16, which shared memory adds in float.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from tpserve.parallel import all_reduce_sum, barrier, shm
from tpserve.parallel.launch import launch_local

SIZES = [2**k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} TiB"


def _time(x: torch.Tensor, group, iters: int) -> tuple[float, float]:
    """(synced median, back-to-back mean) seconds of one all-reduce, the slowest rank's."""
    for _ in range(3):
        all_reduce_sum(x, group)
    synced = []
    for _ in range(iters):
        barrier(group)
        t0 = time.perf_counter()
        all_reduce_sum(x, group)
        synced.append(time.perf_counter() - t0)
    barrier(group)
    t0 = time.perf_counter()
    for _ in range(iters):
        all_reduce_sum(x, group)
    b2b = (time.perf_counter() - t0) / iters
    t = torch.tensor([statistics.median(synced), b2b])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t[0].item(), t[1].item()


def _rank_main(iters: int, device: str, dtype: str = "float32") -> None:
    world = dist.get_world_size()
    paths = {"gloo": dist.new_group(backend=dist.get_backend())}  # the same ranks without shared memory
    if shm.of(dist.group.WORLD) is not None:
        paths["shm"] = dist.group.WORLD
    rows, dt = [], getattr(torch, dtype)
    for nbytes in SIZES:
        x = torch.ones(nbytes // dt.itemsize, device=device, dtype=dt)
        n = max(5, min(iters, int(4e9 // max(nbytes, 1)) // 50))
        row = [nbytes]
        for group in paths.values():
            row += _time(x, group, n)
        rows.append(row)
    if dist.get_rank() == 0:
        print(f"\nall_reduce_sum, TP={world}, {dtype}, {' and '.join(paths)} (latency in us; busbw from the synced time)")
        head = f"{'size':>9}"
        for name in paths:
            head += f" {name + ' synced':>12} {name + ' b2b':>10} {name + ' busbw':>11}"
        if "shm" in paths:
            head += f" {'gloo/shm':>9}"
        print(head)
        for row in rows:
            nbytes, line = row[0], f"{_human(row[0]):>9}"
            for i in range(len(paths)):
                synced, b2b = row[1 + 2 * i], row[2 + 2 * i]
                bus = nbytes / synced / 1e9 * 2 * (world - 1) / world
                line += f" {synced * 1e6:>12.1f} {b2b * 1e6:>10.1f} {bus:>8.2f} GB/s"
            if "shm" in paths:
                line += f" {row[1] / row[3]:>8.1f}x"
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: from the device)")
    args = parser.parse_args()
    device = "cuda" if args.backend == "nccl" or (args.backend is None and torch.cuda.is_available()) else "cpu"
    if device == "cpu":
        shm.extension()  # build it here once, not in every rank
    print(f"machine: {torch.get_num_threads()} torch threads, device {device}")
    for tp in args.tp:
        launch_local(_rank_main, tp, args.iters, device, args.dtype, backend=args.backend)


if __name__ == "__main__":
    main()
