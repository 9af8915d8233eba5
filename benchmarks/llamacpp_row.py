"""llama.cpp (through llama-cpp-python) on a GGUF file, with the prompt and token counts of
``generate.py``, which runs it in llama.cpp's own venv (``make llamacpp-venv``); prints one
JSON line of tok/s.

    .venv-llamacpp/bin/python benchmarks/llamacpp_row.py FILE.gguf --threads 2

Prefill evaluates the whole prompt in one batch; decode evaluates one token at a time after
it, as a greedy batch-1 generation does (the next token's value does not change the cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from llama_cpp import Llama

    llm = Llama(args.gguf, n_ctx=1024, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    prompt = [1 + (i * 7919) % 20000 for i in range(args.prompt_len)]

    def run(new: int) -> tuple[float, float]:
        """Seconds of the prompt's evaluation and of the ``new`` tokens after it, in one run."""
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        t_prompt = time.perf_counter()
        for i in range(new):
            llm.eval([prompt[i % len(prompt)]])
        return t_prompt - t, time.perf_counter() - t_prompt

    t = time.perf_counter()
    run(8)
    first = time.perf_counter() - t
    runs = [run(args.new) for _ in range(args.reps)]
    t_prefill = statistics.median(r[0] for r in runs)
    t_decode = statistics.median(r[1] for r in runs)
    print("LLAMACPP_ROW", json.dumps({"prefill": args.prompt_len / t_prefill, "decode": args.new / t_decode,
                                      "rows16": None, "first": first}), flush=True)


if __name__ == "__main__":
    main()
