"""The ``tpserve`` command: generate, chat, inspect, selfcheck."""

from __future__ import annotations

import argparse
import math
import signal
import sys


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (plus where to find help), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def _memory(text: str) -> int:
    """Bytes: ``4GiB``, ``512MiB``, ``2G`` (= GB), or a plain number."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 4GiB, 512MiB or 2000000000, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="transformers directory or .gguf file (default: the embedded "
                                                   "SmolLM2-135M-Instruct)")
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel degree (processes)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA; on CPU a bfloat16 checkpoint stays "
                                                   "bfloat16 where the CPU has AVX512-BF16, else float32; "
                                                   "`tpserve inspect` says which), float32, bfloat16, float16")
    p.add_argument("--quantization", default=None, choices=["none", "int8", "q4"],
                   help="int8: linear weights in int8 with one scale per output row; q4: in 4-bit groups of 32 "
                        "(the LM head keeps --dtype). A GGUF file (the default model too) keeps its Q4_0 / Q4_1 "
                        "layers 4-bit with q4, and with --dtype auto on CPUs with AVX512-VNNI")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--tokenizer", default=None, help="directory to load the tokenizer from (default: the model's; "
                                                     "a model without tokenizer files takes token ids only)")
    p.add_argument("--kv-cache-memory", type=_memory, default=None,
                   help="paged KV cache per rank, e.g. 2GiB (default: a quarter of the free memory, split between "
                        "this host's ranks, at most 4 GiB)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="do not reuse the KV cache of prompt prefixes seen before")


def _add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: ~2.4x faster batch-1 decode on CPU; the first decode "
                        "of each batch class compiles (5-20 s; serve compiles before answering)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tpserve", description="Tensor-parallel LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one prompt, streaming tokens to stdout")
    _add_model_args(p)
    p.add_argument("--max-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    _add_compile_arg(p)
    p.add_argument("prompt")

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_model_args(p)
    p.add_argument("--max-tokens", type=_positive_int, default=256)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")
    _add_compile_arg(p)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes "
                                                   "(default: $TPSERVE_API_KEY, else no key)")
    p.add_argument("--max-batch", "--max-num-seqs", dest="max_batch", type=_positive_int, default=16,
                   help="most requests decoded together")
    _add_compile_arg(p)
    p.add_argument("--max-model-len", type=_positive_int, default=2048,
                   help="longest prompt + completion served (each batch row's KV cache is this long; "
                        "capped at the model's context)")
    p.add_argument("--max-request-bytes", type=_positive_int, default=None,
                   help="largest request body accepted, in bytes; larger ones get 413 (default: 4 MiB)")

    p = sub.add_parser("convert", help="write a model as a tpserve sharded checkpoint for --tp ranks")
    p.add_argument("src", help="transformers directory, .gguf file or tpserve checkpoint")
    p.add_argument("--tp", type=_positive_int, required=True, help="TP degree the checkpoint is cut for")
    p.add_argument("--output", "-o", required=True, help="checkpoint directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tpserve checkpoint there")
    p.add_argument("--dtype", default=None, help="cast floating-point tensors to float32, bfloat16 or float16 "
                                                 "(default: keep the source's)")

    p = sub.add_parser("verify", help="check a tpserve checkpoint's files against its manifest")
    p.add_argument("path")

    p = sub.add_parser("inspect", help="architecture, size and how the model shards at --tp")
    p.add_argument("path")
    p.add_argument("--tp", type=_positive_int, default=2)

    p = sub.add_parser("selfcheck", help="check every parallel layer against its dense twin on N local processes")
    p.add_argument("--tp", type=_positive_int, default=2, help="number of processes (TP degree)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _auto_dtype(config) -> str:
    """What ``--dtype auto`` picks for this checkpoint on this machine, and why."""
    from tpserve.models.loading import checkpoint_dtype, resolve_device, resolve_dtype
    from tpserve.parallel import matvec

    device = resolve_device(None)
    picked = str(resolve_dtype("auto", device, config)).removeprefix("torch.")
    if device.type == "cuda":
        return f"{picked} (CUDA)"
    stored = str(checkpoint_dtype(config) or "not recorded").removeprefix("torch.")
    fast = "has" if matvec.native_bf16() else "has no"
    kernel = {"avx512bf16": "tpserve's AVX512-BF16 kernel", "avx512f": "tpserve's AVX-512 kernel, widened to float32"
              }.get(matvec.bf16_kernel(), "torch's products")
    return (f"{picked} on this CPU (checkpoint stored as {stored}; this CPU {fast} AVX512-BF16; "
            f"bf16 decode runs through {kernel})")


def _keeps_q4_here(source) -> bool:
    """Whether ``--dtype auto`` runs this GGUF file's 4-bit layers as they are on this machine."""
    from tpserve.checkpoint.gguf import keeps_q4
    from tpserve.models.loading import resolve_device
    from tpserve.parallel import matvec

    return (str(source).endswith(".gguf") and resolve_device(None).type == "cpu" and matvec.native_q4()
            and keeps_q4(source))


