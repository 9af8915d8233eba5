"""Checkpoint loading: tpserve's rank-sliced loader against transformers' tensor-parallel loader.

    .venv/bin/python benchmarks/load.py [--tp 2] [--dir /tmp/tpserve-bench] [--reps 3] [--no-warm]

Checks the two loading targets of issue 3 on a random ~620 MB fp32 Llama checkpoint (made once
and cached in --dir):

* memory: each rank's peak RSS while loading <= its shard's bytes + 300 MB;
* speed: "load called" -> "model ready" at least 3x faster than transformers'
  ``from_pretrained`` with ``tp_plan="auto"`` at the same TP degree, measured side by side.

Every load runs in freshly spawned ranks, so each rank's peak RSS (VmHWM) belongs to that one
load. The two tools alternate (one warm-up each, then --reps timed runs each) and the table
shows medians; the per-run lines printed before it show every run, warm-ups included. A load's
time is the slowest rank's, from a barrier just before the call to its return. Two settings:
"cold" ranks have imported only torch and the tool's entry point, so each tool pays its own
lazy imports inside the timer; "warm" ranks have imported transformers' Llama modules first,
which leaves the loaders' own work. MB here is 10^6 bytes.

transformers' TP loading needs ``accelerate``, which tpserve does not depend on; without it the
transformers side falls back to a single-process ``from_pretrained`` and says so.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from _common import make_checkpoint

from tpserve.parallel.launch import launch_local

MB = 1e6
CHUNK = 64 * 1024 * 1024
PROMPT = [1, 306, 4658, 278, 6593, 310, 2834, 338]  # any in-vocabulary ids
MEMORY_SLACK = 300 * MB
SPEED_TARGET = 3.0

WARM_MODULES = ("transformers.models.llama.configuration_llama", "transformers.models.llama.modeling_llama")


# --------------------------------------------------------------------------- checkpoint


def checkpoint_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


# --------------------------------------------------------------------------- page cache


def _read_chunks(chunks: list[tuple[Path, int, int]], fresh: bool) -> None:
    """Read (file, offset, length) chunks with plain reads; into one reused 64 MiB buffer, or with
    ``fresh`` into newly allocated memory, which pays page faults the way a loader's new
    tensors do."""
    buf = None if fresh else np.empty(CHUNK, dtype=np.uint8)
    for path, offset, length in chunks:
        dest = np.empty(length, dtype=np.uint8) if fresh else buf
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            mv, done = memoryview(dest)[:length], 0
            while done < length:
                n = f.readinto(mv[done:])
                if not n:
                    raise OSError(f"{path}: short read at byte {offset + done}")
                done += n


def page_cache_bandwidth(files: list[Path], readers: int, fresh: bool, repeats: int = 5) -> float:
    """GB/s reading ``files`` from the page cache with ``readers`` threads: the best of
    ``repeats``, as a ceiling (this machine is shared, so slower repeats are other load).
    The files are read once first, so they are cached."""
    chunks = [(p, off, min(CHUNK, p.stat().st_size - off)) for p in files for off in range(0, p.stat().st_size, CHUNK)]
    total = sum(c[2] for c in chunks)
    _read_chunks(chunks, fresh=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(readers) as pool:
            list(pool.map(lambda r: _read_chunks(chunks[r::readers], fresh), range(readers)))
        times.append(time.perf_counter() - t0)
    return total / min(times) / 1e9


# --------------------------------------------------------------------------- ranks


def _rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process.

    Not ``getrusage().ru_maxrss``: a spawned rank is forked from the driver and then exec'd, and
    ru_maxrss keeps the high-water mark of the forked copy, so it reports the driver's RSS
    (measured: a driver at 1 GB gives children ru_maxrss = 1 GB, VmHWM = 220 MB). VmHWM
    belongs to the exec'd image only.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _local_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds, each storage once (tied weights, DTensor shards)."""
    seen, total = set(), 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total


def _write_result(outdir: str, tool: str, rank: int, **fields) -> None:
    Path(outdir, f"{tool}-rank{rank}.json").write_text(json.dumps(dict(tool=tool, rank=rank, **fields)))


def _import_warm(warm: bool) -> None:
    """With ``warm``, import transformers' Llama modules up front, as a process that has already
    read a config or built a model has them; both tools import them lazily otherwise."""
    if warm:
        for name in WARM_MODULES:
            importlib.import_module(name)


def _timed(module, name: str, phases: dict[str, float]) -> None:
    """Replace ``module.name`` by a wrapper recording its duration in ``phases[name]``: only observes."""
    fn = getattr(module, name, None)
    if fn is None:
        return

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = time.perf_counter() - t0

    setattr(module, name, wrapper)


