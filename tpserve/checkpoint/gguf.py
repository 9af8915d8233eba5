"""Convert a llama-architecture GGUF file into a transformers-format directory.

The engine loads ordinary transformers checkpoints (config.json + model.safetensors + tokenizer),
so a GGUF file is renamed once, then loaded like any other checkpoint: dequantized (a directory
transformers reads too), or with its 4-bit layers kept as the file holds them (``keep_q4``: Q4_0 /
Q4_1 blocks as tpserve's ``q4`` weights, a Q8_0 embedding as int8 groups, the rest in bfloat16),
which the engine then runs from about the file's size.
The output directory appears atomically (built in a hidden sibling, then renamed), so a crash
or a concurrent converter can never leave a directory that looks complete but is not.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpserve.parallel.quantize import Q4_CONFIG, Q8_EMBEDDING
from tpserve.utils.dtypes import DTYPE_NAME, MODEL_DTYPES
from tpserve.utils.fs import build_dir, fsync_path, publish_dir

# Bump when the output layout changes: directories written by an older converter then count
# as incomplete (the default-model cache rebuilds them; convert_gguf refuses to overwrite them).
FORMAT_VERSION = 1
MARKER_NAME = ".tpserve-converted.json"
SUPPORTED_ARCHITECTURES = ("llama",)

_DTYPE_NAMES = {dt: DTYPE_NAME[dt] for dt in MODEL_DTYPES}  # what a conversion may write

# GGUF tensor name -> transformers name; per-layer names get the block index substituted.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# tokenizer.ggml.pre values that llama.cpp pre-tokenizes as "each digit alone, then GPT-2 regex".
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"})
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_Q4_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}  # per 32 weights: float16 scale (and min for Q4_1), 16 bytes of nibbles


def read_marker(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The completion marker of ``out_dir`` (written last, before the atomic rename), or None."""
    try:
        info = json.loads((Path(out_dir) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` was fully written by a converter of the current output format.

    The marker is the last file written inside the temporary directory before it is renamed
    into place, so its presence means every other file is there too.
    """
    info = read_marker(out_dir)
    return info is not None and info.get("format") == FORMAT_VERSION


@functools.lru_cache(maxsize=1)
def converter_fingerprint() -> str:
    """Identifies the code that produced a conversion: this file plus the libraries it drives.

    Caches we own (the default model) compare it to rebuild after the converter or transformers'
    tokenizer conversion changes, instead of serving output from older code.
    """
    from importlib.metadata import version

    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return f"{digest}/transformers-{version('transformers')}/gguf-{version('gguf')}"


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    *,
    overwrite: bool = False,
    keep_q4: bool = False,
) -> Path:
    """Convert ``gguf_path`` into a transformers directory at ``out_dir`` and return it.

    ``keep_q4``: the linear layers stay 4-bit (every one must be Q4_0 or Q4_1: :func:`keeps_q4`),
    ``dtype`` is for the rest.

    A complete ``out_dir`` is returned untouched. Any other existing ``out_dir`` is an error
    (a user's directory is never deleted) unless ``overwrite=True``, which caches we own use
    to replace a partial or outdated conversion.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not overwrite and is_complete(out_dir):
        return out_dir
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}; choose one of {sorted(_DTYPE_NAMES.values())}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists but is not a complete conversion (no valid {MARKER_NAME}); "
            "delete it or choose another output directory"
        )

    started = time.perf_counter()
    reader = _open_reader(gguf_path)
    meta = _metadata(reader, gguf_path)
    config = _llama_config(reader, meta, gguf_path, dtype)
    if keep_q4:
        config["quantization_config"] = dict(Q4_CONFIG)
        if _embedding_type(reader) == "Q8_0":  # kept as its blocks too (and the tied head with it)
            config["quantization_config"]["embedding"] = Q8_EMBEDDING
    # Everything is read and checked before touching the disk, so a bad file fails fast.
    state_dict = _state_dict(reader, config, gguf_path, dtype, keep_q4)
    tokenizer = _tokenizer(gguf_path, meta, config)

    tmp = build_dir(out_dir)
    try:
        _write_weights(tmp, state_dict)
        del state_dict
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", _generation_config(config))
        # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where
        # every transformers version (and simple readers) look for it.
        tokenizer.save_pretrained(str(tmp), save_jinja_files=False)
        _write_json(tmp / MARKER_NAME, {
            "format": FORMAT_VERSION,
            "converter": converter_fingerprint(),
            "source": str(gguf_path.resolve()),
            "source_size": gguf_path.stat().st_size,
            "dtype": _DTYPE_NAMES[dtype],
            "quantization": "q4" if keep_q4 else None,
            "seconds": round(time.perf_counter() - started, 2),
        })
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        _publish(tmp, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------------------------------------
# reading


def _open_reader(path: Path) -> Any:
    """A GGUFReader, with errors that name the file instead of numpy/struct internals."""
    import gguf

    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file, expected a .gguf file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, expected b'GGUF'")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises assorted ValueError/struct/numpy errors
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


def _metadata(reader: Any, path: Path) -> dict[str, Any]:
    """Scalar and string metadata as plain Python values; big arrays (vocab) are skipped."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and len(field.data) > 1:
            continue  # token lists are read by transformers' tokenizer conversion
        try:
            meta[key] = field.contents()
        except Exception as exc:
            raise ValueError(f"{path}: cannot decode metadata field {key!r}: {exc}") from exc
    return meta


def _f32(value: float) -> float:
    """GGUF stores floats as float32; print the shortest decimal (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _llama_config(reader: Any, meta: dict[str, Any], path: Path, dtype: torch.dtype) -> dict[str, Any]:
    """transformers LlamaConfig fields, each taken from GGUF metadata (or derived from it)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise ValueError(f"{path}: required metadata field {full!r} is missing")
        return meta[full]

    hidden = int(need("embedding_length"))
    n_head = int(need("attention.head_count"))
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_head))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings (rope dim {rope_dim} != head dim {head_dim}) "
                         "are not supported")
    if int(meta.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{path}: attention value_length differs from key_length; not a llama layout")
    if n_head % n_kv:
        raise ValueError(f"{path}: head_count {n_head} is not a multiple of head_count_kv {n_kv}")

    rope_scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(meta[f"{arch}.rope.scaling.factor"])}
    elif scaling_type != "none":
        raise ValueError(f"{path}: rope scaling type {scaling_type!r} is not supported")

    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path}: llama3-style rope frequency factors (rope_freqs.weight) are not supported")
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:  # older files: the token list is the vocabulary
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(need("context_length")),
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "dtype": _DTYPE_NAMES[dtype],
    }
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        config[ours] = None if value is None else int(value)
    return config


def _unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row reordering.

    HF llama rotates the two halves of each head (rotate_half); llama.cpp rotates adjacent pairs,
    so convert_hf_to_gguf interleaves each head's rows: [h, 2, d/2] -> [h, d/2, 2]. The inverse
    views rows as [h, d/2, 2] and swaps back to [h, 2, d/2].
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_heads(name: str, config: dict[str, Any]) -> int | None:
    """How many heads llama.cpp permuted the rows of tensor ``name`` over (Q and K), else None."""
    if name.endswith("q_proj.weight"):
        return config["num_attention_heads"]
    if name.endswith("k_proj.weight"):
        return config["num_key_value_heads"]
    return None


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """transformers name -> torch shape for every tensor a llama checkpoint must have."""
    h, v, ff = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q_out, h), "self_attn.k_proj.weight": (kv_out, h),
        "self_attn.v_proj.weight": (kv_out, h), "self_attn.o_proj.weight": (h, q_out),
        "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h), "mlp.down_proj.weight": (h, ff),
    }
    for i in range(config["num_hidden_layers"]):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{i}.{name}"] = shape
    return shapes


def _hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{int(m.group(1))}.{_LAYER_TENSORS[m.group(2)]}"
    raise ValueError(f"{path}: unexpected tensor {gguf_name!r} for a llama checkpoint (biases, MoE and "
                     "other variants are not supported)")


def _is_linear(name: str) -> bool:
    return name.endswith("_proj.weight")


def keeps_q4(path: str | os.PathLike) -> bool:
    """Whether every linear layer of the GGUF file is Q4_0 / Q4_1, so it can stay 4-bit."""
    reader = _open_reader(Path(path))
    layers = [t for t in reader.tensors if _LAYER_RE.match(t.name) and t.name.endswith(
        tuple(k for k, v in _LAYER_TENSORS.items() if _is_linear(v)))]
    return bool(layers) and all(t.tensor_type.name in _Q4_BLOCK_BYTES for t in layers)


def _embedding_type(reader: Any) -> str | None:
    return next((t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight"), None)


def _blocks(t: Any, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """A quantized tensor's raw blocks [rows, blocks, nbytes] and each block's float16 scale d
    (its first two bytes, in every GGUF type used here)."""
    raw = np.asarray(t.data)
    blocks = raw.reshape(raw.shape[0], -1, nbytes)
    return blocks, blocks[..., 0:2].copy().view(np.float16)[..., 0]


def _q8_tensors(t: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor's blocks as (int8 [N, K], float16 scale [N, K / 32]): w = q * scale."""
    blocks, d = _blocks(t, 34)  # float16 d, then 32 int8
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(blocks.shape[0], -1)
    return torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(d))


def _q4_tensors(t: Any, path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 tensor's blocks as (nibbles [N, K / 2], scale, min [N, K / 32]): Q4_1's
    ``d * q + m`` is ``scale * q + min`` as it stands, Q4_0's ``d * (q - 8)`` has min ``-8 d``."""
    kind = t.tensor_type.name
    if kind not in _Q4_BLOCK_BYTES:
        raise ValueError(f"{path}: tensor {t.name!r} is {kind}; only Q4_0 / Q4_1 layers stay 4-bit "
                         "(load it with --dtype float32 or bfloat16 to dequantize it)")
    blocks, d = _blocks(t, _Q4_BLOCK_BYTES[kind])
    rows = blocks.shape[0]
    if kind == "Q4_1":
        m, qs = blocks[..., 2:4].copy().view(np.float16)[..., 0], blocks[..., 4:]
    else:
        m, qs = (d * np.float16(-8)).astype(np.float16), blocks[..., 2:]
    return (torch.from_numpy(np.ascontiguousarray(qs).reshape(rows, -1)), torch.from_numpy(np.ascontiguousarray(d)),
            torch.from_numpy(np.ascontiguousarray(m)))


def _state_dict(reader: Any, config: dict[str, Any], path: Path, dtype: torch.dtype,
                keep_q4: bool = False) -> dict[str, torch.Tensor]:
    """Dequantize every tensor (``keep_q4``: all but the 4-bit linear layers), rename it,
    un-permute Q/K, and check all shapes against the config."""
    from gguf.quants import dequantize

    expected = _expected_shapes(config)
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name, path)
        if name not in expected:
            raise ValueError(f"{path}: tensor {t.name!r} ({name}) does not fit the config "
                             f"(layers={config['num_hidden_layers']}, tied={config['tie_word_embeddings']})")
        if keep_q4 and _is_linear(name):
            q, scale, minv = _q4_tensors(t, path)
            rows, cols = expected[name]
            if tuple(q.shape) != (rows, cols // 2) or tuple(scale.shape) != (rows, cols // 32):
                raise ValueError(f"{path}: tensor {t.name!r} holds {tuple(q.shape)} bytes of 4-bit blocks, "
                                 f"expected {(rows, cols // 2)} for {name} {expected[name]}")
            heads = _rope_heads(name, config)
            if heads is not None:
                q, scale, minv = (_unpermute_rope_rows(x, heads).contiguous() for x in (q, scale, minv))
            out[name], out[name + "_scale"], out[name + "_min"] = q, scale, minv
            continue
        if keep_q4 and name == "model.embed_tokens.weight" and t.tensor_type.name == "Q8_0":
            q, scale = _q8_tensors(t)
            if tuple(q.shape) != expected[name]:
                raise ValueError(f"{path}: tensor {t.name!r} holds {tuple(q.shape)} int8 values, expected {expected[name]}")
            out[name], out[name + "_scale"] = q, scale
            continue
        try:
            data = dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise ValueError(f"{path}: tensor {t.name!r} uses quantization type {t.tensor_type.name}, "
                             "which the installed gguf package cannot dequantize") from exc
        # GGUF lists dimensions fastest-first (ne[0] = columns); torch wants them slowest-first.
        torch_shape = tuple(int(n) for n in reversed(t.shape))
        if tuple(data.shape) != torch_shape or torch_shape != expected[name]:
            raise ValueError(f"{path}: tensor {t.name!r} has shape {tuple(data.shape)} "
                             f"(GGUF ne {list(map(int, t.shape))}), expected {expected[name]} for {name}")
        if not data.flags.writeable:  # F32/F16 tensors are views of the read-only memmap
            data = data.copy()
        w = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        heads = _rope_heads(name, config)
        if heads is not None:
            w = _unpermute_rope_rows(w, heads)
        out[name] = w.to(dtype).contiguous()
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensors are missing, e.g. {missing[:3]}")
    return out


# ---------------------------------------------------------------------------------------------
# writing


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_weights(tmp: Path, state_dict: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    target = tmp / "model.safetensors"
    save_file(state_dict, str(target), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the umask-derived mode of its directory
    # (minus execute bits) so a shared cache stays readable to whoever can read the rest.
    os.chmod(target, tmp.stat().st_mode & 0o666)


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }


def _tokenizer(gguf_path: Path, meta: dict[str, Any], config: dict[str, Any]) -> Any:
    """transformers' own GGUF tokenizer conversion, plus the chat template and context length."""
    from transformers import AutoTokenizer

    gguf_path = gguf_path.resolve()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:
        raise ValueError(f"{gguf_path}: transformers could not build a tokenizer from it: {exc}") from exc
    _split_digits_like_llama_cpp(tok, meta.get("tokenizer.ggml.pre"))
    template = meta.get("tokenizer.chat_template")
    if template:
        tok.chat_template = template
    tok.model_max_length = config["max_position_embeddings"]
    return tok


def _split_digits_like_llama_cpp(tok: Any, pre: str | None) -> None:
    """Give starcoder-family vocabularies (SmolLM's included) their one-digit-per-token split.

    llama.cpp splits every digit off (\\p{N}) before the GPT-2 regex for these ``tokenizer.ggml.pre``
    values, as the original tokenizer.json does with a ``Digits`` pre-tokenizer. transformers
    5.23 does not know these names and falls back to plain byte-level GPT-2 splitting, which
    tokenizes e.g. "a  2" differently. Only that fallback is replaced, so a transformers
    release that handles them itself is left alone.
    """
    from tokenizers import pre_tokenizers

    backend = tok.backend_tokenizer
    if pre not in _DIGIT_SPLIT_PRE or type(backend.pre_tokenizer).__name__ != "ByteLevel":
        return
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out_dir`` atomically (``utils.fs.publish_dir``). Without ``overwrite``,
    losing a race to a concurrent converter that left a complete copy is fine: theirs is kept
    and ours discarded by the caller."""
    if publish_dir(tmp, out_dir, replace=overwrite) or is_complete(out_dir):
        return
    raise FileExistsError(f"{out_dir} appeared during conversion but is not a complete conversion")
