"""``LLM``: the vLLM-shaped entry point. This process is rank 0, the driver.

Local mode (the default): the driver starts ``tensor_parallel_size - 1`` worker processes on
this machine, each loading its own shard; commands reach them through the group's shared memory
(``commands``) and every rank then runs the command in lockstep. Rank 0 computes in the caller's process, in whichever thread
calls the LLM, with its share of the cores set only for the length of each call (and the
caller's thread count restored after), so an engine never changes another's settings.

Each local LLM owns its process group, built on a TCP store of its own (not torch's default
group), its deadline and its workers: any number of engines, of any models and TP degrees,
can be open in one process and used in turn. A constructor that fails, or is interrupted,
releases everything it took before it raises.

torchrun mode: when the process was started by torchrun (``WORLD_SIZE`` > 1 in the
environment), every rank builds the ``LLM`` and makes the same calls, as with vLLM's external
launcher; the launcher's world is the group, and rank 0's inputs are broadcast so the ranks
cannot disagree. Several machines work the same way, through torchrun's rendezvous.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from tpserve.checkpoint.resolve import resolve_model_path
from tpserve.models import attention, fused
from tpserve.parallel import (
    CommError,
    TensorParallelConfig,
    broadcast_object,
    matvec,
    set_group_timeout,
    shm,
)
from tpserve.parallel.deadlines import ENGINE_TIMEOUT_S, STARTUP_TIMEOUT_S
from tpserve.parallel.quantize import check_quantization, checkpoint_quantization
from tpserve.utils.cpus import rank_cores

from . import commands
from .group import engine_device, engine_store, join_engine_group
from .llm_engine import LLMEngine
from .runner import BLOCK_SIZE, block_bytes, max_blocks
from .sampling import SamplingParams, room_left
from .sequence import Logprob
from .tokenizer import eos_token_ids, load_tokenizer
from .worker import execute, worker_main

MAX_LOGPROBS = 20  # alternatives per token at most, vLLM's default max_logprobs (the server's bound too)
_kv_reserved: dict[int, int] = {}  # open engines' KV cache bytes (all ranks), which later defaults leave alone


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, a stop token or a stop string) or "length"
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token, with SamplingParams(logprobs=k)


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # the first token's is None


class WorkerError(RuntimeError):
    """A worker process died or stopped answering; the engine has been shut down."""


def _torchrun_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if "TORCHELASTIC_RUN_ID" in os.environ or dist.is_initialized() else 1


class LLM:
    """Generate text with a model split over ``tensor_parallel_size`` processes."""

    def __init__(self, model: str | os.PathLike | None = None, tensor_parallel_size: int = 1, dtype: str = "auto",
                 device: str | None = None, comm_timeout: float | None = None, compile: bool = False,
                 tokenizer: str | os.PathLike | None = None, skip_tokenizer_init: bool = False,
                 max_num_seqs: int = 256, kv_cache_memory: int | None = None, enable_prefix_caching: bool = True,
                 block_size: int = BLOCK_SIZE, quantization: str | None = None) -> None:
        """``compile``: run each decode step through ``torch.compile`` (gpt-fast style; measured
        2.4x faster batch-1 decode than eager on an AMD EPYC CPU). The first decode of each
        batch class (one row, 2-4 rows, more) compiles, 5-20 s; prefill stays eager.
        ``tokenizer``: a directory to load the tokenizer from instead of the model's; a model
        without tokenizer files loads without one (token-id prompts only), as does
        ``skip_tokenizer_init=True``. ``kv_cache_memory``: bytes of paged KV cache per rank
        (default: a quarter of the memory free at start, split between a host's ranks, at most
        4 GiB; engines opened later in the process count what earlier ones took);
        ``max_num_seqs``: sequences decoding at once; ``enable_prefix_caching``: reuse the cache
        blocks of a prompt prefix seen before. ``dtype="auto"``: bfloat16 on CUDA; on CPU a
        bfloat16 checkpoint stays bfloat16 where the CPU has AVX512-BF16, else float32; a GGUF
        file (the default model's too) keeps its Q4_0 / Q4_1 layers 4-bit, and a Q8_0 embedding
        (and tied head) as its int8 groups, on CPUs with AVX512-VNNI (with bfloat16 or float32
        for the rest, by the same rule), where any other dtype dequantizes it.
        ``quantization="int8"``: int8 weights with one scale per output row (the LM head keeps
        ``dtype``), about half of bf16's bytes per token; ``"q4"``: 4-bit weights in groups of
        32 with a float16 scale and min each (a GGUF file's own, else quantized at load)."""
        self._workers: list[mp.Process] = []
        self._conns: list = []
        self._closed = False
        self._store: dist.TCPStore | None = None
        self.group: dist.ProcessGroup | None = None
        self.model = None
        self._cores: list[list[int] | None] = []  # each local rank's cores (None: not pinned)
        self._threads: int | None = None  # this rank's torch threads during calls (None: leave as is)
        self._state: dict = {}  # rank 0's memory between commands (its KV cache)
        self.engine: LLMEngine | None = None
        try:
            self._start(model, tensor_parallel_size, dtype, device, comm_timeout, compile, tokenizer,
                        skip_tokenizer_init, check_quantization(quantization))
            self._start_engine(max_num_seqs, kv_cache_memory, enable_prefix_caching, block_size)
        except BaseException:  # bad input, a failed load, a dead worker, Ctrl-C: give everything back
            self._release()
            raise

    def _start(self, model, tensor_parallel_size, dtype, device, comm_timeout, compile, tokenizer,
               skip_tokenizer_init, quantization) -> None:
        from tpserve.models import load_config, load_model
        from tpserve.models.loading import resolve_device, resolve_dtype

        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
        self.model_path = self._resolve(model, dtype, device, quantization, tensor_parallel_size)
        config = load_config(self.model_path)
        heads = config.num_attention_heads
        if tensor_parallel_size > heads:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} is larger than the model's {heads} attention "
                             f"heads; use a TP degree between 1 and {heads}")
        self.tp = tensor_parallel_size
        self.dtype = resolve_dtype(dtype, resolve_device(device), config)
        self.skip_tokenizer_init = skip_tokenizer_init
        self.tokenizer = load_tokenizer(self.model_path, tokenizer, skip_tokenizer_init)  # before any process starts
        self.eos_ids = eos_token_ids(self.model_path, config, self.tokenizer)
        timeout = comm_timeout if comm_timeout is not None else ENGINE_TIMEOUT_S
        world = _torchrun_world()
        self.under_torchrun = world > 1  # every rank runs this constructor
        if self.under_torchrun:
            if world != tensor_parallel_size:
                raise ValueError(f"running under torchrun with WORLD_SIZE={world} but tensor_parallel_size="
                                 f"{tensor_parallel_size}; make them equal")
            if not dist.is_initialized():
                TensorParallelConfig.from_env(device=device, timeout_s=max(STARTUP_TIMEOUT_S, timeout)).init()
            self.rank = dist.get_rank()
            self.group = dist.group.WORLD
            set_group_timeout(self.group, timeout)
            dev = engine_device(device, dist.get_node_local_rank(fallback_rank=self.rank))
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if dev.type == "cpu" and local_world > 1:  # this host's ranks split its cores, as local workers do
                cores = rank_cores(int(os.environ.get("LOCAL_RANK", "0")), local_world)
                self._cores, self._threads = [cores], len(cores) if cores else None
        else:
            self.rank = 0
            dev = engine_device(device, 0)
            if dev.type == "cpu":
                attention.extension()  # the paged decode kernel, built here once, before any worker wants it
                matvec.bf16_kernel()  # and the bf16/int8 products' kernel
                fused.extension()  # and the one-pass norm and rope
            self._store = engine_store(0, self.tp, is_master=True)
            if self.tp > 1:
                if dev.type == "cpu" and shm.enabled():
                    shm.extension()  # built here, once, before the workers would all want it
                self._cores = [rank_cores(r, self.tp) for r in range(self.tp)]
                self._threads = len(self._cores[0]) if self._cores[0] else max(1, (os.cpu_count() or 1) // self.tp)
                self._spawn_workers(self._store.port, str(self.dtype).removeprefix("torch."), device, timeout,
                                    bool(compile), quantization)
                self._wait_for("started")  # a worker that dies while starting must not leave us in the rendezvous
            self.group = join_engine_group(self._store, 0, self.tp, dev, timeout)
        try:
            with self._compute():
                self.model = load_model(self.model_path, dtype=self.dtype, device=dev, group=self.group,
                                        progress=self.rank == 0, decode_layout=dev.type == "cpu", compile=compile,
                                        quantization=quantization)
        except CommError as exc:  # say which worker it was, if one died
            if not self._worker_died():
                raise
            raise WorkerError(f"loading failed: a worker process stopped ({self._how_workers_ended()})") from exc
        self._wait_for("ready")
        self.vocab_size = self.model.spec.vocab_size
        self.context = self.model.spec.max_position_embeddings

    def _start_engine(self, max_num_seqs: int, kv_cache_memory: int | None, prefix_caching: bool,
                      block_size: int) -> None:
        """The paged KV cache on every rank (its block count agreed by all), and rank 0's engine loop."""
        for name, value in (("max_num_seqs", max_num_seqs), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if kv_cache_memory is not None and (not isinstance(kv_cache_memory, int) or kv_cache_memory < 1):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}")
        reserved = sum(_kv_reserved.values())
        blocks = self._run(("kv_init", kv_cache_memory, block_size, reserved,
                            max_blocks(max_num_seqs, self.context, block_size)))
        self.kv_cache_blocks = blocks
        _kv_reserved[id(self)] = blocks * block_bytes(self.model, block_size) * self.tp
        self.engine = LLMEngine(self._run, blocks, block_size, max_num_seqs, prefix_caching, self.tokenizer,
                                self.eos_ids)

    @staticmethod
    def _resolve(model, dtype, device, quantization, tp: int) -> Path:
        """The model's directory. A GGUF file (the default model's too) keeps its 4-bit layers
        with ``quantization="q4"`` on CPU, and with dtype auto where that is the fast way on this
        machine (tpserve's AVX512-VNNI kernel) at a TP degree that splits them into whole groups;
        otherwise it is dequantized."""
        from tpserve.models.layout import layout
        from tpserve.models.loading import load_config, resolve_device

        auto = dtype in (None, "auto") and not quantization
        keep_q4 = (resolve_device(device).type == "cpu" and matvec.available()
                   and (quantization == "q4" or (auto and matvec.native_q4())))
        path = resolve_model_path(model, keep_q4)
        config = load_config(path) if keep_q4 else None
        if config is not None and checkpoint_quantization(config) == "q4":
            try:
                layout(config, tp)  # before any worker starts
            except ValueError as exc:
                if not auto:
                    raise
                warnings.warn(f"tpserve: the model's 4-bit layers do not split at TP={tp} ({exc}); "
                              "running it dequantized", stacklevel=3)
                path = resolve_model_path(model)
        return path

    def _spawn_workers(self, port: int, dtype: str, device: str | None, timeout: float, compile: bool,
                       quantization: str | None) -> None:
        ctx = mp.get_context("spawn")
        atexit.register(self.close)  # workers must not outlive an interpreter that forgot close()
        for rank in range(1, self.tp):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"tpserve-worker-{rank}", daemon=True,
                               args=(rank, self.tp, port, str(self.model_path), dtype, device, child,
                                     timeout, self._cores[rank], compile, quantization))
            try:
                proc.start()
            except BaseException:  # e.g. a spawned child re-running an unguarded script: nothing to join
                parent.close()
                child.close()
                raise
            self._workers.append(proc)
            self._conns.append(parent)
    # ---- public API ---------------------------------------------------------------------

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 on_text: Callable[[int, str], None] | None = None) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); all prompts run as one batch.
        Without a tokenizer, prompts must be token ids and the outputs' ``text`` is empty.
        ``on_text(i, delta)``, if given, is called on rank 0 as prompt i's text grows (streaming
        to a terminal); stop strings are held back until they cannot be the start of one."""
        return self._generate(prompts, sampling_params, on_text)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             on_text: Callable[[int, str], None] | None = None) -> list[RequestOutput]:
        """``messages``: one conversation (a list of {"role", "content"} dicts) or a list of them,
        through the tokenizer's chat template; ``on_text`` as in :meth:`generate`."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self._generate(prompts, sampling_params, on_text, add_special_tokens=False)

    def logits(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Full-vocabulary float32 CPU logits [len, vocab] at every position of each sequence."""
        prompts = [self._check_ids(list(p), i) for i, p in enumerate(token_ids)]
        for i, p in enumerate(prompts):
            if room_left(len(p), self.context) < 0:
                raise ValueError(f"sequence {i} has {len(p)} tokens; the model's context is {self.context}")
        out = self._run(("logits", prompts))
        if self.under_torchrun:
            out = broadcast_object(out if self.rank == 0 else None, 0, self.group)
        return out

    def save_sharded(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save the model as a tpserve checkpoint (docs/checkpoint-format.md): every rank writes
        its own file; load it later at any TP degree with ``LLM(model=path, ...)``."""
        if not self.under_torchrun:  # refuse a bad target here: a failed save would end the workers
            from tpserve.checkpoint.save import check_save_target

            check_save_target(path, overwrite)
        return self._run(("save", str(path), overwrite))

    def apply_chat_template(self, messages: list[dict]) -> str:
        tokenizer = self._need_tokenizer("a chat conversation")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_path} has no chat template; use generate() with a plain prompt")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def close(self) -> None:
        """Stop the workers and leave the process group; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._workers and all(proc.is_alive() for proc in self._workers):
            with contextlib.suppress(OSError, CommError):  # then they are killed below
                commands.send(self.group, self._conns, ("close",), timeout=5.0)
        deadline = time.monotonic() + 5
        for proc in self._workers:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
        self._release()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------

    def _release(self) -> None:
        """Kill what is left of the workers, drop the group and store, forget the atexit hook:
        after this the process holds nothing of this engine (a failed constructor ends here too)."""
        self._closed = True
        self._kill_workers()
        if self.group is not None:
            set_group_timeout(self.group, None)
            if not self.under_torchrun:
                shm.detach(self.group)
                with contextlib.suppress(Exception):  # already broken when a peer died
                    self.group.shutdown()
        self.group = self._store = self.model = self.engine = None
        self._state = {}
        _kv_reserved.pop(id(self), None)
        atexit.unregister(self.close)

    @contextlib.contextmanager
    def _compute(self):
        """For the length of one call, this rank computes on its own cores with its share of the
        threads (rank 0: the calling thread only); then the caller's cores and thread count are
        back. ``self._cores[0]`` is this process's slice (local mode: rank 0's)."""
        if self._threads is None:
            yield
            return
        threads, cores = torch.get_num_threads(), self._cores[0]
        affinity = os.sched_getaffinity(0) if cores else None
        torch.set_num_threads(self._threads)
        if cores:
            os.sched_setaffinity(0, cores)  # this thread only (Linux): the caller's other threads keep theirs
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            if affinity is not None:
                os.sched_setaffinity(0, affinity)

    def _kill_workers(self) -> None:
        for proc in self._workers:
            if proc.is_alive():
                proc.kill()
        for proc in self._workers:
            proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._workers, self._conns = [], []

    def _wait_for(self, what: str) -> None:
        """Every worker's ``what`` message, noticing at once a worker that dies first."""
        hint = ("; if a script creates this LLM, it needs an `if __name__ == \"__main__\":` guard, because "
                "worker processes are spawned and re-import the main module") if what == "started" else ""
        for rank, (proc, conn) in enumerate(zip(self._workers, self._conns), start=1):
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            msg = None
            while msg is None and proc.is_alive() and time.monotonic() < deadline:
                try:
                    msg = conn.recv() if conn.poll(0.1) else None
                except (EOFError, OSError):  # the worker is gone: say how, once it has finished going
                    proc.join(timeout=5)
                    break
            if msg is None:
                raise WorkerError(f"worker rank {rank} failed to start: {self._how_worker_ended(rank, proc, conn)}{hint}")
            if msg[0] != what:
                raise WorkerError(f"worker rank {rank} failed to start: {msg[1]}")

    @staticmethod
    def _how_worker_ended(rank: int, proc: mp.Process, conn) -> str:
        try:
            if conn.poll(0):
                msg = conn.recv()
                if msg[0] == "error":
                    return msg[1]
        except (EOFError, OSError):
            pass
        if proc.is_alive():
            return f"pid {proc.pid} is alive but did not answer (hung?)"
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"pid {proc.pid} exited ({how})"

    def _run(self, cmd: tuple):
        if self._closed:
            raise RuntimeError("this LLM has been closed; create a new one")
        if self.under_torchrun:
            cmd = broadcast_object(cmd if self.rank == 0 else None, 0, self.group)
            with self._compute():
                return execute(self.model, cmd, self._state)
        if not all(proc.is_alive() for proc in self._workers):
            self._fail(cmd[0], None)
        try:
            commands.send(self.group, self._conns, cmd)
            with self._compute():
                return execute(self.model, cmd, self._state)
        except (CommError, RuntimeError) as exc:
            if isinstance(exc, WorkerError):
                raise
            self._fail(cmd[0], exc)
        except KeyboardInterrupt:  # the workers are mid-command: stop them, do not talk to them
            self._release()
            raise

    def _follow(self) -> None:
        """torchrun, ranks other than 0: run rank 0's commands until its loop says it is done."""
        while True:
            cmd = broadcast_object(None, 0, self.group)
            with self._compute():
                execute(self.model, cmd, self._state)
            if cmd[0] == "done":
                return

    def _worker_died(self, wait: float = 1.0) -> bool:
        """Whether a worker has exited, giving one that is dying ``wait`` seconds to finish (its
        first thread can be gone, and a peer notice it, before the process can be reaped)."""
        deadline = time.monotonic() + wait
        while self._workers and all(p.is_alive() for p in self._workers):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return bool(self._workers)

    def _how_workers_ended(self) -> str:
        """What happened to the workers that stopped (all of them, if none has)."""
        time.sleep(0.5)  # let a dying worker finish dying, so we can say which one it was
        stories = [f"rank {r}: {self._how_worker_ended(r, p, c)}"
                   for r, (p, c) in enumerate(zip(self._workers, self._conns), start=1)]
        return "; ".join([s for s in stories if "alive" not in s] or stories)

    def _fail(self, what: str, exc: BaseException | None):
        if exc is not None and not isinstance(exc, CommError) and not self._worker_died(0.5):
            why = f"rank 0 (this process) raised {type(exc).__name__}: {exc}"  # no worker is to blame
        else:
            why = f"a worker process stopped ({self._how_workers_ended()})"
        self._release()
        raise WorkerError(f"{what} failed: {why}; all tpserve processes were stopped, "
                          f"create a new LLM to continue") from exc

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            why = ("skip_tokenizer_init=True was given" if self.skip_tokenizer_init
                   else f"no tokenizer was found in the model directory {self.model_path}")
            raise ValueError(f"{what} needs a tokenizer, but {why}; pass tokenizer=PATH (CLI and server: "
                             f"--tokenizer PATH) to a directory with tokenizer files, or give prompts as token ids")
        return self.tokenizer

    def _encode(self, prompt, i: int, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self._need_tokenizer(f"prompt {i} (text)")(prompt, add_special_tokens=add_special_tokens)["input_ids"]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            return prompt, ids
        return None, self._check_ids(list(prompt), i)

    def _check_ids(self, ids: list[int], i: int) -> list[int]:
        vocab = self.vocab_size
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt {i} has token ids outside the vocabulary 0..{vocab - 1}")
        return ids

    def _generate(self, prompts, sampling_params, on_text: Callable[[int, str], None] | None = None,
                  add_special_tokens: bool = True) -> list[RequestOutput]:
        if self._closed:
            raise RuntimeError("this LLM has been closed; create a new one")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            return []
        encoded = [self._encode(p, i, add_special_tokens) for i, p in enumerate(prompts)]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(encoded)
        if len(params) != len(encoded):
            raise ValueError(f"got {len(params)} SamplingParams for {len(encoded)} prompts")
        budgets = []
        for i, ((_, ids), sp) in enumerate(zip(encoded, params)):
            if room_left(len(ids), self.context) < 1:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; the model's context is {self.context} tokens, "
                                 f"so it leaves no room to generate")
            budgets.append(min(sp.max_tokens, room_left(len(ids), self.context)))
        for sp in params:
            if sp.stop and self.tokenizer is None:
                self._need_tokenizer("stop strings")
            for name in ("logprobs", "prompt_logprobs"):
                if (getattr(sp, name) or 0) > MAX_LOGPROBS:
                    raise ValueError(f"{name}={getattr(sp, name)} asks for more than {MAX_LOGPROBS} alternatives per "
                                     f"token (vLLM's default max_logprobs); ask for fewer")
        if self.under_torchrun and self.rank != 0:
            self._follow()
            return broadcast_object(None, 0, self.group)
        engine = self.engine
        for (_, ids), budget in zip(encoded, budgets):
            engine.check_fits(len(ids), budget)
        families = [[engine.add(ids, sp.for_child(i), budget) for i in range(sp.n)]  # n completions of a prompt
                    for (_, ids), sp, budget in zip(encoded, params, budgets)]
        seqs = [seq for family in families for seq in family]
        row = {seq.seq_id: i for i, family in enumerate(families) for seq in family}
        try:
            while engine.has_unfinished():
                for seq, _ in engine.step():
                    if on_text is not None and seq.delta:
                        on_text(row[seq.seq_id], seq.delta)
        except KeyboardInterrupt:  # mid-loop the ranks' state is unknown: stop everything now
            self._release()
            raise
        except BaseException:
            if self.engine is not None:  # a bad on_text: these sequences must not linger
                for seq in seqs:
                    engine.abort(seq)
            raise
        finally:
            if self.under_torchrun and self.engine is not None:
                self._run(("done",))
        outs = [RequestOutput(prompt, ids, [CompletionOutput(i, s.text, s.token_ids, s.reason, s.logprobs)
                                            for i, s in enumerate(family)], prompt_logprobs=family[0].prompt_logprobs)
                for (prompt, ids), family in zip(encoded, families)]
        if self.under_torchrun:
            outs = broadcast_object(outs, 0, self.group)
        return outs
