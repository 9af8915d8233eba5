"""What the benchmarks share: a median timer, one timed run of an engine, what a --dtype choice
runs as, and random fp32 Llama checkpoints: ~620 MB (loading, checkpoints) and the 281M even-head
model of the TP decode benchmark."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def median_time(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn``."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def engine_dtype(dtype: str) -> tuple[str, str | None]:
    """(LLM dtype, quantization) of a --dtype choice: q4 at dtype auto (as the default model runs
    by default); int8 computes in bf16 where tpserve's bf16 kernel runs on this CPU, else in fp32."""
    if dtype == "q4":
        return "auto", dtype
    if dtype != "int8":
        return dtype, None
    from tpserve.parallel import matvec

    return ("bfloat16" if matvec.bf16_kernel() else "float32"), dtype


ROWS, ROW_PROMPT, ROW_NEW = 16, 32, 16  # one_round's many-row decode


def _steps_until(engine, seqs: list, tokens: int) -> int:
    """Step ``engine`` until every one of ``seqs`` has ``tokens`` tokens (or has finished); the
    number of steps."""
    steps = 0
    while any(len(s.token_ids) < tokens and not s.finished for s in seqs):
        engine.step()
        steps += 1
    return steps


def one_round(llm, prompt: list[int], new: int) -> tuple[float, float, float]:
    """(prefill tok/s, batch-1 decode tok/s, 16-row decode tok/s) of one run of each, timed
    from that run's engine steps: prefill is ``prompt`` over the time to its first token, decode
    the ``new`` further tokens over the time from the first token to the last, and 16-row decode
    the tokens of the steps after all 16 rows (``ROW_PROMPT`` tokens each) have their first one.
    Never the difference of two runs, which on a noisy VM can swing a figure by 2x."""
    from tpserve import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=new + 1, ignore_eos=True)
    seq = engine.add(prompt, params)
    t0 = time.perf_counter()
    _steps_until(engine, [seq], 1)
    t1 = time.perf_counter()
    _steps_until(engine, [seq], new + 1)
    t2 = time.perf_counter()
    rows = [engine.add(prompt[:ROW_PROMPT], SamplingParams(max_tokens=ROW_NEW + 1, ignore_eos=True))
            for _ in range(ROWS)]
    _steps_until(engine, rows, 1)
    t3 = time.perf_counter()
    steps = _steps_until(engine, rows, ROW_NEW + 1)
    t4 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return len(prompt) / (t1 - t0), new / (t2 - t1), ROWS * steps / (t4 - t3)


# ~619 MB of fp32 weights; 16 query / 4 KV heads split evenly at TP = 2 and 4.
MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
# 281M parameters, 0.92 GB of fp32 read per decoded token (one row of its untied input embedding):
# big enough that decode is bandwidth-bound, with heads that split evenly at TP = 2 and 4.
MODEL_281M = dict(vocab_size=49152, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
LAYERS_PER_FILE = 2  # sharded like a hub checkpoint, so the generator holds <= ~130 MB at a time


def _layer_tensors(model: dict, i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One decoder layer's weights under transformers' names, randn * 0.02 (norms: ones)."""
    h, inter = model["hidden_size"], model["intermediate_size"]
    kv = model["num_key_value_heads"] * h // model["num_attention_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    out = {f"model.layers.{i}.{name}.weight": torch.randn(shape, generator=gen).mul_(0.02) for name, shape in shapes.items()}
    out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h)
    out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h)
    return out


def _file_groups(model: dict) -> list[list[str | int]]:
    """What goes in each safetensors file: "embed", groups of layer numbers, "head"."""
    n = model["num_hidden_layers"]
    return [["embed"]] + [list(range(i, min(i + LAYERS_PER_FILE, n))) for i in range(0, n, LAYERS_PER_FILE)] + [["head"]]


def make_checkpoint(root: Path, model: dict = MODEL, name: str = "llama-600m-fp32-v1") -> Path:
    """The cached random checkpoint under ``root``, created if missing.

    Written into a temporary directory and renamed into place, so an interrupted run leaves no
    half-written checkpoint behind that a later run would trust.
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    final = root / name
    if (final / "model.safetensors.index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    print(f"creating the benchmark checkpoint in {final} (once) ...", flush=True)
    try:
        LlamaConfig(architectures=["LlamaForCausalLM"], dtype="float32", **model).save_pretrained(tmp)
        gen = torch.Generator().manual_seed(0)
        h, vocab = model["hidden_size"], model["vocab_size"]
        groups = _file_groups(model)
        weight_map, total = {}, 0
        for k, group in enumerate(groups, 1):
            tensors: dict[str, torch.Tensor] = {}
            for part in group:
                if part == "embed":
                    tensors["model.embed_tokens.weight"] = torch.randn(vocab, h, generator=gen).mul_(0.02)
                elif part == "head":
                    tensors["model.norm.weight"] = torch.ones(h)
                    tensors["lm_head.weight"] = torch.randn(vocab, h, generator=gen).mul_(0.02)
                else:
                    tensors.update(_layer_tensors(model, part, gen))
            fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, fname))
            total += sum(t.nbytes for t in tensors.values())
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
