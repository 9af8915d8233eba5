"""lm-evaluation-harness parity: ``lm_eval --model local-completions`` against ``tpserve serve``
gives the same per-choice log-likelihoods and the same accuracy as ``lm_eval --model hf``.

    make lmeval-venv   # once: lm-eval in its own venv, .venv-lmeval
    .venv/bin/python benchmarks/lm_eval_parity.py [--tp 1 2] [--model DIR] [--batch-size 4]

Both sides run the tiny offline multiple-choice task in ``benchmarks/lm_eval_task``
(``tpserve_mc``: one-word completions, four choices each) on the same model (the default
SmolLM2-135M-Instruct unless --model), float32 on CPU, everything offline:

* ``hf``: transformers inside lm-eval (``--model hf --model_args pretrained=DIR,dtype=float32``);
* ``tpserve TP=N``: ``python -m tpserve serve --dtype float32 --tp N`` on a free loopback port,
  queried by lm-eval's ``local-completions`` model with token-id prompts
  (``tokenized_requests=True``, the model's own tokenizer), i.e. ``/v1/completions`` with
  ``echo``, ``logprobs=1`` and ``max_tokens=1``.

Both write their samples (``--log_samples``); for every document and choice the script compares
the (log-likelihood, is_greedy) pair. A TP row passes when every |delta log-likelihood| is at most
1e-3 and its accuracy equals hf's. Exit status 1 when a row fails; a missing ``.venv-lmeval``
skips the comparison (exit 0) and says how to build it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LMEVAL = ROOT / ".venv-lmeval" / "bin" / "lm_eval"
TASK = "tpserve_mc"
TASK_DIR = "benchmarks/lm_eval_task"  # its YAML names the data file relative to ROOT
TOL = 1e-3
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}

ACCESS = re.compile(r'"[A-Z]+ \S+ HTTP/[\d.]+" (\d{3})')  # a uvicorn access-log line
Samples = dict[int, dict]  # doc_id -> {"ll": [per choice], "greedy": [...], "acc": float}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def run_lm_eval(model: str, model_args: str, out: Path, extra: list[str], log: Path) -> float:
    """One ``lm_eval`` run on the task with samples logged under ``out``; its wall time in s."""
    cmd = [str(LMEVAL), "--model", model, "--model_args", model_args, "--tasks", TASK,
           "--include_path", TASK_DIR, "--log_samples", "--output_path", str(out), *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"lm_eval --model {model} exited {rc}; last lines of {log}:\n"
                 + "".join(log.read_text().splitlines(keepends=True)[-30:]))
    return time.perf_counter() - t0


def read_samples(out: Path) -> Samples:
    files = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    if not files:
        sys.exit(f"no samples_{TASK}_*.jsonl under {out}")
    samples: Samples = {}
    for line in files[-1].read_text().splitlines():
        s = json.loads(line)
        pairs = [(float(ll), bool(greedy)) for ll, greedy in s["filtered_resps"]]
        samples[s["doc_id"]] = {"ll": [p[0] for p in pairs], "greedy": [p[1] for p in pairs],
                                "acc": float(s["acc"])}
    return samples


def accuracy(samples: Samples) -> float:
    return sum(s["acc"] for s in samples.values()) / len(samples)


def compare(ref: Samples, got: Samples) -> tuple[float, int, str]:
    """Largest |delta ll| over all choices, is_greedy disagreements, and a reason when unmatched."""
    if ref.keys() != got.keys():
        return float("inf"), 0, f"doc ids differ: {sorted(ref.keys() ^ got.keys())}"
    worst, greedy_diff = 0.0, 0
    for doc, r in ref.items():
        g = got[doc]
        if len(r["ll"]) != len(g["ll"]):
            return float("inf"), 0, f"doc {doc}: {len(r['ll'])} vs {len(g['ll'])} choices"
        worst = max([worst, *(abs(a - b) for a, b in zip(r["ll"], g["ll"]))])
        greedy_diff += sum(a != b for a, b in zip(r["greedy"], g["greedy"]))
    return worst, greedy_diff, ""


def serve_and_eval(model_dir: str, tp: int, out: Path, batch_size: int) -> tuple[Samples, float]:
    port = free_port()
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "tpserve", "serve", "--model", model_dir,
           "--dtype", "float32", "--device", "cpu", "--tp", str(tp), "--port", str(port)]
    print("$", " ".join(cmd), flush=True)
    log = out.parent / f"server-tp{tp}.log"
    with open(log, "w") as f:
        server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, stdout=f, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                sys.exit(f"tpserve serve exited {server.returncode}; see {log}:\n{log.read_text()[-3000:]}")
            try:
                if get_json(f"{url}/health") is not None:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"tpserve serve --tp {tp} not healthy after 600 s; see {log}")
            time.sleep(0.5)
        name = get_json(f"{url}/v1/models")["data"][0]["id"]
        args = (f"base_url={url}/v1/completions,model={name},tokenizer={model_dir},"
                "tokenized_requests=True,tokenizer_backend=huggingface")
        secs = run_lm_eval("local-completions", args, out, ["--batch_size", str(batch_size)], out.parent / f"lm_eval-tp{tp}.log")
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    errors = [line.strip() for line in log.read_text().splitlines()
              if (m := ACCESS.search(line)) and int(m.group(1)) >= 400]
    if errors:
        print(f"server TP={tp} answered errors:\n  " + "\n  ".join(errors[:10]), flush=True)
    return read_samples(out), secs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tpserve TP degrees")
    parser.add_argument("--model", default=None, help="transformers directory (default: the embedded model)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per /v1/completions request")
    args = parser.parse_args()
    if not LMEVAL.exists():
        print(f"lm-eval parity: skipped (no {LMEVAL.relative_to(ROOT)}; run `make lmeval-venv`)")
        return 0
    from tpserve.checkpoint.resolve import resolve_model_path
    model_dir = str(resolve_model_path(args.model))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmeval-parity-") as tmp:
        ref_secs = run_lm_eval("hf", f"pretrained={model_dir},dtype=float32", Path(tmp) / "hf",
                               ["--device", "cpu", "--batch_size", "1"], Path(tmp) / "lm_eval-hf.log")
        ref = read_samples(Path(tmp) / "hf")
        rows = [f"| hf (transformers) | - | {len(ref)} | {sum(map(len, (s['ll'] for s in ref.values())))} "
                f"| - | - | {accuracy(ref):.4f} | {ref_secs:.0f} | reference |"]
        failed = False
        for tp in args.tp:
            got, secs = serve_and_eval(model_dir, tp, Path(tmp) / f"tp{tp}", args.batch_size)
            worst, greedy_diff, why = compare(ref, got)
            ok = not why and worst <= TOL and accuracy(got) == accuracy(ref)
            failed |= not ok
            verdict = "PASS" if ok else f"FAIL{': ' + why if why else ''}"
            rows.append(f"| tpserve local-completions | {tp} | {len(got)} | "
                        f"{sum(map(len, (s['ll'] for s in got.values())))} | {worst:.2e} | {greedy_diff} | "
                        f"{accuracy(got):.4f} | {secs:.0f} | {verdict} |")
    print(f"\nlm-eval parity on {TASK}, {model_dir}, float32 CPU "
          f"(tolerance |delta ll| <= {TOL:g}, equal accuracy)\n")
    print("| backend | TP | docs | choices | max abs delta ll | is_greedy diffs | acc | lm_eval s | result |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