def _forwards(forward) -> tuple[object, list[float]]:
    """Run the prompt's forward twice; its output and both durations.

    "Model ready" need not mean the weights are in memory: transformers on CPU keeps most
    parameters as views of the mmap'd checkpoint, so its first forward pages them in. The first
    forward's extra time over the second is the part of loading that a load timer misses.
    """
    times = []
    for _ in range(2):
        dist.barrier()
        t0 = time.perf_counter()
        out = forward()
        times.append(time.perf_counter() - t0)
    return out, times


def tpserve_rank(path: str, outdir: str, tool: str, warm: bool) -> None:
    """One tpserve rank: import the entry point, then load with nothing heavy before it."""
    entered = time.perf_counter()
    import tpserve.models.loading as loading
    from tpserve.engine.runner import full_logits
    from tpserve.models import load_model

    _import_warm(warm)
    imports = time.perf_counter() - entered
    phases: dict[str, float] = {}
    _timed(loading, "load_config", phases)  # where the time goes inside load_model
    _timed(loading, "load_weights", phases)
    rank = dist.get_rank()
    baseline = _rss_bytes("VmRSS")
    dist.barrier()
    t0 = time.perf_counter()
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    peak = _rss_bytes("VmHWM")
    logits, forwards = _forwards(lambda: full_logits(model, [PROMPT]))
    if rank == 0:
        torch.save(logits[0], Path(outdir, f"logits-{tool}.pt"))
    _write_result(outdir, tool, rank, seconds=seconds, cold=imports + seconds, forwards=forwards, baseline=baseline,
                  peak=peak, peak_fwd=_rss_bytes("VmHWM"), shard=_local_bytes(model), phases=phases,
                  finite=None if logits is None else bool(torch.isfinite(logits[0]).all()))


def transformers_rank(path: str, outdir: str, tool: str, warm: bool, tp: bool) -> None:
    """One transformers rank: ``from_pretrained`` with the model's own TP plan (``tp_plan="auto"``),
    or, with ``tp`` False, a plain single-process load."""
    entered = time.perf_counter()
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    _import_warm(warm)
    imports = time.perf_counter() - entered
    transformers.utils.logging.disable_progress_bar()  # tpserve loads with progress=False too
    # DistributedConfig(tp_plan="auto") is what from_pretrained(tp_plan="auto") builds; this
    # spelling avoids its deprecation warning.
    kwargs = dict(distributed_config=DistributedConfig(tp_plan="auto")) if tp else {}
    rank = dist.get_rank()
    baseline = _rss_bytes("VmRSS")
    dist.barrier()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)  # errors reach the driver
    seconds = time.perf_counter() - t0
    peak = _rss_bytes("VmHWM")
    model.eval()
    with torch.no_grad():
        logits, forwards = _forwards(lambda: model(torch.tensor([PROMPT])).logits[0].float())
    if rank == 0:
        torch.save(logits, Path(outdir, f"logits-{tool}.pt"))
    _write_result(outdir, tool, rank, seconds=seconds, cold=imports + seconds, forwards=forwards, baseline=baseline,
                  peak=peak, peak_fwd=_rss_bytes("VmHWM"), shard=_local_bytes(model), phases={},
                  finite=bool(torch.isfinite(logits).all()) if rank == 0 else None)


# --------------------------------------------------------------------------- driver


def run_once(lib: str, warm: bool, path: Path, tp: int, outdir: Path) -> dict:
    """Load once in freshly spawned ranks: the ranks' results, and the slowest rank's times."""
    tool = lib + (" warm" if warm else "")
    key = tool.replace(" ", "-")
    for old in outdir.glob(f"{key}-rank*.json"):
        old.unlink()
    if lib == "tpserve":
        launch_local(tpserve_rank, tp, str(path), str(outdir), key, warm)
    elif lib == "transformers":
        launch_local(transformers_rank, tp, str(path), str(outdir), key, warm, True)
    else:  # "transformers-1proc", the fallback: one process holding the whole model
        launch_local(transformers_rank, 1, str(path), str(outdir), key, warm, False)
    ranks = [json.loads(p.read_text()) for p in sorted(outdir.glob(f"{key}-rank*.json"))]
    return dict(tool=tool, key=key, ranks=ranks, seconds=max(r["seconds"] for r in ranks),
                cold=max(r["cold"] for r in ranks),
                ready=max(r["seconds"] + max(0.0, r["forwards"][0] - r["forwards"][1]) for r in ranks))


def _mb(n: float) -> str:
    return f"{n / MB:.0f}"


