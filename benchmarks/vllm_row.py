"""vLLM's CPU build on the same model and prompt as ``generate.py``, run by that benchmark in
vLLM's own venv (``make vllm-venv``); prints one JSON line of tok/s.

    .venv-vllm/bin/python benchmarks/vllm_row.py MODEL_DIR --tp 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(args.model, tensor_parallel_size=args.tp, dtype=args.dtype, skip_tokenizer_init=True,
              max_model_len=1024, enforce_eager=False)
    prompt = {"prompt_token_ids": [1 + (i * 7919) % 20000 for i in range(args.prompt_len)]}

    def timed(prompts, n: int) -> float:
        sp = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t = time.perf_counter()
    timed([prompt], 8)
    first = time.perf_counter() - t
    t_prefill, t_total = timed([prompt], 1), timed([prompt], args.new + 1)
    rows = [{"prompt_token_ids": prompt["prompt_token_ids"][:32]}] * 16
    timed(rows, 17)
    t16_prefill, t16_total = timed(rows, 1), timed(rows, 17)
    print("VLLM_ROW", json.dumps({"prefill": args.prompt_len / t_prefill, "decode": args.new / (t_total - t_prefill),
                                  "rows16": 16 * 16 / (t16_total - t16_prefill), "first": first}), flush=True)


if __name__ == "__main__":
    main()
