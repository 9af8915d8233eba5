"""Eager decode through ``llama.decode_rows`` (no module calls) beside the layer modules, in one
engine, in alternating runs so that a noisy machine's drift hits both alike.

    .venv/bin/python benchmarks/decode_plan.py --tp 1 2 --dtype bfloat16 float32 --pairs 10

Each pair generates ``--new`` tokens once with the path on and once off (the order alternates);
every rank reads the switch, a file, at each step, so workers follow it too. Reports the median
tok/s of each side and their ratio, and how many pairs the path won.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from tpserve import LLM, SamplingParams
from tpserve.models import llama

SWITCH = os.environ.setdefault("TPSERVE_BENCH_PLAN_OFF", str(Path(tempfile.gettempdir()) / f"plan-off-{os.getpid()}"))
_real = llama.decode_rows


def _switched(*args, **kwargs):
    return None if os.path.exists(SWITCH) else _real(*args, **kwargs)


llama.decode_rows = _switched  # in spawned workers too: they re-import this module


def run(tp: int, dtype: str, pairs: int, new: int) -> None:
    off = Path(SWITCH)
    with LLM(tensor_parallel_size=tp, dtype=dtype, enable_prefix_caching=False) as llm:
        prompt = list(range(100, 228))
        params = SamplingParams(max_tokens=new, ignore_eos=True)
        llm.generate([prompt], params)  # warm-up
        speed: dict[str, list[float]] = {"plan": [], "modules": []}
        for i in range(pairs):
            for side in ("plan", "modules") if i % 2 == 0 else ("modules", "plan"):
                if side == "modules":
                    off.touch()
                else:
                    off.unlink(missing_ok=True)
                t = time.perf_counter()
                llm.generate([prompt], params)
                speed[side].append(new / (time.perf_counter() - t))
        off.unlink(missing_ok=True)
    plan, modules = (statistics.median(speed[k]) for k in ("plan", "modules"))
    wins = sum(a > b for a, b in zip(speed["plan"], speed["modules"]))
    print(f"| {tp} | {dtype} | {plan:.1f} | {modules:.1f} | {plan / modules:.2f}x | {wins}/{pairs} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--new", type=int, default=100, help="tokens per run")
    args = parser.parse_args()
    print("| TP | dtype | decode_rows tok/s | modules tok/s | ratio | pairs won |")
    print("|---:|---|---:|---:|---:|---:|")
    for dtype in args.dtype:
        for tp in args.tp:
            run(tp, dtype, args.pairs, args.new)


if __name__ == "__main__":
    main()
