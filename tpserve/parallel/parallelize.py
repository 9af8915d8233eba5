"""Turn an existing dense model into a tensor-parallel one, in place (gpt-fast style).

``parallelize(model, plan)`` swaps each planned ``nn.Linear`` / ``nn.Embedding`` for its
parallel counterpart holding this rank's shard. Every rank must hold the same dense model
(same seed or same checkpoint) when it is called.
"""

from __future__ import annotations

import fnmatch
import operator

import torch
import torch.distributed as dist
from torch import nn

from . import comm, rng
from .layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from .partition import PartitionError

STYLES = ("colwise", "colwise_gather", "rowwise", "vocab", "replicate")

# transformers' tp_plan vocabulary, mapped onto ours.
_ALIASES = {
    "colwise_rep": "colwise_gather",
    "colwise_gather_output": "colwise_gather",
    "local_colwise": "colwise",
    "local_rowwise": "rowwise",
    "rowwise_rep": "rowwise",
    "embedding_rowwise": "vocab",
    "replicated": "replicate",
    "replicated_with_grad_allreduce": "replicate",
    "local": "replicate",
    "gather": "replicate",
}

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads")


def _style(value: str, pattern: str) -> str:
    style = _ALIASES.get(value, value)
    if style not in STYLES:
        raise ValueError(f"plan entry {pattern!r}: unknown style {value!r}; use one of {', '.join(STYLES)}")
    return style


def transformers_plan(model: nn.Module) -> dict[str, str] | None:
    """The tp_plan a transformers model declares (base model plan plus its head's), prefixed
    with the base model's attribute name, or None if it declares none."""
    config = getattr(model, "config", None)
    base_plan = getattr(config, "base_model_tp_plan", None)
    if not base_plan:
        return None
    prefix = getattr(model, "base_model_prefix", "")
    prefix = f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""
    plan = {prefix + k: v for k, v in base_plan.items()}
    plan.update(getattr(type(model), "_tp_plan", None) or {})
    return plan


def _repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of ModuleLists / Sequentials whose items share a class: the transformer blocks."""
    blocks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 2:
            kinds = {type(c) for c in mod}
            if len(kinds) == 1 and any(isinstance(m, nn.Linear) for m in mod[0].modules()):
                blocks += [(f"{name}.{i}" if name else str(i), c) for i, c in enumerate(mod)]
    return blocks


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add)
    return node.op == "call_method" and node.target in ("add", "add_")


def _rowwise_by_dataflow(block: nn.Module) -> set[str] | None:
    """Linears whose output is added back into the block's input stream, found by tracing."""
    try:
        graph = torch.fx.symbolic_trace(block).graph
    except Exception:
        return None
    linears = {n for n in graph.nodes if n.op == "call_module" and isinstance(block.get_submodule(n.target), nn.Linear)}
    residual = {n for n in graph.nodes if n.op == "placeholder"}
    rowwise: set[str] = set()
    for node in graph.nodes:
        if not _is_add(node):
            continue
        args = node.all_input_nodes
        if not any(a in residual for a in args):
            continue
        residual.add(node)
        stack = [a for a in args if a not in residual]
        seen = set()
        while stack:  # walk back to the nearest Linears feeding the branch
            cur = stack.pop()
            if cur in seen or cur in residual:
                continue
            seen.add(cur)
            if cur in linears:
                rowwise.add(cur.target)
            else:
                stack.extend(cur.all_input_nodes)
    return rowwise


def _rowwise_by_order(block: nn.Module) -> set[str]:
    """Fallback for untraceable blocks: in each branch (direct child holding Linears), the last
    Linear registered is the one that writes back to the residual stream."""
    direct = [n for n, m in block.named_children() if isinstance(m, nn.Linear)]
    rowwise = {direct[-1]} if direct else set()
    for cname, child in block.named_children():
        names = [f"{cname}.{n}" for n, m in child.named_modules() if isinstance(m, nn.Linear) and n]
        if names:
            rowwise.add(names[-1])
    return rowwise


def infer_plan(model: nn.Module) -> dict[str, str]:
    """Plan for a model with no declared tp_plan: inside each repeated block, Linears whose
    output joins the residual stream are rowwise, the others colwise; the rest is replicated."""
    plan: dict[str, str] = {}
    for prefix, block in _repeated_blocks(model):
        rowwise = _rowwise_by_dataflow(block)
        if not rowwise:
            rowwise = _rowwise_by_order(block)
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                plan[f"{prefix}.{name}"] = "rowwise" if name in rowwise else "colwise"
    if not plan:
        raise ValueError(
            "parallelize: could not infer a plan (no repeated blocks containing nn.Linear found); "
            "pass plan={'module.name.glob': 'colwise' | 'rowwise' | 'vocab' | 'replicate'}"
        )
    return plan


