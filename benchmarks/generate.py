"""Prefill and decode speed of tpserve at TP = 1..4 beside transformers' generate, in one run,
and how tensor parallelism scales.

    .venv/bin/python benchmarks/generate.py [--tp 1 2 3 4] [--compile-tp 1] [--prompt-len 128] [--new 64]
    .venv/bin/python benchmarks/generate.py --model random-281m --tp 1 2 --compile-tp --rounds 3
    .venv/bin/python benchmarks/generate.py --model random-281m --tp 1 2 --compile-tp --dtype bfloat16 \
        --vllm-tp 1 2 --plot docs/tp-scaling-281m-bf16.png

Same model (the default SmolLM2-135M-Instruct unless --model; ``random-281m`` is a random
even-head Llama built once in --dir), same prompt, same machine, fp32 on CPU unless --dtype.
Batch-1 decode is bound by memory bandwidth: every token reads every weight once (one row of an
untied input embedding), so the roofline is (memory read bandwidth) / (bytes per token); the
table reports each engine's fraction of it, against the bandwidth measured just before and after
that engine's runs (the higher of the two) by summing a buffer the size of the weights, in the
engine's thread layout (TP=N: N threads at once, each on its rank's cores), since a shared
VM's bandwidth drifts. Figures are medians of --reps runs after a warm-up; "first call" is
that warm-up, which for --compile rows includes torch.compile. tpserve's and llama.cpp's runs
are timed from their own steps (prefill: the time to the first token; decode: from the first
token to the last), as ``paired.py`` times them; transformers' and vLLM's decode is the time of
a (--new + 1)-token run less that of a 1-token run. With --rounds R every tpserve
configuration runs R times, interleaved (TP=1, TP=2, TP=1, TP=2, ...), and "vs TP=1" is the
median over rounds of each round's ratio to that round's TP=1, so slow minutes of a shared
machine hit both sides alike. The "16 rows" column is decode tok/s of 16 prompts at once.

--dtype q4 runs 4-bit weights in groups of 32: a GGUF model's own Q4_0 / Q4_1 blocks (the default
model's), any other model quantized at load. --llama-cpp adds llama.cpp (``make llamacpp-venv``:
llama-cpp-python built from source in ``.venv-llamacpp``) on the GGUF file (--gguf, default: the
default model's) with all cores, through ``llamacpp_row.py``, as the quantized-CPU anchor.

--vllm-tp adds vLLM's CPU build (``make vllm-venv``: its own venv, ``.venv-vllm``) at those TP
degrees, in the same rounds, through ``vllm_row.py``; a configuration it cannot run (no venv,
heads that do not divide) is reported as skipped, with its reason. --plot writes decode tok/s
against TP degree as a PNG (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # _common: random-281m, median_time, one_round

from _common import engine_dtype, median_time, one_round  # noqa: E402


def read_bandwidth(nbytes: int = 2**30, reps: int = 5, tp: int = 1) -> float:
    """GB/s of summing a buffer of ``nbytes`` (the weights' size: this VM reports a large shared
    L3, so a smaller buffer would overstate the bandwidth), on huge pages where the engine's weights
    are (``tpserve.utils.hugepages``), in the thread layout of TP=``tp``:
    with all torch threads at TP=1; else ``tp`` threads at once, each on its rank's cores
    (``rank_cores``) with one torch thread per core, summing its 1/tp of the buffer."""
    import threading

    from tpserve.utils import hugepages
    from tpserve.utils.cpus import rank_cores

    n = max(nbytes, 2**26) // 4 // tp * 4
    # on 2 MiB pages, as the engine keeps its weights (4 KiB pages read ~20% slower here)
    pieces = [(hugepages.huge_page_bytes(n) if hugepages.enabled() else torch.empty(n, dtype=torch.uint8))
              .view(torch.float32).fill_(1.0) for _ in range(tp)]

    def one(x, cores):
        if cores:
            os.sched_setaffinity(0, cores)  # this thread only
        x.sum()
    threads_before = torch.get_num_threads()
    layout = [rank_cores(r, tp) for r in range(tp)] if tp > 1 else [None]
    if tp > 1:
        torch.set_num_threads(max(1, len(layout[0] or [0])))
    times = []
    try:
        for i in range(reps + 1):
            workers = [threading.Thread(target=one, args=(x, c)) for x, c in zip(pieces, layout)]
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            if i:  # the first pass warms up
                times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads_before)
    return sum(x.numel() for x in pieces) * 4 / statistics.median(times) / 1e9


def _with_bandwidth(fn, nbytes: int, tp: int = 1):
    """``fn()``'s result and the memory read bandwidth measured just before and just after it
    (the higher one), in its thread layout: a shared VM's bandwidth drifts by 2x over minutes,
    so each engine is held to the bandwidth of its own moment, and the higher reading makes the
    stricter roofline."""
    before = read_bandwidth(nbytes, tp=tp)
    out = fn()
    return out, max(before, read_bandwidth(nbytes, tp=tp))


def bench_tpserve(model, tp: int, prompt: list[int], new: int, reps: int, compile: bool,
                  dtype: str) -> tuple[float, float, float, float]:
    """(prefill tok/s, decode tok/s, 16-row decode tok/s, seconds of the first generate call,
    which includes compiling): medians of ``reps`` runs, each timed from its own engine steps
    (``one_round``)."""
    from tpserve import LLM, SamplingParams

    compute, quantization = engine_dtype(dtype)
    # prefix caching off: the reps repeat one prompt, and a cached prompt would time one token
    with LLM(model=model, tensor_parallel_size=tp, compile=compile, dtype=compute, quantization=quantization,
             enable_prefix_caching=False) as llm:
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
        first = time.perf_counter() - t
        one_round(llm, prompt, 8)  # warm-up (a compiled graph for many rows)
        runs = [one_round(llm, prompt, new) for _ in range(reps)]
    return (*(statistics.median(r[k] for r in runs) for k in range(3)), first)


def bench_transformers(path, prompt: list[int], new: int, reps: int, dtype: torch.dtype) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    ids = torch.tensor([prompt])

    def run(n: int):
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    run(8)
    t_prefill = median_time(lambda: run(1), reps)
    t_total = median_time(lambda: run(new + 1), reps)
    return len(prompt) / t_prefill, new / (t_total - t_prefill)


VLLM_ROW = Path(__file__).with_name("vllm_row.py")
LLAMACPP_ROW = Path(__file__).with_name("llamacpp_row.py")


def bench_llamacpp(python: Path, gguf_file: Path, prompt_len: int, new: int,
                   reps: int) -> tuple[float, float, None, float] | str:
    """llama.cpp's (prefill, decode tok/s, None, first call s) with all of this process's cores,
    or why it could not run."""
    if not python.exists():
        return f"no llama-cpp-python venv at {python} (make llamacpp-venv)"
    cmd = [str(python), str(LLAMACPP_ROW), str(gguf_file), "--threads", str(len(os.sched_getaffinity(0))),
           "--prompt-len", str(prompt_len), "--new", str(new), "--reps", str(reps)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "timed out after 600 s"
    for line in run.stdout.splitlines():
        if line.startswith("LLAMACPP_ROW "):
            r = json.loads(line.removeprefix("LLAMACPP_ROW "))
            return r["prefill"], r["decode"], None, r["first"]
    return f"exit code {run.returncode}: {(run.stderr.strip().splitlines() or ['no output'])[-1][-300:]}"


def bench_vllm(python: Path, path: Path, tp: int, prompt_len: int, new: int, reps: int,
               dtype: str) -> tuple[float, float, float, float] | str:
    """vLLM's (prefill, decode, 16-row decode tok/s, first call s), or why it could not run.
    Its ranks get one core each at TP > 1 (VLLM_CPU_OMP_THREADS_BIND), as ours do."""
    if not python.exists():
        return f"no vLLM venv at {python} (make vllm-venv)"
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // tp)
    bind = "|".join(",".join(map(str, cores[r * per:(r + 1) * per])) for r in range(tp)) if tp > 1 else "auto"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=bind)
    cmd = [str(python), str(VLLM_ROW), str(path), "--tp", str(tp), "--dtype", dtype, "--prompt-len", str(prompt_len),
           "--new", str(new), "--reps", str(reps)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    except subprocess.TimeoutExpired:
        return "timed out after 1200 s"
    for line in run.stdout.splitlines():
        if line.startswith("VLLM_ROW "):
            r = json.loads(line.removeprefix("VLLM_ROW "))
            return r["prefill"], r["decode"], r["rows16"], r["first"]
    errors = [ln for ln in (run.stderr + run.stdout).splitlines() if "Error" in ln and "Attempted" not in ln]
    return f"exit code {run.returncode}: {(errors or ['no output'])[-1].strip()[-300:]}"


def plot(path: Path, title: str, series: dict[str, dict[int, float]]) -> None:
    """Decode tok/s against TP degree, one line per engine."""
    try:
        import matplotlib
    except ImportError:  # the table above is printed already
        print(f"--plot {path}: skipped, matplotlib is not installed (pip install -e '.[bench]', as make bench does)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        tps = sorted(points)
        ax.plot(tps, [points[t] for t in tps], marker="o", label=name)
    ax.set_xlabel("tensor-parallel degree")
    ax.set_ylabel("batch-1 decode tok/s")
    ax.set_xticks(sorted({t for points in series.values() for t in points}))
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def bytes_per_token(path, dtype: str, gguf: bool = False) -> int:
    """Weight bytes one decoded token reads in ``dtype`` (a --dtype choice): all of them, but
    only one row of an untied input embedding (a tied one is read whole as the LM head). int8
    reads one byte per linear weight and head weight (and a scale per row), q4 half a byte (and a
    float16 scale and min per 32), the embedding and q4's head in their compute dtype (``gguf``: q4
    keeps the GGUF file's Q8_0 embedding and tied head, 34 bytes per 32)."""
    from tpserve.checkpoint.safetensors_io import open_checkpoint
    from tpserve.models.loading import load_config, resolve_dtype

    refs = open_checkpoint(path)
    compute_name = engine_dtype(dtype)[0]
    compute = (resolve_dtype("auto", torch.device("cpu"), load_config(path)) if compute_name == "auto"
               else getattr(torch, compute_name)).itemsize
    head = "lm_head.weight" if "lm_head.weight" in refs else "model.embed_tokens.weight"
    total = 0
    for name, r in refs.items():
        n = math.prod(r.shape)
        if name == "model.embed_tokens.weight" and "lm_head.weight" in refs:
            n = r.shape[1]
        linear = dtype in ("int8", "q4") and name.endswith("proj.weight")
        if linear and dtype == "q4":  # half a byte a weight, a float16 scale and min per 32
            total += n // 2 + 4 * (n // 32)
        elif gguf and dtype == "q4" and name == "model.embed_tokens.weight":
            total += n // 32 * 34
        elif dtype == "int8" and name == head:  # the head's int8 copy (and one float row of a tied embedding)
            total += n + 4 * r.shape[0] + (r.shape[1] * compute if head == "model.embed_tokens.weight" else 0)
        else:
            total += n + 4 * r.shape[0] if linear else n * compute
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory, or random-281m")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tpserve-bench"), help="where random-281m is cached")
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 2, 3, 4])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run every tpserve configuration this often, interleaved")
    parser.add_argument("--dtype", nargs="*", default=["float32"], choices=["float32", "bfloat16", "int8", "q4"],
                        help="each runs at every TP degree (int8, q4: quantized weights, bf16 or fp32 compute)")
    parser.add_argument("--compile-tp", type=int, nargs="*", default=[1],
                        help="TP degrees to run again with compile=True (torch.compile'd decode step)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--vllm-tp", type=int, nargs="*", default=[], help="TP degrees to run vLLM's CPU build at")
    parser.add_argument("--vllm-python", type=Path, default=Path(".venv-vllm/bin/python"),
                        help="the python of vLLM's venv")
    parser.add_argument("--llama-cpp", action="store_true", help="add llama.cpp on the GGUF file")
    parser.add_argument("--llama-cpp-python", type=Path, default=Path(".venv-llamacpp/bin/python"),
                        help="the python of llama-cpp-python's venv")
    parser.add_argument("--gguf", type=Path, default=None, help="the GGUF file for llama.cpp (default: the default "
                                                                 "model's)")
    parser.add_argument("--plot", type=Path, default=None, help="write decode tok/s against TP degree to this PNG")
    args = parser.parse_args()

    from tpserve.checkpoint.resolve import resolve_model_path
    from tpserve.parallel import shm

    if args.model == "random-281m":
        from _common import MODEL_281M, make_checkpoint

        args.model = str(make_checkpoint(args.dir, MODEL_281M, "llama-281m-fp32-v1"))
    shm.extension()  # built once here, not timed inside a first call
    path = resolve_model_path(args.model)
    from_gguf = args.model is None or str(args.model).endswith(".gguf")
    per_token = {d: bytes_per_token(path, d, from_gguf) for d in args.dtype}
    prompt = [1 + (i * 7919) % 20000 for i in range(args.prompt_len)]
    threads = torch.get_num_threads()
    rows = []
    first = args.dtype[0]
    if not args.no_transformers and first not in ("int8", "q4"):
        (prefill, decode), bw = _with_bandwidth(
            lambda: bench_transformers(path, prompt, args.new, args.reps, getattr(torch, first)), per_token[first])
        rows.append(("transformers generate", first, 1, [(prefill, decode, None, None, bw)]))
    configs = [(d, tp, c) for d in args.dtype for c in (False, True) for tp in (args.compile_tp if c else args.tp)]
    runs: dict = {c: [] for c in configs}
    vllm_runs: dict[int, list] = {tp: [] for tp in args.vllm_tp}
    llamacpp_runs: list = []
    gguf_file = args.gguf
    if args.llama_cpp and gguf_file is None:
        from tpserve.checkpoint.default_model import find_default_gguf

        gguf_file = find_default_gguf()
    skipped: dict[int, str] = {}
    for _ in range(args.rounds):
        for dtype, tp, compiled in configs:
            out, bw = _with_bandwidth(lambda: bench_tpserve(args.model, tp, prompt, args.new, args.reps, compiled,
                                                            dtype), per_token[dtype], tp)
            runs[(dtype, tp, compiled)].append((*out, bw))
        if args.llama_cpp and "llama.cpp" not in skipped:
            out, bw = _with_bandwidth(lambda: bench_llamacpp(args.llama_cpp_python, gguf_file, args.prompt_len,
                                                             args.new, args.reps), per_token.get("q4", per_token[first]))
            if isinstance(out, str):
                skipped["llama.cpp"] = out
                print(f"llama.cpp skipped: {out}", flush=True)
            else:
                llamacpp_runs.append((*out, bw))
        for tp in args.vllm_tp:
            if tp in skipped:
                continue
            out, bw = _with_bandwidth(lambda: bench_vllm(args.vllm_python, path, tp, args.prompt_len, args.new,
                                                         args.reps, "bfloat16" if first in ("int8", "q4") else first),
                                      per_token[first], tp)
            if isinstance(out, str):
                skipped[tp] = out
                print(f"vLLM TP={tp} skipped: {out}", flush=True)
            else:
                vllm_runs[tp].append((*out, bw))
    for (dtype, tp, compiled), results in runs.items():
        rows.append(("tpserve --compile" if compiled else "tpserve", dtype, tp, results))
    if llamacpp_runs:
        rows.append(("llama.cpp", "q4" if "q4" in per_token else first, 1, llamacpp_runs))
    for tp, results in vllm_runs.items():
        if results:
            rows.append(("vLLM CPU", "bfloat16" if first in ("int8", "q4") else first, tp, results))
    weights = ", ".join(f"{d} {b / 1e6:.0f} MB" for d, b in per_token.items())
    print(f"\nmodel {path.name}: weights read per decoded token: {weights} "
          f"({threads} threads, prompt {args.prompt_len} tokens, {args.new} new tokens, {args.rounds} round(s))")
    print("roofline = memory read bandwidth (measured around each engine's runs, in its TP layout) / bytes per token\n")
    med = statistics.median
    base = med(r[1] for r in rows[0][3]) if rows and rows[0][0] == "transformers generate" else None
    print(f"{'engine':<22}{'dtype':>9}{'TP':>3}{'prefill tok/s':>15}{'decode tok/s':>14}{'16 rows tok/s':>15}"
          f"{'read GB/s':>11}{'of roofline':>13}{'vs transformers':>17}{'decode vs TP=1':>16}{'prefill vs TP=1':>17}"
          f"{'16 rows vs TP=1':>17}{'decode vs fp32':>16}{'first call s':>14}")
    for name, dtype, tp, results in rows:
        prefill, decode = med(r[0] for r in results), med(r[1] for r in results)
        bw = med(r[-1] for r in results)
        many = med(r[2] for r in results) if results[0][2] is not None else None
        first_call = results[0][3]
        compiled = name.endswith("--compile")
        one = vllm_runs.get(1) if name == "vLLM CPU" else None if name == "llama.cpp" else runs.get((dtype, 1, compiled))
        ratios = ["", "", ""]
        if name != "transformers generate" and one:
            ratios = [f"{med(r[i] / o[i] for r, o in zip(results, one)):.2f}x" for i in (1, 0, 2)]
        fp32 = runs.get(("float32", tp, compiled)) if name.startswith("tpserve") and dtype != "float32" else None
        vs_fp32 = f"{med(r[1] / o[1] for r, o in zip(results, fp32)):.2f}x" if fp32 else ""
        vs = f"{decode / base:.2f}x" if base else ""
        print(f"{name:<22}{dtype:>9}{tp:>3}{prefill:>15.0f}{decode:>14.1f}{'' if many is None else f'{many:.1f}':>15}"
              f"{bw:>11.1f}{decode / (bw * 1e9 / per_token[dtype]):>13.0%}{vs:>17}{ratios[0]:>16}{ratios[1]:>17}"
              f"{ratios[2]:>17}{vs_fp32:>16}{'' if first_call is None else f'{first_call:.1f}':>14}")
    for tp, why in skipped.items():
        print(f"{tp}: skipped ({why})" if tp == "llama.cpp" else f"vLLM CPU TP={tp}: skipped ({why})")
    for dtype in args.dtype:
        ours = runs.get((dtype, 1, False))
        if llamacpp_runs and ours:
            print(f"tpserve {dtype} TP=1 / llama.cpp ({gguf_file.name}, {threads} threads): decode "
                  f"{med(r[1] for r in ours) / med(r[1] for r in llamacpp_runs):.2f}x, "
                  f"prefill {med(r[0] for r in ours) / med(r[0] for r in llamacpp_runs):.2f}x")
    for tp, theirs in vllm_runs.items():
        for dtype in args.dtype:
            ours = runs.get((dtype, tp, False))
            if theirs and ours:
                print(f"tpserve {dtype} TP={tp} / vLLM TP={tp}: decode "
                      f"{med(r[1] for r in ours) / med(r[1] for r in theirs):.2f}x, "
                      f"prefill {med(r[0] for r in ours) / med(r[0] for r in theirs):.2f}x, "
                      f"16 rows {med(r[2] for r in ours) / med(r[2] for r in theirs):.2f}x")
    if args.plot:
        series: dict[str, dict[int, float]] = {}
        for name, dtype, tp, results in rows:
            if name != "transformers generate":
                series.setdefault(f"{name} {dtype}", {})[tp] = med(r[1] for r in results)
        plot(args.plot, f"{path.name}, {threads} cores ({time.strftime('%Y-%m-%d')})", series)


if __name__ == "__main__":
    main()
