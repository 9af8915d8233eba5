"""Serving throughput and latency: ``tpserve serve`` at TP=1 and TP=2 beside a transformers
baseline, at 1, 4 and 16 concurrent clients, in one run.

    .venv/bin/python benchmarks/serve.py [--tp 1 2] [--compile-tp 1] [--clients 1 4 16] [--new 32] [--model PATH]

Every backend is a real HTTP server on 127.0.0.1 in a process of its own, loaded with the same
model (the default SmolLM2-135M-Instruct unless --model), fp32 on CPU:

* ``tpserve TP=N``: ``python -m tpserve serve --tp N`` (continuous batching, up to 16 requests);
  with ``--compile`` for the --compile-tp degrees (its compile happens before /health answers).
* ``transformers``: the baseline, a minimal FastAPI server in this file (``--baseline-server``)
  that runs ``AutoModelForCausalLM.generate`` for one request at a time behind a lock: requests
  queue, nothing is batched. It is the plain way to put a Hugging Face model behind HTTP.

The load: N concurrent clients (asyncio + httpx, in this process), each sending its next
non-streaming ``/v1/completions`` request as soon as the previous one returns, greedy, exactly
--new tokens each (``ignore_eos``), prompts of 4-10 tokens taken round-robin from a fixed list.
Throughput is generated tokens / wall time of the level; latency is per request, end to end
(queueing included); p99 of a few dozen requests is close to the maximum. One warm-up request
per backend is not counted.
"""

import argparse
import asyncio
import itertools
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["The capital of Germany is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "import numpy as np\n", "My favourite food is",
           "Water boils at", "The quick brown fox", "In 1969, humans", "The largest planet in the solar system is",
           "To make a cup of tea, first", "Dear Sir or Madam,", "The meaning of life is",
           "SELECT * FROM users WHERE", "Photosynthesis is the process", "One, two, three,"]


# ---- the baseline server -------------------------------------------------------------------

def baseline_server(model_path: str, port: int) -> None:
    """transformers ``generate``, one request at a time, behind a minimal OpenAI-shaped endpoint."""
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    lock = threading.Lock()  # one generate at a time: the others wait here, in the thread pool
    app = FastAPI()

    def generate(prompt: str, max_tokens: int, ignore_eos: bool) -> tuple[str, int, int]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with lock, torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens if ignore_eos else None, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:]
        return tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], len(new)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        body = await request.json()
        text, n_prompt, n_new = await asyncio.to_thread(generate, body["prompt"], body.get("max_tokens", 16),
                                                        body.get("ignore_eos", False))
        return {"object": "text_completion", "model": Path(model_path).name,
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- running backends ----------------------------------------------------------------------

def start(cmd: list[str], url: str, log: Path) -> subprocess.Popen:
    """Start a server process and wait until its /health answers."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{' '.join(cmd)} did not become healthy in 10 minutes")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.25)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation between the few samples a run has)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def load(url: str, model: str, clients: int, requests: int, new: int) -> dict:
    """``clients`` concurrent closed-loop clients sending ``requests`` requests in all."""
    numbers = itertools.count()
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while (i := next(numbers)) < requests:
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": new, "temperature": 0,
                    "ignore_eos": True}
            t = time.perf_counter()
            r = await http.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:500]}")
            got = r.json()["usage"]["completion_tokens"]
            if got != new:
                raise RuntimeError(f"{url}: asked for {new} tokens, got {got}")
            tokens += got

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(clients)])
        wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens / wall, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "requests": requests, "wall": wall}


def bench_backend(name: str, cmd: list[str], port: int, model: str, levels: list[int], new: int, per_client: int,
                  min_requests: int, logdir: Path) -> list[tuple]:
    url = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    proc = start(cmd, url, logdir / f"{name.replace(' ', '_').replace('=', '')}.log")
    print(f"  {name}: up in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    rows = []
    try:
        asyncio.run(load(url, model, 1, 1, new))  # warm-up
        for clients in levels:
            requests = max(min_requests, per_client * clients)
            r = asyncio.run(load(url, model, clients, requests, new))
            print(f"  {name}, {clients} clients: {r['tokens_per_s']:.1f} tok/s, p50 {r['p50']:.2f}s, "
                  f"p99 {r['p99']:.2f}s ({requests} requests in {r['wall']:.1f}s)", file=sys.stderr, flush=True)
            rows.append((name, clients, requests, r["tokens_per_s"], r["p50"], r["p99"]))
    finally:
        stop(proc)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="transformers directory (default: the embedded default model)")
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--compile-tp", type=int, nargs="*", default=[1],
                        help="TP degrees to run again with serve --compile")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--per-client", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--min-requests", type=int, default=6, help="at least this many requests per level")
    parser.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from tpserve.checkpoint.resolve import resolve_model_path
    from tpserve.utils.net import free_port

    path = str(resolve_model_path(args.model))
    if args.baseline_server:
        baseline_server(path, args.port)
        return
    name = Path(path).name
    started = time.perf_counter()
    print(f"benchmarking {name}: {args.new} tokens per request, clients {args.clients}", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tpserve-bench-") as tmp:
        logdir = Path(tmp)
        if not args.no_baseline:
            port = free_port()
            cmd = [sys.executable, os.path.abspath(__file__), "--baseline-server", "--port", str(port),
                   "--model", path]
            rows += bench_backend("transformers", cmd, port, name, args.clients, args.new, args.per_client,
                                  args.min_requests, logdir)
        runs = [(tp, False) for tp in args.tp] + [(tp, True) for tp in args.compile_tp]
        for tp, compiled in runs:
            port = free_port()
            cmd = [sys.executable, "-m", "tpserve", "serve", "--model", path, "--tp", str(tp), "--port", str(port)]
            label = f"tpserve TP={tp}" + (" --compile" if compiled else "")
            rows += bench_backend(label, cmd + ["--compile"] * compiled, port, name, args.clients, args.new,
                                  args.per_client, args.min_requests, logdir)

    print(f"\n{name}, {args.new} new tokens per request, fp32, {os.cpu_count()} CPU cores, "
          f"{time.strftime('%Y-%m-%d')}, total {time.perf_counter() - started:.0f}s\n")
    print("| backend | clients | requests | tokens/s | p50 latency | p99 latency |")
    print("|---|---:|---:|---:|---:|---:|")
    for backend, clients, requests, tps, p50, p99 in rows:
        print(f"| {backend} | {clients} | {requests} | {tps:.1f} | {p50:.2f} s | {p99:.2f} s |")


if __name__ == "__main__":
    main()
