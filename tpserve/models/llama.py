"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) built from tensor-parallel layers.

Module and parameter names match transformers checkpoints (``model.layers.0.self_attn.q_proj``),
so loading is a name lookup plus each parameter's ``weight_loader``. One class serves all four
architectures; what differs is read from the config (qkv bias, q/k norm, sliding window).

Heads: query heads split contiguously by the partition rule; each rank holds exactly the KV heads
its query heads use, so KV heads are replicated when TP exceeds their count and split unevenly
when counts do not divide (SmolLM2's 9 query / 3 KV heads runs at TP = 2, 3 and 4).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tpserve.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    comm,
    get_group,
    group_rank,
    group_size,
    head_ranges,
    matvec,
)
from tpserve.parallel.comm import patience
from tpserve.parallel.layers import REDUCE_ROWS, finish_rows, fuse_columns, fused_forward, linear

from .attention import Step, attend, make_step, paged_decode
from .fused import add_rms_norm, kernels_for, rms_norm, rope, rope_store, silu_mul

# peers may reach a collective a compile's length apart on a compiled step's first call
COMPILE_TIMEOUT_S = float(os.environ.get("TPSERVE_COMPILE_TIMEOUT", "600"))


@dataclass
class Spec:
    """The facts about a checkpoint's architecture the forward pass needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None

    @classmethod
    def from_config(cls, config) -> "Spec":
        model_type = getattr(config, "model_type", "llama")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (Llama-family models use 'silu')")
        attention_bias = bool(getattr(config, "attention_bias", False))
        window = None
        if model_type == "mistral":
            window = getattr(config, "sliding_window", None)
        elif getattr(config, "use_sliding_window", False):
            raise ValueError(f"{model_type} with use_sliding_window=True is not supported yet")
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
        )


LIGHT_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale.

    default, linear and Llama-3 scaling are computed here (the parity tests hold them to
    transformers); other kinds (YaRN, ...) use transformers' own rope functions.
    """
    params = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    kind = params.get("rope_type", params.get("type", "default"))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if kind in LIGHT_ROPE_TYPES:
        inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
        if kind == "linear":
            inv = inv / params["factor"]
        elif kind == "llama3":  # wavelengths beyond the original context are stretched, short ones kept
            factor, old = params["factor"], params["original_max_position_embeddings"]
            low, high = params["low_freq_factor"], params["high_freq_factor"]
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old / low, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / high) & (wavelen <= old / low)
            inv = torch.where(medium, blended, scaled)
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind in ("dynamic", "longrope") or kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type={kind!r} is not supported; supported: default, linear, llama3, yarn")
    with torch.device("cpu"):  # also when the model itself is being built on the meta device
        inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
    return inv_freq.float(), float(scale)


