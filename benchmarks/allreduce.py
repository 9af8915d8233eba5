"""All-reduce latency and bandwidth against message size, on local processes.

    .venv/bin/python benchmarks/allreduce.py --tp 2 4

Bus bandwidth uses the ring formula (nccl-tests' busbw): algbw x 2(n-1)/n, so numbers for
different TP degrees compare. fp32 messages; median of timed iterations after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from tpserve.parallel import all_reduce_sum, barrier
from tpserve.parallel.launch import launch_local

SIZES = [2**k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} TiB"


def _rank_main(iters: int, backend_device: str) -> None:
    world = dist.get_world_size()
    rows = []
    for nbytes in SIZES:
        x = torch.ones(nbytes // 4, device=backend_device)
        n = max(3, min(iters, int(2e9 // max(nbytes, 1)) // 50))
        for _ in range(3):
            all_reduce_sum(x)
        times = []
        for _ in range(n):
            barrier()
            t0 = time.perf_counter()
            all_reduce_sum(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = torch.tensor([statistics.median(times)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        sec = t.item()
        algbw = nbytes / sec / 1e9
        rows.append((nbytes, sec * 1e6, algbw, algbw * 2 * (world - 1) / world))
    if dist.get_rank() == 0:
        print(f"\nall_reduce_sum, TP={world}, backend={dist.get_backend()}")
        print(f"{'size':>10} {'latency (us)':>14} {'algbw (GB/s)':>14} {'busbw (GB/s)':>14}")
        for nbytes, us, alg, bus in rows:
            print(f"{_human(nbytes):>10} {us:>14.1f} {alg:>14.3f} {bus:>14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: from the device)")
    args = parser.parse_args()
    device = "cuda" if args.backend == "nccl" or (args.backend is None and torch.cuda.is_available()) else "cpu"
    print(f"machine: {torch.get_num_threads()} torch threads, device {device}")
    for tp in args.tp:
        launch_local(_rank_main, tp, args.iters, device, backend=args.backend)


if __name__ == "__main__":
    main()
