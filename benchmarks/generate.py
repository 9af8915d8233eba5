"""Prefill and decode speed of tpserve at TP = 1..4 beside transformers' generate, in one run.

    .venv/bin/python benchmarks/generate.py [--tp 1 2 3 4] [--compile-tp 1] [--prompt-len 128] [--new 64]

Same model (the default SmolLM2-135M-Instruct unless --model), same prompt, same machine,
fp32 on CPU. Batch-1 decode is bound by memory bandwidth: every token reads every weight once,
so the roofline is (memory read bandwidth) / (weight bytes); the table reports each engine's
fraction of it, against the bandwidth measured just before and after that engine's runs (the
higher of the two), since a shared VM's bandwidth drifts. Times are medians of --reps runs after a warm-up; "first call" is that warm-up,
which for --compile rows includes torch.compile (less when inductor's on-disk cache is warm).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """GB/s of summing a buffer much larger than the caches, with all torch threads."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def _with_bandwidth(fn):
    """``fn()``'s result and the memory read bandwidth measured just before and just after it
    (the higher one): a shared VM's bandwidth drifts by 2x over minutes, so each engine is held
    to the bandwidth of its own moment, and the higher reading makes the stricter roofline."""
    before = read_bandwidth()
    out = fn()
    return out, max(before, read_bandwidth())


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_tpserve(model, tp: int, prompt: list[int], new: int, reps: int, compile: bool) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, seconds of the first generate call, which includes compiling)."""
    from tpserve import LLM, SamplingParams

    with LLM(model=model, tensor_parallel_size=tp, compile=compile) as llm:
        one = SamplingParams(max_tokens=1, ignore_eos=True)
        many = SamplingParams(max_tokens=new + 1, ignore_eos=True)
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
        first = time.perf_counter() - t
        t_prefill = _median_time(lambda: llm.generate([prompt], one), reps)
        t_total = _median_time(lambda: llm.generate([prompt], many), reps)
    return len(prompt) / t_prefill, new / (t_total - t_prefill), first


def bench_transformers(path, prompt: list[int], new: int, reps: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run(n: int):
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    run(8)
    t_prefill = _median_time(lambda: run(1), reps)
    t_total = _median_time(lambda: run(new + 1), reps)
    return len(prompt) / t_prefill, new / (t_total - t_prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compile-tp", type=int, nargs="*", default=[1],
                        help="TP degrees to run again with compile=True (torch.compile'd decode step)")
    args = parser.parse_args()

    from tpserve.checkpoint.safetensors_io import open_checkpoint
    from tpserve.engine.llm import resolve_model_path

    path = resolve_model_path(args.model)
    weight_bytes = sum(r.nbytes for r in open_checkpoint(path).values())
    prompt = [1 + (i * 7919) % 20000 for i in range(args.prompt_len)]
    threads = torch.get_num_threads()
    (prefill, decode), bw = _with_bandwidth(lambda: bench_transformers(path, prompt, args.new, args.reps))
    rows = [("transformers generate", 1, prefill, decode, None, bw)]
    for tp, compiled in [(tp, False) for tp in args.tp] + [(tp, True) for tp in args.compile_tp]:
        name = "tpserve --compile" if compiled else "tpserve"
        out, bw = _with_bandwidth(lambda: bench_tpserve(args.model, tp, prompt, args.new, args.reps, compiled))
        rows.append((name, tp, *out, bw))
    print(f"\nmodel {path.name}: {weight_bytes / 1e6:.0f} MB of fp32 weights read per decoded token "
          f"({threads} threads, prompt {args.prompt_len} tokens, {args.new} new tokens)")
    print("roofline = memory read bandwidth (measured around each engine's runs) / weight bytes\n")
    base = rows[0][3]
    print(f"{'engine':<22}{'TP':>3}{'prefill tok/s':>15}{'decode tok/s':>14}{'read GB/s':>11}{'roofline':>10}"
          f"{'of roofline':>13}{'vs transformers':>17}{'first call s':>14}")
    for name, tp, prefill, decode, first, bw in rows:
        roof = bw * 1e9 / weight_bytes
        first_s = "" if first is None else f"{first:.1f}"
        print(f"{name:<22}{tp:>3}{prefill:>15.0f}{decode:>14.1f}{bw:>11.1f}{roof:>10.1f}{decode / roof:>13.0%}"
              f"{decode / base:>16.2f}x{first_s:>14}")


if __name__ == "__main__":
    main()
