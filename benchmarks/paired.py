"""Two engine configurations up at once in one process, measured in alternating runs, for
ratios that a noisy machine's drift cannot fake: TP = 2 against TP = 1 (issue 11), bf16 or int8
against fp32 (issue 14).

    .venv/bin/python benchmarks/paired.py --model random-281m --tp 1 2 --dtype bfloat16 --pairs 8
    .venv/bin/python benchmarks/paired.py --tp 1 2 --dtype float32 bfloat16 --pairs 8

The first ``--tp`` and the first ``--dtype`` are the baselines: every other TP degree is compared
with the first at each dtype, and every other dtype with the first at each TP degree. Each
comparison starts just its two engines (a third engine's idle workers would share their cores)
and runs ``--pairs`` rounds, each running both once, in alternating order:

* one ``--prompt-len`` prompt: prefill tok/s is its length over the time to its first token, and
  batch-1 decode tok/s is its ``--new`` further tokens over the time from its first token to its
  last. Both come from one run's step times, not from the difference of two runs, which on this
  VM moved a 16-row figure by 2x between rounds of ``generate.py``;
* 16 prompts of 32 tokens: 16-row decode tok/s counts the tokens of the steps after every row
  has its first token.

While one engine runs, the other's workers wait for their next command (napping, see
``parallel/csrc/shm_comm.cpp``). Reports both engines' medians, the ratios of the medians, and in
how many rounds the configuration's batch-1 decode came out at least as fast as its baseline's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # _common

from _common import MODEL_281M, ROW_NEW, ROW_PROMPT, engine_dtype, make_checkpoint, one_round  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory, or random-281m (default: the default model)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tpserve-bench"), help="where random-281m is cached")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16", "int8", "q4"])
    parser.add_argument("--pairs", type=int, default=8, help="rounds (each runs every engine once)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    if args.pairs < 1 or args.new < 1:
        parser.error(f"--pairs and --new must be at least 1, got {args.pairs} and {args.new}")
    if args.model == "random-281m":
        args.model = str(make_checkpoint(args.dir, MODEL_281M, "llama-281m-fp32-v1"))

    from tpserve.parallel import shm

    shm.extension()  # built once here, before any engine's workers start
    base_tp, base_dtype = args.tp[0], args.dtype[0]
    comparisons = [((d, base_tp), (d, tp)) for d in args.dtype for tp in args.tp[1:]]
    comparisons += [((base_dtype, tp), (d, tp)) for tp in args.tp for d in args.dtype[1:]]
    if not comparisons:
        parser.error("give at least two configurations (two --tp degrees or two --dtype choices)")
    prompt = [1 + (i * 7919) % 20000 for i in range(args.prompt_len)]
    print(f"model {args.model or 'default'}, {args.pairs} rounds; prompt {args.prompt_len} tokens, {args.new} new; "
          f"16 rows of {ROW_PROMPT} tokens, {ROW_NEW} new; medians, and the ratio of the medians")
    print("| configuration | against | prefill tok/s | batch-1 decode tok/s | 16-row decode tok/s | prefill "
          "| batch-1 decode | 16-row decode | rounds decode >= baseline |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for base, other in comparisons:
        results = compare([base, other], args.model, prompt, args.new, args.pairs)
        med = {c: [statistics.median(r[k] for r in results[c]) for k in range(3)] for c in (base, other)}
        won = sum(x[1] >= y[1] for x, y in zip(results[other], results[base]))
        cells = " | ".join(f"{med[other][k]:.1f} / {med[base][k]:.1f}" for k in range(3))
        ratios = " | ".join(f"{med[other][k] / med[base][k]:.2f}x" for k in range(3))
        print(f"| {other[0]} TP={other[1]} | {base[0]} TP={base[1]} | {cells} | {ratios} | {won}/{args.pairs} |",
              flush=True)


def compare(configs: list[tuple[str, int]], model: str | None, prompt: list[int], new: int,
            rounds: int) -> dict[tuple, list]:
    """Each configuration's ``rounds`` results, its engine up beside the other's (only these two,
    so that no third engine's idle workers share their cores), run in alternating order."""
    from tpserve import LLM

    results: dict[tuple, list] = {c: [] for c in configs}
    with ExitStack() as stack:
        engines = {}
        for dtype, tp in configs:
            compute, quantization = engine_dtype(dtype)
            # prefix caching off: every round repeats the prompts, and a cached prompt would time one token
            engines[(dtype, tp)] = llm = stack.enter_context(LLM(
                model=model, tensor_parallel_size=tp, dtype=compute, quantization=quantization,
                enable_prefix_caching=False))
            one_round(llm, prompt, 8)  # warm-up
        for i in range(rounds):
            for c in configs if i % 2 == 0 else configs[::-1]:
                results[c].append(one_round(engines[c], prompt, new))
    return results


if __name__ == "__main__":
    main()
