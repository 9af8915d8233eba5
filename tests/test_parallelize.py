"""parallelize() on existing models: explicit plan, inferred plan, transformers models."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_layers import assert_close
from torch import nn

from tpserve.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    infer_plan,
    parallelize,
)


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyMLP(nn.Module):
    def __init__(self, vocab: int = 19, d: int = 12, h: int = 22, n: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


EXPLICIT = {"embed": "vocab", "blocks.*.fc1": "colwise", "blocks.*.fc2": "rowwise", "head": "colwise_gather"}


def check_mlp(plan) -> dict:
    torch.manual_seed(0)
    model = TinyMLP()
    ids = torch.randint(0, 19, (2, 7))
    ref = model(ids)
    ref.sum().backward()
    ref_grad = model.blocks[0].fc2.bias.grad.clone()
    model.zero_grad()
    parallelize(model, plan)
    out = model(ids)
    assert_close(out, ref.detach(), "parallelized MLP logits")
    out.sum().backward()
    assert_close(model.blocks[0].fc2.bias.grad, ref_grad, "rowwise bias grad")
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding))}


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_parallelize_explicit_plan(tp_run, tp):
    kinds = tp_run(tp, check_mlp, EXPLICIT)[0]
    assert kinds["embed"] == "VocabParallelEmbedding"
    assert kinds["blocks.2.fc1"] == "ColumnParallelLinear"
    assert kinds["blocks.2.fc2"] == "RowParallelLinear"
    assert kinds["head"] == "ColumnParallelLinear"


def test_inferred_plan_finds_residual_writers():
    assert infer_plan(TinyMLP(n=2)) == {
        "blocks.0.fc1": "colwise", "blocks.0.fc2": "rowwise",
        "blocks.1.fc1": "colwise", "blocks.1.fc2": "rowwise",
    }


@pytest.mark.parametrize("tp", [2, 4])
def test_parallelize_inferred_plan(tp_run, tp):
    kinds = tp_run(tp, check_mlp, None)[0]
    assert kinds == {f"blocks.{i}.fc{j}": ("ColumnParallelLinear" if j == 1 else "RowParallelLinear")
                     for i in range(3) for j in (1, 2)}


def check_plan_errors() -> list:
    msgs = []
    for plan in ({"blocks.*.fc9": "colwise"}, {"blocks.*.fc1": "sideways"}, {"blocks.*.norm": "colwise"}):
        with pytest.raises((ValueError, TypeError)) as info:
            parallelize(TinyMLP(), plan)
        msgs.append(str(info.value))
    return msgs


def test_bad_plans_are_named(tp_run):
    msgs = tp_run(2, check_plan_errors)[0]
    assert "matches no module" in msgs[0] and "fc9" in msgs[0]
    assert "unknown style 'sideways'" in msgs[1] and "colwise" in msgs[1]
    assert "LayerNorm" in msgs[2]


def _tiny_config(arch: str, **extra):
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[arch]
    return cfg_cls(vocab_size=101, hidden_size=48, intermediate_size=70, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)


def check_transformers(arch: str, tied: bool) -> str:
    import transformers

    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[arch]
    torch.manual_seed(0)
    model = cls(_tiny_config(arch, tie_word_embeddings=tied)).eval()
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        parallelize(model)
        out = model(ids).logits
    assert_close(out, ref, f"{arch} logits after parallelize")
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, ColumnParallelLinear) and isinstance(attn.o_proj, RowParallelLinear)
    assert attn.q_proj.weight.shape[0] == 4 * 12 // dist.get_world_size()
    assert isinstance(model.lm_head, ColumnParallelLinear) and model.lm_head.gather_output
    return "ok"


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("mistral", False), ("qwen2", False)])
def test_parallelize_transformers_models(tp_run, arch, tied):
    tp_run(2, check_transformers, arch, tied)


def check_uneven_heads() -> str:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=36, intermediate_size=40, num_hidden_layers=1,
                                   num_attention_heads=3, num_key_value_heads=3)
    with pytest.raises(ValueError, match="TP=2 does not divide.*tpserve.models"):
        parallelize(transformers.LlamaForCausalLM(cfg))
    return "ok"


def test_parallelize_uneven_heads_is_a_clear_error(tp_run):
    tp_run(2, check_uneven_heads)

