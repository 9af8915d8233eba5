"""``LLM``: the vLLM-shaped entry point. This process is rank 0, the driver.

Local mode (the default): the driver starts ``tensor_parallel_size - 1`` worker processes on
this machine, each loading its own shard; commands go to them over pipes and every rank then
runs the command in lockstep. Sampling happens here, on rank 0.

torchrun mode: when the process was started by torchrun (``WORLD_SIZE`` > 1 in the
environment), every rank builds the ``LLM`` and makes the same calls, as with vLLM's external
launcher; rank 0's inputs are broadcast so the ranks cannot disagree. Several machines work
the same way, through torchrun's rendezvous.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from tpserve.parallel import CommError, TensorParallelConfig, broadcast_object, set_default_timeout
from tpserve.utils.net import free_port

from .sampling import SamplingParams, make_generator, sample
from .worker import execute, worker_main

ENGINE_TIMEOUT_S = float(os.environ.get("TPSERVE_COMM_TIMEOUT", "30"))
STARTUP_TIMEOUT_S = float(os.environ.get("TPSERVE_STARTUP_TIMEOUT", "600"))


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS or a stop string) or "length"


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class WorkerError(RuntimeError):
    """A worker process died or stopped answering; the engine has been shut down."""


def init_group(rank: int, world: int, port: int, device: str | None, comm_timeout: float) -> torch.device:
    """Join the engine's process group; returns this rank's device."""
    set_default_timeout(comm_timeout)
    dev = None
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
    cfg = TensorParallelConfig(rank=rank, world_size=world, local_rank=rank, master_addr="127.0.0.1",
                               master_port=port, device=dev, timeout_s=max(STARTUP_TIMEOUT_S, comm_timeout))
    cfg.init()
    return cfg.device


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """A transformers directory or tpserve checkpoint for ``model``: None is the embedded default
    model, a training root (step subdirectories) its newest complete checkpoint."""
    if model is None:
        from tpserve.checkpoint.default_model import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist; pass a transformers model directory "
                                f"(config.json + *.safetensors) or omit --model for the default model")
    if path.is_file() and path.suffix == ".gguf":
        from tpserve.checkpoint.default_model import converted_gguf_path

        return converted_gguf_path(path)
    if path.is_dir():
        from tpserve.checkpoint.sharded import resolve_checkpoint

        found = resolve_checkpoint(path)  # a tpserve checkpoint, or the newest complete one under a training root
        if found is not None:
            return found
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass a transformers model directory")
    return path


def _torchrun_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if "TORCHELASTIC_RUN_ID" in os.environ or dist.is_initialized() else 1


class LLM:
    """Generate text with a model split over ``tensor_parallel_size`` processes."""

    def __init__(self, model: str | os.PathLike | None = None, tensor_parallel_size: int = 1, dtype: str = "auto",
                 device: str | None = None, comm_timeout: float | None = None, compile: bool = False) -> None:
        """``compile``: run each decode step through ``torch.compile`` (gpt-fast style; measured
        2.4x faster batch-1 decode than eager on CPU). The first decode of each batch class (one
        row, 2-4 rows, more) compiles, 5-20 s; prefill stays eager."""
        from tpserve.models import load_config, load_model
        from tpserve.models.loading import resolve_device, resolve_dtype

        self._threads_before = torch.get_num_threads()  # restored by close(): TP>1 shares the cores out
        self._workers: list[mp.Process] = []
        self._conns: list = []
        self._closed = False
        self._state: dict = {}  # rank 0's memory between commands (continuous-batching cache)
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
        self.model_path = resolve_model_path(model)
        config = load_config(self.model_path)
        heads = config.num_attention_heads
        if tensor_parallel_size > heads:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} is larger than the model's {heads} attention "
                             f"heads; use a TP degree between 1 and {heads}")
        self.tp = tensor_parallel_size
        dev = resolve_device(device)
        self.dtype = resolve_dtype(dtype, dev)
        dtype_name = str(self.dtype).removeprefix("torch.")
        timeout = comm_timeout if comm_timeout is not None else ENGINE_TIMEOUT_S
        world = _torchrun_world()
        self.external = world > 1
        if self.external:
            if world != tensor_parallel_size:
                raise ValueError(f"running under torchrun with WORLD_SIZE={world} but tensor_parallel_size="
                                 f"{tensor_parallel_size}; make them equal")
            set_default_timeout(timeout)
            if not dist.is_initialized():
                TensorParallelConfig.from_env(device=device, timeout_s=max(STARTUP_TIMEOUT_S, timeout)).init()
            self.rank = dist.get_rank()
        else:
            if dist.is_initialized():
                raise RuntimeError("torch.distributed is already initialised in this process: close the other LLM "
                                   "first (llm.close()), or run under torchrun")
            self.rank = 0
            port = free_port()
            threads = max(1, (os.cpu_count() or 1) // self.tp)
            ctx = mp.get_context("spawn")
            for rank in range(1, self.tp):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=worker_main, name=f"tpserve-worker-{rank}", daemon=True,
                                   args=(rank, self.tp, port, str(self.model_path), dtype_name, device, child,
                                         timeout, threads, bool(compile)))
                proc.start()
                self._workers.append(proc)
                self._conns.append(parent)
            atexit.register(self.close)
            if self.tp > 1:
                torch.set_num_threads(threads)
            try:
                self._wait_for("started")  # a worker that dies while starting must not leave us in the rendezvous
                dev = init_group(0, self.tp, port, device, timeout)
            except BaseException:
                self.close()
                raise
        try:
            self.model = load_model(self.model_path, dtype=self.dtype, device=dev, progress=self.rank == 0,
                                    decode_layout=dev.type == "cpu", compile=compile)
            self._wait_for("ready")
        except BaseException:
            self.close()
            raise
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self.eos_ids = _eos_ids(self.model_path, self.tokenizer)
        self.context = self.model.spec.max_position_embeddings

    # ---- public API ---------------------------------------------------------------------

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); all prompts run as one batch."""
        return self._generate(prompts, sampling_params)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """``messages``: one conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self._generate(prompts, sampling_params, add_special_tokens=False)

    def logits(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Full-vocabulary float32 CPU logits [len, vocab] at every position of each sequence."""
        prompts = [self._check_ids(list(p), i) for i, p in enumerate(token_ids)]
        for i, p in enumerate(prompts):
            if len(p) > self.context:
                raise ValueError(f"sequence {i} has {len(p)} tokens; the model's context is {self.context}")
        out = self._run(("logits", prompts))
        if self.external:
            out = broadcast_object(out if self.rank == 0 else None, 0)
        return out

    def save_sharded(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save the model as a tpserve checkpoint (docs/checkpoint-format.md): every rank writes
        its own file; load it later at any TP degree with ``LLM(model=path, ...)``."""
        if not self.external:  # refuse a bad target here: a failed save would end the workers
            from tpserve.checkpoint.sharded import check_save_target

            check_save_target(path, overwrite)
        return self._run(("save", str(path), overwrite))

    def apply_chat_template(self, messages: list[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_path} has no chat template; use generate() with a plain prompt")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def close(self) -> None:
        """Stop the workers and leave the process group; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            try:
                conn.send(("close",))
            except (OSError, BrokenPipeError):
                pass
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
        """Kill what is left of the workers, leave the process group, give the cores back."""
        self._closed = True
        self._kill_workers()
        if dist.is_initialized() and not self.external:
            dist.destroy_process_group()
        torch.set_num_threads(self._threads_before)

    def _kill_workers(self) -> None:
        for proc in self._workers:
            if proc.is_alive():
                proc.kill()
        for proc in self._workers:
            proc.join(timeout=5)
        self._workers, self._conns = [], []

    def _wait_for(self, what: str) -> None:
        """Every worker's ``what`` message, noticing at once a worker that dies first."""
        for rank, (proc, conn) in enumerate(zip(self._workers, self._conns), start=1):
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not conn.poll(0.1):
                if not proc.is_alive() or time.monotonic() > deadline:
                    hint = ("; if a script creates this LLM, it needs an `if __name__ == \"__main__\":` guard, "
                            "because worker processes are spawned and re-import the main module") if what == "started" else ""
                    raise WorkerError(f"worker rank {rank} failed to start: {self._worker_story(rank, proc, conn)}{hint}")
            msg = conn.recv()
            if msg[0] != what:
                raise WorkerError(f"worker rank {rank} failed to start: {msg[1]}")

    @staticmethod
    def _worker_story(rank: int, proc: mp.Process, conn) -> str:
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

    def _run(self, cmd: tuple, choose=None, on_step=None):
        if self._closed:
            raise RuntimeError("this LLM has been closed; create a new one")
        if self.external:
            cmd = broadcast_object(cmd if self.rank == 0 else None, 0)
            return execute(self.model, cmd, choose if self.rank == 0 else None, on_step, self._state)
        for rank, (proc, conn) in enumerate(zip(self._workers, self._conns), start=1):
            if not proc.is_alive():
                self._fail(cmd[0], None)
            conn.send(cmd)
        try:
            return execute(self.model, cmd, choose, on_step, self._state)
        except (CommError, RuntimeError) as exc:
            if isinstance(exc, WorkerError):
                raise
            self._fail(cmd[0], exc)
        except KeyboardInterrupt:
            self.close()
            raise

    def _fail(self, what: str, exc: BaseException | None):
        time.sleep(0.5)  # let a dying worker finish dying, so we can say which one it was
        stories = [f"rank {r}: {self._worker_story(r, p, c)}"
                   for r, (p, c) in enumerate(zip(self._workers, self._conns), start=1)]
        dead = [s for s in stories if "alive" not in s]
        self._release()
        detail = "; ".join(dead or stories)
        raise WorkerError(f"{what} failed: a worker process stopped ({detail}); all tpserve processes were stopped, "
                          f"create a new LLM to continue") from exc

    def _encode(self, prompt, i: int, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            return prompt, ids
        return None, self._check_ids(list(prompt), i)

    def _check_ids(self, ids: list[int], i: int) -> list[int]:
        vocab = self.model.spec.vocab_size
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt {i} has token ids outside the vocabulary 0..{vocab - 1}")
        return ids

    def _generate(self, prompts, sampling_params, on_text: Callable[[int, str], None] | None = None,
                  add_special_tokens: bool = True) -> list[RequestOutput]:
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
            if len(ids) >= self.context:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; the model's context is {self.context} tokens, "
                                 f"so it leaves no room to generate")
            budgets.append(min(sp.max_tokens, self.context - len(ids)))
        states = [_Request(self, sp, budget) for sp, budget in zip(params, budgets)]

        def choose(logits: torch.Tensor, step: int):
            tokens = torch.zeros(len(states), dtype=torch.long)
            done = torch.zeros(len(states), dtype=torch.bool)
            for row, st in enumerate(states):
                tokens[row] = st.pick(logits[row]) if not st.finished else 0
                done[row] = st.finished
                if on_text is not None and st.delta:
                    on_text(row, st.delta)
            return tokens, done

        self._run(("generate", [ids for _, ids in encoded], budgets), choose)
        outs = None
        if self.rank == 0:
            outs = [RequestOutput(prompt, ids, [CompletionOutput(0, st.text, st.token_ids, st.reason)])
                    for (prompt, ids), st in zip(encoded, states)]
        if self.external:
            outs = broadcast_object(outs, 0)
        return outs


class _Request:
    """Rank 0's view of one sequence being generated: sampling state, text and stop checks."""

    def __init__(self, llm: LLM, params: SamplingParams, budget: int) -> None:
        self.llm, self.params, self.budget = llm, params, budget
        self.generator = make_generator(params)
        self.token_ids: list[int] = []
        self.text, self.delta, self.reason = "", "", None
        self._emitted = 0

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def pick(self, logits: torch.Tensor) -> int:
        token = sample(logits, self.params, self.generator)
        self.delta = ""
        if token in self.llm.eos_ids and not self.params.ignore_eos:
            self.reason = "stop"
            return token
        self.token_ids.append(token)
        text = self.llm.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for stop in self.params.stop:
            at = text.find(stop, max(0, self._emitted - len(stop)))
            if at >= 0:
                text, self.reason = text[:at], "stop"
                break
        if self.reason is None and len(self.token_ids) >= self.budget:
            self.reason = "length"
        stable = text if self.reason else text.rstrip("\ufffd")
        if self.reason is None and self.params.stop:  # hold back what could be the start of a stop string
            keep = max(len(s) for s in self.params.stop) - 1
            stable = stable[:max(self._emitted, len(stable) - keep)]
        self.delta = stable[self._emitted:]
        self._emitted = len(stable)
        self.text = text
        return token


def _eos_ids(path: Path, tokenizer) -> set[int]:
    ids = set()
    gen = path / "generation_config.json"
    if gen.is_file():
        import json

        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