class RMSNorm(nn.Module):
    """Normalises in float32 and casts back before the weight, as transformers does."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _kv_of_q(spec: Spec, tp: int, rank: int) -> list[int]:
    """For each local query head, the index of its KV head among this rank's KV heads."""
    (q0, q1), (kv0, _) = head_ranges(spec.num_heads, spec.num_kv_heads, tp, rank)
    group_size = spec.num_heads // spec.num_kv_heads
    return [qh // group_size - kv0 for qh in range(q0, q1)]


def _kv_heads_shared(spec: Spec, tp: int) -> bool:
    """Whether any KV head is held by more than one rank (the same answer on every rank)."""
    held = [kv for r in range(tp) for kv in range(*head_ranges(spec.num_heads, spec.num_kv_heads, tp, r)[1])]
    return len(held) != len(set(held))


class Attention(nn.Module):
    def __init__(self, spec: Spec, group: dist.ProcessGroup, device=None, dtype=None) -> None:
        super().__init__()
        tp, rank = group_size(group), group_rank(group)
        hd, h = spec.head_dim, spec.hidden_size
        (q0, q1), (kv0, kv1) = head_ranges(spec.num_heads, spec.num_kv_heads, tp, rank)
        self.head_dim, self.num_local_heads, self.num_local_kv = hd, q1 - q0, kv1 - kv0
        kw = dict(group=group, device=device, dtype=dtype, init=False)
        self.q_proj = ColumnParallelLinear(h, spec.num_heads * hd, spec.qkv_bias, out_range=(q0 * hd, q1 * hd), **kw)
        # a KV head that several ranks hold gets each one's share of its gradient (training)
        shared = _kv_heads_shared(spec, tp)
        self.k_proj = ColumnParallelLinear(h, spec.num_kv_heads * hd, spec.qkv_bias, out_range=(kv0 * hd, kv1 * hd),
                                           rows_shared=shared, **kw)
        self.v_proj = ColumnParallelLinear(h, spec.num_kv_heads * hd, spec.qkv_bias, out_range=(kv0 * hd, kv1 * hd),
                                           rows_shared=shared, **kw)
        self.o_proj = RowParallelLinear(spec.num_heads * hd, h, spec.o_bias, unit=hd, **kw)
        if spec.qk_norm:
            self.q_norm = RMSNorm(hd, spec.rms_norm_eps, device, dtype)
            self.k_norm = RMSNorm(hd, spec.rms_norm_eps, device, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.kv_of_q = _kv_of_q(spec, tp, rank)
        # SDPA's GQA path needs every local KV head to serve the same number of consecutive
        # local query heads; an uneven cut (e.g. heads 0-4 over KV heads 0,0,0,1,1) needs a gather.
        per_kv = self.num_local_heads // self.num_local_kv
        self.gqa_uniform = self.kv_of_q == [i // per_kv for i in range(self.num_local_heads)]
        self.kv_index = torch.tensor(self.kv_of_q, dtype=torch.long)
        self.qkv = None  # q/k/v as one product (fuse_projections), for inference

    def forward(self, x: torch.Tensor, step: Step, cache: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        n = x.shape[0]  # tokens flattened: [N, hidden]
        if self.qkv is not None and not torch.is_grad_enabled():
            qkv = fused_forward(x, self.qkv)
            if cache is not None and self.q_norm is None:  # rope, and K/V into the cache, in one call
                q = rope_store(qkv, step.cos, step.sin, step.slots, cache, self.num_local_heads, self.num_local_kv)
                if q is not None:
                    out = attend(q, None, None, step, cache, self.kv_index, self.gqa_uniform)
                    return self.o_proj(out.reshape(n, -1))
            q, k, v = (t.contiguous() for t in qkv.split(self.qkv[-1], dim=-1))  # (a no-op for one row)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(n, self.num_local_heads, self.head_dim)
        k = k.reshape(n, self.num_local_kv, self.head_dim)
        v = v.reshape(n, self.num_local_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope(q, step.cos, step.sin)
        k = rope(k, step.cos, step.sin)
        out = attend(q, k, v, step, cache, self.kv_index, self.gqa_uniform)
        return self.o_proj(out.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, spec: Spec, group: dist.ProcessGroup, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(group=group, device=device, dtype=dtype, init=False)
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_proj = ColumnParallelLinear(h, i, spec.mlp_bias, **kw)
        self.up_proj = ColumnParallelLinear(h, i, spec.mlp_bias, **kw)
        self.down_proj = RowParallelLinear(i, h, spec.mlp_bias, **kw)
        self.gate_up = None  # gate/up as one product (fuse_projections), for inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and not torch.is_grad_enabled():
            return self.down_proj(silu_mul(fused_forward(x, self.gate_up)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: Spec, group: dist.ProcessGroup, device=None, dtype=None) -> None:
        super().__init__()
        self.self_attn = Attention(spec, group, device, dtype)
        self.mlp = MLP(spec, group, device, dtype)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, device, dtype)

    def forward(self, x, step: Step, cache) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), step, cache)
        norm = self.post_attention_layernorm
        x, h = add_rms_norm(x, h, norm.weight, norm.eps)  # the residual sum and its norm in one pass
        return x + self.mlp(h)


class Backbone(nn.Module):
    def __init__(self, spec: Spec, group: dist.ProcessGroup, device=None, dtype=None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, group=group, device=device,
                                                   dtype=dtype, init=False)
        self.layers = nn.ModuleList(DecoderLayer(spec, group, device, dtype) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, device, dtype)


class Product(NamedTuple):
    """One product of a :class:`LayerPlan`: ``layers.linear``'s arguments after x (weight, bias,
    scale, float_out, minv), and the extension call linear makes for up to ``rows`` rows
    (``matvec.kernel_call``; None and 0 where it makes none)."""

    args: tuple
    kernel: Callable[[torch.Tensor], torch.Tensor] | None
    rows: int


def _product(dtype: torch.dtype, weight, bias, scale, float_out: bool, minv) -> Product:
    found = matvec.kernel_call(weight, bias, scale, float_out, minv, dtype)
    return Product((weight, bias, scale, float_out, minv), *(found or (None, 0)))


class LayerPlan(NamedTuple):
    """One decoder layer's tensors, taken out of its modules once, for :func:`decode_rows`: its
    products, and what the rest needs."""

    in_norm: torch.Tensor
    qkv: Product
    heads: int
    kv_heads: int
    kv_index: torch.Tensor
    o: Product
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: Product | None  # None: gate and up apart (the decode layout keeps their weights transposed)
    gate: Product
    up: Product
    down: Product
    down_bias: torch.Tensor | None
    reduce: bool  # o and down give partial sums to all-reduce (RowParallelLinear's own flag)


def _linear_product(dtype: torch.dtype, mod, bias: bool, float_out: bool = False) -> Product:
    return _product(dtype, mod.weight, mod.bias if bias else None, mod.weight_scale, float_out, mod.weight_min)


def layer_plan(layer: DecoderLayer) -> LayerPlan | None:
    """``layer``'s :class:`LayerPlan`, or None where :func:`decode_rows` does not apply (q/k norms,
    q/k/v not fused)."""
    a, m = layer.self_attn, layer.mlp
    reduce = {r.reduce_output and r.tp_size > 1 for r in (a.o_proj, m.down_proj)}
    if a.qkv is None or a.q_norm is not None or len(reduce) > 1:
        return None
    reduce = reduce.pop()
    dtype = layer.input_layernorm.weight.dtype  # the activations' (the model's compute dtype)
    w, b, scale, minv, _ = a.qkv
    gate_up = None if m.gate_up is None else _product(dtype, *m.gate_up[:3], False, m.gate_up[3])
    return LayerPlan(layer.input_layernorm.weight, _product(dtype, w, b, scale, False, minv), a.num_local_heads,
                     a.num_local_kv, a.kv_index, _linear_product(dtype, a.o_proj, False, reduce), a.o_proj.bias,
                     layer.post_attention_layernorm.weight, gate_up, _linear_product(dtype, m.gate_proj, True),
                     _linear_product(dtype, m.up_proj, True), _linear_product(dtype, m.down_proj, False, reduce),
                     m.down_proj.bias, reduce)


def decode_rows(plans: list[LayerPlan], x: torch.Tensor, step: Step, kv_cache: list, eps: float,
                group: dist.ProcessGroup) -> torch.Tensor | None:
    """Decode rows through every layer as the modules compute them, bit for bit, with the same
    functions but none of the module calls, attribute lookups and per-call checks (asked once
    here), and fewer passes: a layer's MLP output joins the residual stream in the next layer's
    norm, and row-parallel sums reach ``add_rms_norm`` in float32, which rounds them. With kernels
    stubbed out, a bf16 step of the default model spent ~3 ms of its ~20 in Python, and this path
    decoded 1.12-1.19x faster than the modules at TP = 1 and 2, in bf16 and fp32, on a 2-core CPU
    (``benchmarks/decode_plan.py``). None where it does not apply (the caller runs the modules)."""
    k0, v0 = kv_cache[0]
    fk = kernels_for(x, step.cos, step.sin, k0, v0, plans[0].in_norm)
    if fk is None or step.chunks or not step.kernel or step.num_decode != x.shape[0]:
        return None
    n, dtype, cos, sin, slots = x.shape[0], x.dtype, step.cos, step.sin, step.slots
    rows = n if dtype is plans[0].in_norm.dtype else math.inf  # the kernels were chosen for the plan's dtype
    total = comm.summer(group) if plans[0].reduce else None

    def mm(product: Product, x: torch.Tensor) -> torch.Tensor:
        return product.kernel(x) if rows <= product.rows else linear(x, *product.args)

    pending = None  # the last MLP's output, which the next layer's norm adds to the residual stream
    for p, (k_cache, v_cache) in zip(plans, kv_cache):
        if pending is None:
            normed = fk.rms_norm(x, p.in_norm, eps)
        else:
            x, normed = fk.add_rms_norm(x, pending, p.in_norm, eps)
        q = fk.rope_store(mm(p.qkv, normed), cos, sin, slots, k_cache, v_cache, p.heads, p.kv_heads)
        out = paged_decode(q, k_cache, v_cache, step, p.kv_index)
        x, h = fk.add_rms_norm(x, finish_rows(mm(p.o, out.view(n, -1)), dtype, p.o_bias, group, p.reduce, total,
                                              rounded=False), p.post_norm, eps)
        if p.gate_up is not None:
            act = fk.silu_mul(mm(p.gate_up, h))
        else:
            act = F.silu(mm(p.gate, h)) * mm(p.up, h)
        pending = finish_rows(mm(p.down, act), dtype, p.down_bias, group, p.reduce, total, rounded=False)
    return x + pending.to(dtype)


def _layer_step(layer: DecoderLayer, x: torch.Tensor, step: Step, cache) -> torch.Tensor:
    return layer(x, step, cache)


def _head_step(model: "LlamaForCausalLM", x: torch.Tensor, gather: bool | str) -> torch.Tensor | None:
    return model.lm_head(model.model.norm(x), gather_output=gather)


@contextlib.contextmanager
def _compile_settings():
    """Dynamo settings for the compiled decode step, set around each compiled call (compiles
    happen inside calls) rather than for the whole process: a higher recompile limit, since
    several models (or engines) share the step functions, and no duck sizing, which would
    otherwise assume for good that two sizes equal on the first call (a 3-column cache and 3
    KV heads) are always equal, and recompile when they differ."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    limit = max(torch._dynamo.config.recompile_limit, 64)
    with torch._dynamo.config.patch(recompile_limit=limit), fx_config.patch(use_duck_shape=False):
        yield


def _check_cpp_compiler(device: torch.device) -> None:
    import shutil

    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise RuntimeError("compile=True on CPU needs a C++ compiler (torch.compile builds its kernels with one): "
                           "install g++, or run without --compile / compile=True")


class LlamaForCausalLM(nn.Module):
    """TP-aware causal LM; ``forward`` returns logits (see ``gather``)."""

    def __init__(self, config, group: dist.ProcessGroup | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.spec = spec = Spec.from_config(config)
        self.group = get_group(group)
        self.model = Backbone(spec, self.group, device, dtype)
        self.lm_head = ParallelLMHead(spec.hidden_size, spec.vocab_size, group=self.group, device=device, dtype=dtype,
                                      init=False)
        self.tie_weights()
        self.inv_freq, self.rope_scale = rope_inv_freq(config)
        self._decode_layer = self._decode_head = None
        self.plans: list[LayerPlan] | None = None  # decode_rows' (fuse_projections)

    def compile_decode(self) -> None:
        """Compile the one-token step with ``torch.compile``, as gpt-fast does: elementwise ops
        fuse, and matrix-vector products become bandwidth-bound reductions (``layers.linear``).

        Every decoder layer runs the same compiled function (regional compilation), so it
        compiles once, in seconds, instead of once per layer. Batch and cache length are dynamic,
        so a model compiles at most three graphs (see :meth:`decode_graph`) on first use; prefill
        stays eager. The compiler settings it needs (:func:`_compile_settings`) hold only while a
        compiled step runs, so the rest of the process keeps its own; running under a different
        ``torch.set_num_threads`` than the first call recompiles.
        """
        _check_cpp_compiler(self.model.norm.weight.device)
        self.compiled_graphs: set[str] = set()
        self._decode_layer = torch.compile(_layer_step, dynamic=True)
        self._decode_head = torch.compile(_head_step, dynamic=True)

    @staticmethod
    def decode_graph(batch: int) -> str:
        """Which compiled graph a decode step of ``batch`` rows runs: dynamo specialises a batch of
        one, and ``layers.linear`` changes kernels above ``REDUCE_ROWS`` rows."""
        return "one" if batch == 1 else "few" if batch <= REDUCE_ROWS else "many"

    @property
    def decode_compiled(self) -> bool:
        return self._decode_layer is not None

    def fuse_projections(self) -> int:
        """Each layer's q/k/v and gate/up as one product each, for inference: three calls fewer a
        layer, and larger products for the threads to split. Returns how many were fused."""
        count = 0
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.qkv = fuse_columns([a.q_proj, a.k_proj, a.v_proj])
            m.gate_up = fuse_columns([m.gate_proj, m.up_proj])
            count += (a.qkv is not None) + (m.gate_up is not None)
        self._make_plans()
        return count

    def _make_plans(self) -> None:
        """:func:`decode_rows`' plans, after :meth:`fuse_projections` or new buffers (None where a
        layer has none: the modules run)."""
        plans = [layer_plan(layer) for layer in self.model.layers]
        self.plans = plans if plans and all(p is not None for p in plans) else None

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    def init_buffers(self, device: torch.device) -> None:
        """(Re)build the non-weight tensors (rope frequencies, KV-head index) on ``device``, e.g.
        after the model was built on the meta device and loaded."""
        self.inv_freq = rope_inv_freq(self.config)[0].to(device)
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.kv_index = torch.tensor(attn.kv_of_q, dtype=torch.long, device=device)
        if self.plans is not None:
            self._make_plans()

    def make_step(self, positions: list[int], **kwargs) -> Step:
        """A :class:`Step` for tokens at ``positions`` (see :func:`attention.make_step`)."""
        dtype = self.model.norm.weight.dtype
        return make_step(self.inv_freq, self.rope_scale, dtype, positions, window=self.spec.sliding_window, **kwargs)

    def forward(self, input_ids: torch.Tensor, step: Step, kv_cache: list | None = None,
                gather: bool | str = True, compiled: bool = False) -> torch.Tensor | None:
        """Logits for the flattened tokens ``input_ids`` [N] at ``step.logit_rows`` (all without).
        ``gather``: True for full-vocabulary logits on every rank, "rank0" for rank 0 only
        (others get None), "argmax" for every rank's argmax ids, False for this rank's
        vocabulary slice. ``compiled`` runs a decode-only step through :meth:`compile_decode`'s
        functions."""
        if compiled:
            if self._decode_layer is None:
                raise RuntimeError("forward(compiled=True) needs compile_decode() first")
            if step.chunks or kv_cache is None:
                raise ValueError("forward(compiled=True) runs decode rows over a cache only")
            graph = self.decode_graph(input_ids.shape[0])
            # a graph's first call compiles, so peers may reach each collective a compile's length apart
            first = graph not in self.compiled_graphs
            with _compile_settings(), patience(COMPILE_TIMEOUT_S, self.group) if first else contextlib.nullcontext():
                out = self._forward(input_ids, step, kv_cache, gather, True)
            self.compiled_graphs.add(graph)
            return out
        return self._forward(input_ids, step, kv_cache, gather, False)

    def _forward(self, input_ids, step, kv_cache, gather, compiled):
        x = self.model.embed_tokens(input_ids)
        y = None
        if self.plans is not None and kv_cache is not None and not compiled and not torch.is_grad_enabled():
            y = decode_rows(self.plans, x, step, kv_cache, self.spec.rms_norm_eps, self.group)
        if y is not None:
            x = y
        else:
            for i, layer in enumerate(self.model.layers):
                cache = kv_cache[i] if kv_cache is not None else None
                x = self._decode_layer(layer, x, step, cache) if compiled else layer(x, step, cache)
        if step.logit_rows is not None:
            x = x.index_select(0, step.logit_rows)
        if compiled:
            return self._decode_head(self, x, gather)
        return self.lm_head(self.model.norm(x), gather_output=gather)

