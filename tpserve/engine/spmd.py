"""The engine loop over a model whose ranks all call in (tests, benchmarks, scripts that built
their own group): rank 0 schedules and samples, and every rank runs its commands."""

from __future__ import annotations

from torch import nn

from tpserve.parallel import broadcast_object, group_rank

from .llm_engine import LLMEngine
from .runner import BLOCK_SIZE, max_blocks
from .sampling import SamplingParams
from .worker import execute


def generate(model: nn.Module, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *, kv_cache_memory: int | None = None,
             max_num_seqs: int = 256, prefix_caching: bool = True, block_size: int = BLOCK_SIZE,
             eos_ids: set[int] = frozenset()) -> list[list[int]]:
    """Generated token ids for each prompt, on every rank; every rank of ``model.group`` must call it."""
    state: dict = {}
    rank0 = group_rank(model.group) == 0

    def run(cmd: tuple | None):
        cmd = broadcast_object(cmd, 0, model.group)
        return None if cmd is None else execute(model, cmd, state)

    context = model.spec.max_position_embeddings
    blocks = execute(model, ("kv_init", kv_cache_memory, block_size, 0, max_blocks(max_num_seqs, context, block_size)),
                     state)
    if not rank0:
        while (cmd := broadcast_object(None, 0, model.group)) is not None:
            execute(model, cmd, state)
        return broadcast_object(None, 0, model.group)
    engine = LLMEngine(run, blocks, block_size, max_num_seqs, prefix_caching, None, eos_ids)
    params = params if isinstance(params, list) else [params] * len(prompts)
    seqs = [engine.add(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished():
        engine.step()
    run(None)
    return broadcast_object([s.token_ids for s in seqs], 0, model.group)