def _quantization(config, from_gguf: bool) -> str:
    from tpserve.parallel.quantize import checkpoint_quantization

    stored = checkpoint_quantization(config) or "none"
    return f"{stored} with --dtype auto (the GGUF file's Q4 layers as they are; --dtype float32 / bfloat16 " \
           "dequantizes them)" if from_gguf else stored


def _generate(args) -> None:
    from tpserve.engine.llm import LLM
    from tpserve.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    with LLM(model=args.model, tensor_parallel_size=args.tp, dtype=args.dtype, device=args.device,
             compile=args.compile, tokenizer=args.tokenizer, kv_cache_memory=args.kv_cache_memory,
             enable_prefix_caching=args.prefix_caching, quantization=args.quantization) as llm:
        if args.chat:
            out = llm.chat([{"role": "user", "content": args.prompt}], params, on_text=_print_delta)
        else:
            out = llm.generate([args.prompt], params, on_text=_print_delta)
        if llm.rank == 0:
            print(flush=True)
            if out[0].outputs[0].finish_reason == "length":
                print(f"[stopped after --max-tokens {args.max_tokens}]", file=sys.stderr)


def _print_delta(row: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _chat(args) -> None:
    from tpserve.engine.llm import LLM
    from tpserve.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    with LLM(model=args.model, tensor_parallel_size=args.tp, dtype=args.dtype, device=args.device,
             compile=args.compile, tokenizer=args.tokenizer, kv_cache_memory=args.kv_cache_memory,
             enable_prefix_caching=args.prefix_caching, quantization=args.quantization) as llm:
        print("tpserve chat — empty line or Ctrl-D to quit", file=sys.stderr)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line or line in ("exit", "quit"):
                break
            messages.append({"role": "user", "content": line})
            sys.stdout.write("model> ")
            out = llm.chat(messages, params, on_text=_print_delta)
            print(flush=True)
            messages.append({"role": "assistant", "content": out[0].outputs[0].text})


def _inspect(args) -> None:
    from tpserve.checkpoint.manifest import read_manifest
    from tpserve.checkpoint.resolve import resolve_model_path
    from tpserve.checkpoint.safetensors_io import open_checkpoint
    from tpserve.checkpoint.sharded import is_checkpoint
    from tpserve.models import load_config
    from tpserve.models.layout import layout
    from tpserve.models.llama import Spec
    from tpserve.parallel import head_ranges
    from tpserve.parallel.quantize import parameter_count

    path = resolve_model_path(args.path)
    config = load_config(path)
    spec = Spec.from_config(config)
    saved_tp = ""
    if is_checkpoint(path):  # a tpserve checkpoint: the full shapes are in its manifest
        manifest = read_manifest(path)
        tensors = {name: (t.shape, t.dtype) for name, t in manifest.tensors.items()}
        saved_tp = f" (tpserve checkpoint cut for TP={manifest.tp})"
    else:
        tensors = {name: (tuple(r.shape), r.dtype) for name, r in open_checkpoint(path).items()}
    total = parameter_count({name: tuple(shape) for name, (shape, _) in tensors.items()})
    nbytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in tensors.values())
    dtypes = sorted({str(dtype).removeprefix("torch.") for _, dtype in tensors.values()})
    print(f"path:          {path}{saved_tp}")
    print(f"architecture:  {', '.join(config.architectures)} ({config.model_type})")
    print(f"parameters:    {total:,} ({total / 1e6:.1f} M)")
    print(f"dtype:         {', '.join(dtypes)}")
    kept = resolve_model_path(args.path, keep_q4=_keeps_q4_here(args.path))
    auto = load_config(kept) if kept != path else config
    print(f"dtype auto:    {_auto_dtype(auto)}")
    print(f"quantization:  {_quantization(auto, kept != path)}")
    print(f"bytes:         {nbytes:,} ({nbytes / 2**20:.1f} MiB)")
    print(f"layers:        {spec.num_layers}, hidden {spec.hidden_size}, intermediate {spec.intermediate_size}, "
          f"vocab {spec.vocab_size}, context {spec.max_position_embeddings}")
    print(f"attention:     {spec.num_heads} query heads, {spec.num_kv_heads} KV heads, head_dim {spec.head_dim}"
          f"{', tied embeddings' if spec.tie_word_embeddings else ''}")
    if args.tp > spec.num_heads:
        raise ValueError(f"--tp {args.tp} is larger than the model's {spec.num_heads} attention heads")
    ranks = layout(config, args.tp)
    print(f"\nsharding at TP={args.tp}:")
    print(f"  {'rank':>4}  {'query heads':>11}  {'KV heads':>8}  {'MLP columns':>13}  {'vocab rows':>13}  {'bytes':>12}")
    for rank, shards in enumerate(ranks):
        (q0, q1), (k0, k1) = head_ranges(spec.num_heads, spec.num_kv_heads, args.tp, rank)
        mlp = shards["model.layers.0.mlp.gate_proj.weight"]
        emb = shards["model.embed_tokens.weight"]
        size = 0
        for name, s in shards.items():
            local = list(s.full_shape)
            if s.dim is not None:
                local[s.dim] = s.end - s.start
            size += math.prod(local) * tensors[name][1].itemsize if name in tensors else 0
        print(f"  {rank:>4}  {f'{q0}-{q1 - 1}':>11}  {f'{k0}-{k1 - 1}':>8}  {f'{mlp.start}-{mlp.end - 1}':>13}  "
              f"{f'{emb.start}-{emb.end - 1}':>13}  {size:>12,}")
    if spec.num_kv_heads < args.tp or spec.num_heads % args.tp or spec.num_kv_heads % args.tp:
        print("  (uneven heads: ranks sharing a KV head each hold a copy of it)")