def describe(run: dict, ckpt_bytes: int) -> str:
    """One run on one line: every rank's load time, phases, forwards and peak RSS."""
    parts = []
    for r in run["ranks"]:
        phases = "".join(f" {k.removeprefix('load_')} {v:.2f}" for k, v in r["phases"].items())
        fwd = "/".join(f"{t:.2f}" for t in r["forwards"])
        parts.append(f"r{r['rank']} {r['seconds']:.2f}s{phases} fwd {fwd} peak {_mb(r['peak'])}/{_mb(r['peak_fwd'])} MB")
    return (f"{run['tool']:<23} load {run['seconds']:5.2f} s {ckpt_bytes / run['seconds'] / 1e9:5.2f} GB/s  "
            f"+1st-fwd {run['ready']:5.2f} s  cold {run['cold']:5.2f} s  ({'; '.join(parts)})")


def check_logits(outdir: Path, ours_key: str, theirs_key: str, last_run: dict) -> None:
    """Finite rank-0 logits, and how far they are from transformers' on the same prompt."""
    ours = torch.load(outdir / f"logits-{ours_key}.pt")
    theirs = torch.load(outdir / f"logits-{theirs_key}.pt")
    finite = all(r["finite"] for r in last_run["ranks"] if r["finite"] is not None)
    print(f"\ncorrectness: tpserve rank-0 logits {list(ours.shape)} finite: {finite}; max |tpserve - {theirs_key}| = "
          f"{(ours - theirs).abs().max().item():.2e} (largest logit {theirs.abs().max().item():.2f})")


def _median(runs: list[dict], field: str) -> float:
    return statistics.median(r[field] for r in runs)


def print_table(runs: dict[str, list[dict]], ckpt_bytes: int, reps: int) -> None:
    """The summary table: medians of the timed runs; RSS of the last timed run."""
    print(f"""
median of {reps} timed runs per tool (s = seconds, slowest rank):
  load s    "load called" -> "model ready": the load call alone; GB/s = whole checkpoint ({ckpt_bytes / MB:.0f} MB) / load s
  +fwd s    load s + (1st forward - 2nd forward): adds what the first forward pays for a lazy load (mmap page-ins)
  cold s    load s + importing the tool's entry point in the fresh rank (torch was already imported)
RSS and shard in MB (last timed run): base = RSS just before the load call, peak = VmHWM after it,
  peak+fwd = VmHWM after two forwards of an {len(PROMPT)}-token prompt (transformers keeps CPU weights as views of
  the mmap'd files when dtypes match: they count in RSS only once a forward touches them)""")
    head = (f"{'tool':<23} {'TP':>2} {'load s':>6} {'GB/s':>5} {'+fwd s':>6} {'cold s':>6} {'rank':>4} {'base':>5} "
            f"{'peak':>5} {'peak+fwd':>8} {'shard':>5} {'peak-shard':>10} {'peak-base-shard':>15}")
    print(head)
    print("-" * len(head))
    for tool, rs in runs.items():
        load = _median(rs, "seconds")
        for i, r in enumerate(rs[-1]["ranks"]):
            lead = (f"{tool:<23} {len(rs[-1]['ranks']):>2} {load:>6.2f} {ckpt_bytes / load / 1e9:>5.2f} "
                    f"{_median(rs, 'ready'):>6.2f} {_median(rs, 'cold'):>6.2f}" if i == 0 else " " * 53)
            print(f"{lead} {r['rank']:>4} {_mb(r['baseline']):>5} {_mb(r['peak']):>5} {_mb(r['peak_fwd']):>8} "
                  f"{_mb(r['shard']):>5} {_mb(r['peak'] - r['shard']):>10} {_mb(r['peak'] - r['baseline'] - r['shard']):>15}")


def tpserve_phases(runs: list[dict], ckpt_bytes: int, ref_bw: float) -> str:
    """Where tpserve's load time goes (medians over runs): the config (transformers' AutoConfig)
    and the weights. load_weights ends in an all-gather, so each rank's time includes waiting
    for the others; the shortest rank's is used (an upper bound on its reading)."""
    configs = [max(r["phases"].get("load_config", math.nan) for r in run["ranks"]) for run in runs]
    weights = [min(r["phases"].get("load_weights", math.nan) for r in run["ranks"]) for run in runs]
    rest = statistics.median(run["seconds"] - c - w for run, c, w in zip(runs, configs, weights))
    config, weight, total = statistics.median(configs), statistics.median(weights), _median(runs, "seconds")
    return (f"load_config {config:.2f} s ({config / total:.0%}), load_weights {weight:.2f} s = {ckpt_bytes / weight / 1e9:.2f} "
            f"GB/s ({ckpt_bytes / weight / 1e9 / ref_bw:.0%} of page cache), rest {rest:.2f} s")


