"""Native models against transformers: logits and greedy tokens at TP = 1..4, and bad checkpoints."""

import json
import shutil
import struct

import pytest
import torch

TP = [1, 2, 3, 4]
NEW_TOKENS = 32


def _config(kind: str):
    import transformers as tf

    common = dict(vocab_size=160, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                  max_position_embeddings=128, initializer_range=0.1)
    if kind == "llama_gqa":
        return tf.LlamaConfig(**{**common, "hidden_size": 64}, num_attention_heads=8, num_key_value_heads=2)
    if kind == "llama_9_3_tied":  # SmolLM2's head layout
        return tf.LlamaConfig(**common, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    if kind == "llama3_rope":
        return tf.LlamaConfig(**common, num_attention_heads=6, num_key_value_heads=3, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
    if kind == "mistral_window":
        return tf.MistralConfig(**common, num_attention_heads=6, num_key_value_heads=2, sliding_window=16)
    if kind == "qwen2_bias":
        return tf.Qwen2Config(**common, num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=False)
    if kind == "llama_bias":  # every projection with a bias (attention_bias, mlp_bias)
        return tf.LlamaConfig(**common, num_attention_heads=6, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    if kind == "qwen3_qknorm":
        return tf.Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    raise KeyError(kind)


KINDS = ["llama_gqa", "llama_9_3_tied", "llama3_rope", "mistral_window", "qwen2_bias", "qwen3_qknorm"]
PROMPTS = [[5, 17, 33, 2, 91, 7, 64], [120, 3], [44, 9, 150, 11, 6]]


def _save_reference(kind: str, path) -> dict:
    """Save a random model like transformers would, and record its logits and greedy tokens."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = _config(kind)
    cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
           "qwen3": tf.Qwen3ForCausalLM}[cfg.model_type]
    model = cls(cfg).eval()
    model.generation_config.eos_token_id = None
    shard = {"max_shard_size": "200KB"} if kind == "llama_gqa" else {}  # exercise the index path too
    model.save_pretrained(path, **shard)
    ref = {"logits": [], "greedy": []}
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            ref["logits"].append(model(ids).logits[0])
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            ref["greedy"].append(out[0, len(p):].tolist())
    return ref


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {k: (str(root / k), _save_reference(k, root / k)) for k in KINDS}


def check_parity(path: str, ref: dict, compiled: bool = False) -> dict:
    from tpserve.engine.runner import full_logits
    from tpserve.engine.sampling import SamplingParams
    from tpserve.engine.spmd import generate
    from tpserve.models import load_model

    model = load_model(path, dtype="float32", device="cpu", progress=False, compile=compiled)
    logits = None if compiled else full_logits(model, PROMPTS)
    tokens = generate(model, PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    out = {"tokens": tokens, "graphs": sorted(getattr(model, "compiled_graphs", []))}
    if logits is not None:
        out["err"] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(logits, ref["logits"]))
        out["abs_err"] = max((a - b).abs().max().item() for a, b in zip(logits, ref["logits"]))
    return out


@pytest.mark.parametrize("tp", TP)
@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_transformers(tp_run, checkpoints, kind, tp):
    path, ref = checkpoints[kind]
    results = tp_run(tp, check_parity, path, ref)
    assert results[0]["abs_err"] <= 1e-4, f"{kind} TP={tp}: max abs logit error {results[0]['abs_err']:.3g}"
    for r in results:  # every rank ends with the tokens rank 0 chose
        assert r["tokens"] == results[0]["tokens"]
    assert results[0]["tokens"] == ref["greedy"], f"{kind} TP={tp}: greedy tokens differ from transformers"


# what the compiled step sees differently: uneven heads and a tied head, a window, biases, q/k norms
# (llama_gqa and llama3_rope differ from these only outside it: head counts and rope tables)
COMPILED_KINDS = ["llama_9_3_tied", "mistral_window", "qwen2_bias", "qwen3_qknorm"]


@pytest.mark.parametrize("kind,tp", [(k, 2) for k in COMPILED_KINDS] + [("llama_9_3_tied", 4)])
def test_compiled_decode_matches_transformers(tp_run, checkpoints, kind, tp):
    """compile_decode: each architecture's decode step through torch.compile, same greedy tokens."""
    path, ref = checkpoints[kind]
    results = tp_run(tp, check_parity, path, ref, True)
    assert all(r["tokens"] == ref["greedy"] for r in results), f"{kind} TP={tp}: compiled greedy tokens differ"
    assert all(r["graphs"] == ["few"] for r in results)  # the 3-prompt batch really ran compiled


def check_decode_plan(path: str, dtype: str, quantization: str | None) -> dict:
    """Every decode step through ``llama.decode_rows`` run again through the layer modules on the
    same input (rewriting the same K/V into the same slots): the two must agree bit for bit."""
    from tpserve.engine.sampling import SamplingParams
    from tpserve.engine.spmd import generate
    from tpserve.models import llama, load_model

    real, same = llama.decode_rows, []

    def both(plans, x, step, kv_cache, *args):
        y = real(plans, x, step, kv_cache, *args)
        if y is not None:
            want = x
            for layer, cache in zip(model.model.layers, kv_cache):
                want = layer(want, step, cache)
            same.append(torch.equal(y, want))
        return y

    llama.decode_rows = both
    try:
        model = load_model(path, dtype=dtype, device="cpu", progress=False, quantization=quantization,
                           decode_layout=True)
        generate(model, PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True))
    finally:
        llama.decode_rows = real
    from tpserve.parallel import matvec

    products = [q for p in model.plans or [] for q in (p.qkv, p.o, p.gate_up or p.gate, p.down)]
    # the products linear() would run through matvec's kernels are called directly
    want_direct = matvec.available() and (quantization is not None or dtype == "bfloat16" and matvec.bf16_kernel())
    return {"same": same, "gate_up_fused": [p.gate_up is not None for p in model.plans or []],
            "direct": all((q.kernel is not None) == bool(want_direct) for q in products) and bool(products)}


@pytest.fixture(scope="module")
def bias_checkpoint(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bias") / "llama_bias"
    model = tf.LlamaForCausalLM(_config("llama_bias"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # transformers starts them at zero
                param.normal_(0, 0.1)
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("dtype,quantization", [("float32", None), ("bfloat16", None), ("bfloat16", "int8")])
def test_decode_plan_equals_the_modules_bit_for_bit(tp_run, checkpoints, bias_checkpoint, dtype, quantization, tp):
    """The module-free decode step (``llama.decode_rows``, which calls matvec's kernels directly) on
    biases in every projection, a sliding window and SmolLM2's uneven heads, fp32 (gate/up apart
    in the decode layout), bf16 and int8."""
    paths = [bias_checkpoint, checkpoints["mistral_window"][0], checkpoints["llama_9_3_tied"][0]]
    for path in paths:
        results = tp_run(tp, check_decode_plan, path, dtype, quantization)
        for r in results:
            assert r["same"] and all(r["same"]), f"{path} {dtype} TP={tp}: decode_rows differs from the modules"
            assert r["direct"], f"{path} {dtype} TP={tp}: decode_rows did not call the kernels directly"
            if dtype == "float32" and tp == 1:  # the decode layout keeps wide gate/up weights transposed
                assert r["gate_up_fused"] and not any(r["gate_up_fused"])


def check_no_plan(path: str) -> bool:
    from tpserve.models import load_model

    model = load_model(path, dtype="float32", device="cpu", progress=False)
    return model.plans is None and all(layer.self_attn.qkv is not None for layer in model.model.layers)


def test_no_decode_plan_with_qk_norm(tp_run, checkpoints):
    """Qwen3's q/k norms sit between the projection and rope: its layers run as modules."""
    assert tp_run(1, check_no_plan, checkpoints["qwen3_qknorm"][0]) == [True]


def check_mixed_budgets(path: str) -> list:
    from tpserve.engine.sampling import SamplingParams
    from tpserve.engine.spmd import generate
    from tpserve.models import load_model

    model = load_model(path, dtype="float32", device="cpu", progress=False)
    long, short = [(7 * i) % 160 for i in range(120)], [5, 17, 33]
    budgets = [SamplingParams(max_tokens=8, ignore_eos=True), SamplingParams(max_tokens=100, ignore_eos=True)]
    together = generate(model, [long, short], budgets)
    alone = [generate(model, [long], budgets[0])[0], generate(model, [short], budgets[1])[0]]
    return [together[0] == alone[0] and len(alone[0]) == 8, together[1] == alone[1] and len(alone[1]) == 100]


def test_long_and_short_prompts_with_their_own_budgets(tp_run, checkpoints):
    """Each sequence keeps its own length: the long one ends while the short one goes on."""
    long_ok, short_ok = tp_run(1, check_mixed_budgets, checkpoints["llama_gqa"][0])[0]
    assert long_ok and short_ok


# ---- bad checkpoints: each error names file and tensor, on every rank, before any forward ----

def check_load_error(path: str) -> str:
    from tpserve.checkpoint.safetensors_io import CheckpointError
    from tpserve.models import load_model

    with pytest.raises(CheckpointError) as info:
        load_model(path, dtype="float32", device="cpu", progress=False)
    return str(info.value)


def _rewrite_header(file, edit) -> None:
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.fixture()
def broken(checkpoints, tmp_path):
    def make(kind: str):
        dst = tmp_path / kind
        shutil.copytree(checkpoints[kind][0], dst)
        return dst
    return make


def test_missing_file_named_by_index(tp_run, broken):
    d = broken("llama_gqa")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    for msg in tp_run(2, check_load_error, str(d)):
        assert victim.name in msg and "missing" in msg


def test_missing_tensor(tp_run, broken):
    d = broken("llama_9_3_tied")
    _rewrite_header(d / "model.safetensors", lambda h: h.pop("model.layers.1.mlp.up_proj.weight"))
    for msg in tp_run(2, check_load_error, str(d)):
        assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg


def test_shape_disagrees_with_config(tp_run, broken):
    d = broken("llama_9_3_tied")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    for msg in tp_run(2, check_load_error, str(d)):
        assert "model.safetensors" in msg and "mlp" in msg and "shape" in msg


def test_truncated_file(tp_run, broken):
    d = broken("qwen2_bias")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    for msg in tp_run(2, check_load_error, str(d)):
        assert "model.safetensors" in msg and "truncated" in msg and "tensor" in msg


def test_header_offsets_lie(tp_run, broken):
    d = broken("qwen2_bias")

    def lie(h):
        meta = h["model.norm.weight"]
        meta["data_offsets"] = [meta["data_offsets"][0], meta["data_offsets"][1] + 8]

    _rewrite_header(d / "model.safetensors", lie)
    for msg in tp_run(2, check_load_error, str(d)):
        assert "model.safetensors" in msg and "model.norm.weight" in msg


def test_unsupported_architecture(tmp_path):
    from tpserve.models import load_config

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM, "
                                         "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_config(tmp_path)