def _convert(src: str, output: str, tp: int, overwrite: bool, dtype: str | None = None) -> None:
    import time

    from tpserve.checkpoint.safetensors_io import CheckpointError
    from tpserve.models.convert import convert

    t0 = time.perf_counter()
    try:
        out = convert(src, output, tp, overwrite=overwrite, dtype=dtype)
    except PermissionError as exc:
        raise CheckpointError(f"{exc.filename}: permission denied") from None
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, FileExistsError)):
            raise
        raise CheckpointError(f"{exc.filename or output}: {exc.strerror or exc}") from None
    size = sum(f.stat().st_size for f in out.glob("rank-*.safetensors"))
    print(f"wrote {out}: {tp} rank files, {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")


def _verify(path: str) -> None:
    import time

    from tpserve.models.convert import verify

    t0 = time.perf_counter()
    summary = verify(path)
    extra = f" (+{summary['optimizer_tensors']} of optimizer state)" if "optimizer_tensors" in summary else ""
    print(f"ok {summary['path']}: {summary['files']} rank files, {summary['tensors']} tensors{extra}, "
          f"{summary['bytes'] / 1e6:.1f} MB, every checksum matches ({time.perf_counter() - t0:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # a parent that ignores SIGINT passes that on through exec (pytest did): Ctrl-C must still stop us
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.command == "selfcheck":
            from tpserve.parallel.selfcheck import run

            run(args.tp, args.seed)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "chat":
            _chat(args)
        elif args.command == "serve":
            from tpserve.server.openai_api import serve

            serve(args)
        elif args.command == "inspect":
            _inspect(args)
        elif args.command == "convert":
            _convert(args.src, args.output, args.tp, args.overwrite, args.dtype)
        elif args.command == "verify":
            _verify(args.path)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        # a user's mistake or a failed rank: one line, no traceback
        print(f"tpserve {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