def _resolve(model: nn.Module, plan: dict[str, str], strict: bool) -> dict[str, str]:
    names = [n for n, _ in model.named_modules() if n]
    styles: dict[str, str] = {}
    for pattern, value in plan.items():
        style = _style(value, pattern)
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if strict and not hits:
            sample = ", ".join(names[:6])
            raise ValueError(f"plan entry {pattern!r} matches no module of the model (names look like: {sample}, ...)")
        for n in hits:
            styles[n] = style
    return styles


def _split_tied_embeddings(model: nn.Module, styles: dict[str, str]) -> None:
    """An embedding the plan leaves whole but whose weight a vocabulary-split head shares (tied
    embeddings; transformers' plans split only the head) is split the same way, so the two stay
    one parameter: left whole, its copy would get none of the head's gradient in training."""
    heads = {id(m.weight) for n, m in model.named_modules()
             if styles.get(n) in ("colwise_gather", "vocab") and isinstance(m, nn.Linear)}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and name not in styles and id(mod.weight) in heads:
            styles[name] = "vocab"


def _head_dim(parent: nn.Module) -> int | None:
    hd = getattr(parent, "head_dim", None)
    return hd if isinstance(hd, int) and hd > 0 else None


def parallelize(model: nn.Module, plan: dict[str, str] | None = None, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard ``model`` in place over the TP group and return it.

    ``plan`` maps module-name globs to "colwise", "colwise_gather" (column-parallel with the
    output gathered, e.g. an LM head), "rowwise", "vocab" or "replicate"; transformers' style
    names are accepted too. Without a plan, a transformers model's declared tp_plan is used,
    else one is inferred. Linears inside a module with ``head_dim`` are split by whole heads,
    and that module's head-count attributes are set to this rank's counts.

    In training mode, random draws between a module's column-parallel layers and its
    row-parallel one (attention dropout, say) come from each rank's own stream, and all others
    from the stream every rank shares (``tpserve.parallel.rng``; seed both with
    ``tpserve.parallel.manual_seed``).
    """
    group = comm.get_group(group)
    tp = comm.group_size(group)
    strict = plan is not None
    if plan is None:
        plan = transformers_plan(model) or infer_plan(model)
    styles = _resolve(model, plan, strict)
    _split_tied_embeddings(model, styles)
    shared: dict[tuple[int, int, int], nn.Parameter] = {}
    head_parents: dict[str, nn.Module] = {}
    regions: dict[str, tuple[nn.Module, list[nn.Module], list[nn.Module]]] = {}  # sharded activations inside
    for name, style in styles.items():
        if style == "replicate":
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = getattr(parent, leaf)
        hd = _head_dim(parent)
        if style == "vocab":
            if isinstance(dense, nn.Embedding):
                new = VocabParallelEmbedding.from_dense(dense, group=group)
            elif isinstance(dense, nn.Linear):
                new = ParallelLMHead.from_dense(dense, group=group, gather_output=True)
            else:
                raise TypeError(f"plan says {name!r} is 'vocab', but it is a {type(dense).__name__}, not nn.Embedding or nn.Linear")
            rows = (new.vocab_start, new.vocab_end)
        elif not isinstance(dense, nn.Linear):
            if isinstance(dense, nn.Embedding) and style == "rowwise":  # transformers' name for a vocab split
                new = VocabParallelEmbedding.from_dense(dense, group=group)
                rows = (new.vocab_start, new.vocab_end)
            else:
                raise TypeError(f"plan says {name!r} is {style!r}, but it is a {type(dense).__name__}, not nn.Linear")
        elif style in ("colwise", "colwise_gather"):
            unit = hd if hd and dense.out_features % hd == 0 and style == "colwise" else 1
            if unit > 1:
                heads = dense.out_features // unit
                if heads % tp:
                    raise PartitionError(
                        f"parallelize: {name} has {heads} heads, which TP={tp} does not divide; use a TP degree that "
                        f"divides the head counts, or tpserve.models, which handles uneven heads"
                    )
                head_parents[parent_name] = parent
            new = ColumnParallelLinear.from_dense(dense, gather_output=style == "colwise_gather", unit=unit, group=group)
            rows = (new.out_start, new.out_end)
            if style == "colwise":
                regions.setdefault(parent_name, (parent, [], []))[1].append(new)
        else:
            unit = hd if hd and dense.in_features % hd == 0 else 1
            new = RowParallelLinear.from_dense(dense, input_is_parallel=True, unit=unit, group=group)
            rows = None
            regions.setdefault(parent_name, (parent, [], []))[2].append(new)
        if rows is not None:  # keep tied weights tied when both sides are cut the same way
            key = (id(dense.weight), *rows)
            if key in shared:
                new.weight = shared[key]
            else:
                shared[key] = new.weight
        setattr(parent, leaf, new)
    for parent, opens, closes in regions.values():  # dropout there draws from each rank's own stream
        if opens:
            rng.mark_regions(parent, opens, closes, group)
    for parent in head_parents.values():
        for attr in _HEAD_ATTRS:
            value = getattr(parent, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                if value % tp:
                    raise PartitionError(f"parallelize: {attr}={value} is not divisible by TP={tp}")
                setattr(parent, attr, value // tp)
    return model


DistributedModelWrapper = parallelize