def _loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tpserve-bench"))
    parser.add_argument("--reps", type=int, default=3, help="timed runs per tool, after one warm-up each")
    parser.add_argument("--no-warm", action="store_true", help="skip the second comparison, with imports done up front")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # the spawned ranks read it
    started = time.perf_counter()

    path = make_checkpoint(args.dir)
    files = checkpoint_files(path)
    ckpt_bytes = sum(p.stat().st_size for p in files)
    print(f"checkpoint: {path}, {len(files)} files, {ckpt_bytes / MB:.0f} MB; {os.cpu_count()} CPUs, TP={args.tp}; "
          f"load average {_loadavg()} (other work on this machine slows every number below)")
    bw = {(readers, fresh): page_cache_bandwidth(files, readers, fresh)
          for readers in sorted({1, args.tp}) for fresh in (False, True)}
    for (readers, fresh), gbs in bw.items():
        print(f"page cache read, {readers} reader(s), into {'fresh memory (page faults)' if fresh else 'a reused 64 MiB buffer'}: "
              f"{gbs:.2f} GB/s")
    ref_bw = bw[(args.tp, True)]  # what a loader does: several readers filling new tensors
    if importlib.util.find_spec("accelerate") is None:
        print("note: accelerate is not installed, and transformers' TP loading requires it: expect the fallback below")

    outdir = Path(tempfile.mkdtemp(prefix="tpserve-load-"))
    hf_lib, hf_error = "transformers", None
    runs: dict[str, list[dict]] = {}
    modes = (False,) if args.no_warm else (False, True)
    for warm in modes:
        print("\n" + ("warm imports: every rank imports transformers' Llama modules before the timer" if warm else
                      "cold: each fresh rank has imported torch and the tool's entry point, nothing more")
              + "; run 0 of each tool is a warm-up, left out of the medians")
        for rep in range(args.reps + 1):
            for lib in ("tpserve", "hf"):
                try:
                    run = run_once("tpserve" if lib == "tpserve" else hf_lib, warm, path, args.tp, outdir)
                except Exception as exc:
                    if lib == "tpserve" or hf_lib != "transformers":
                        raise
                    hf_error = str(exc).strip()
                    print(f"transformers tp_plan='auto' at TP={args.tp} FAILED:\n{hf_error}\nfalling back to a plain "
                          f"single-process from_pretrained, labelled transformers-1proc")
                    hf_lib = "transformers-1proc"
                    run = run_once(hf_lib, warm, path, args.tp, outdir)
                print(f"  run {rep}: {describe(run, ckpt_bytes)}", flush=True)
                if rep > 0:
                    runs.setdefault(run["tool"], []).append(run)
    check_logits(outdir, "tpserve", hf_lib, runs["tpserve"][-1])
    shutil.rmtree(outdir, ignore_errors=True)

    print_table(runs, ckpt_bytes, args.reps)
    print(f"\npage cache: {ref_bw:.2f} GB/s with {args.tp} readers into fresh memory; {bw[(1, False)]:.2f} GB/s with 1 reader "
          f"into a reused buffer")
    for warm in modes:
        ours, theirs = "tpserve" + (" warm" if warm else ""), hf_lib + (" warm" if warm else "")
        load = _median(runs[ours], "seconds")
        print(f"{ours}: {ckpt_bytes / load / 1e9:.2f} GB/s = {ckpt_bytes / load / 1e9 / ref_bw:.0%} of page cache; "
              f"{tpserve_phases(runs[ours], ckpt_bytes, ref_bw)}")
        for field, what in (("seconds", "load s"), ("ready", "+fwd s")) + (() if warm else (("cold", "cold s"),)):
            a, b = _median(runs[theirs], field), _median(runs[ours], field)
            print(f"  speed by {what}: {theirs} / {ours} = {a:.2f} / {b:.2f} = {a / b:.2f}x "
                  f"(target >= {SPEED_TARGET:.0f}x): {'MET' if a / b >= SPEED_TARGET else 'NOT MET'}")
    last = runs["tpserve"][-1]["ranks"]  # memory is judged on the cold runs: a rank that imports only what it needs
    literal = all(r["peak"] - r["shard"] <= MEMORY_SLACK for r in last)
    net = all(r["peak"] - r["baseline"] - r["shard"] <= MEMORY_SLACK for r in last)
    print(f"memory (tpserve, cold, every rank): peak <= shard + 300 MB: {'MET' if literal else 'NOT MET'}; "
          f"peak - base <= shard + 300 MB: {'MET' if net else 'NOT MET'}")
    if hf_error:
        print("note: transformers' TP load failed here (see above), so transformers-1proc, a single-process load of the "
              "whole model, stands in for it")
    print(f"total benchmark time {time.perf_counter() - started:.0f} s; load average now {_loadavg()}")


if __name__ == "__main__":
    main()
