"""The paged engine: block manager, scheduler, the decode kernel, and its outputs against the
outputs recorded from the loops it replaced (tests/data/engine_reference.json)."""

import json
from pathlib import Path

import pytest
import torch
from reference_model import PROMPTS, SAMPLING, save_reference_model

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.sampling import SamplingParams
from tpserve.engine.scheduler import Scheduler
from tpserve.engine.sequence import Sequence

REFERENCE = json.loads((Path(__file__).parent / "data" / "engine_reference.json").read_text())


def _seq(ids: list[int], max_tokens: int = 4, sid: int = 0) -> Sequence:
    return Sequence(sid, list(ids), SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens)


def _computed(blocks: BlockManager, seq: Sequence) -> None:
    seq.num_computed = seq.num_tokens
    blocks.commit(seq)


# ---- block manager ------------------------------------------------------------------------

def test_blocks_are_allocated_reused_by_prefix_and_given_back():
    bm = BlockManager(8, 4)
    a = _seq(list(range(10)))
    bm.allocate(a)
    assert len(a.block_table) == 3 and a.num_computed == 0 and bm.num_free == 5
    _computed(bm, a)
    b = _seq(list(range(8)) + [50, 51, 52])
    assert bm.can_allocate(b.token_ids_all)
    bm.allocate(b)  # the first two blocks are a's
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed == 8
    assert bm.blocks[a.block_table[0]].refs == 2
    bm.free_seq(a)
    assert bm.blocks[b.block_table[0]].refs == 1
    bm.free_seq(b)
    assert bm.num_free == 8
    c = _seq(list(range(8)) + [99])  # after both finished, the prefix is still there
    bm.allocate(c)
    assert c.num_computed == 8 and bm.hits == 16


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(8, 4)
    a = _seq(list(range(8)))
    bm.allocate(a)
    _computed(bm, a)
    bm.free_seq(a)
    again = _seq(list(range(8)))
    bm.allocate(again)  # both blocks are cached, but the last token's logits are needed
    assert again.num_computed == 4


def test_a_hit_is_checked_against_the_token_ids():
    bm = BlockManager(8, 4)
    a = _seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    _computed(bm, a)
    key = bm.blocks[a.block_table[0]].key
    bm.blocks[a.block_table[0]].token_ids = [9, 9, 9, 9]  # as if another prefix had the same key
    b = _seq([1, 2, 3, 4, 6])
    bm.allocate(b)
    assert b.num_computed == 0 and bm.by_key[key] == a.block_table[0]


def test_eviction_takes_the_least_recently_freed_and_forgets_its_prefix():
    bm = BlockManager(4, 2)
    a = _seq([1, 2, 3, 4, 5])  # 3 blocks, 2 full
    bm.allocate(a)
    _computed(bm, a)
    bm.free_seq(a)
    assert len(bm.by_key) == 2
    b = _seq([7, 8, 9, 10, 11, 12, 13])  # needs all 4 blocks: the cached ones are evicted
    assert bm.can_allocate(b.token_ids_all)
    bm.allocate(b)
    assert bm.num_free == 0 and not bm.by_key
    bm.free_seq(b)
    assert _seq([1, 2, 3, 4, 5]).num_computed == 0
    again = _seq([1, 2, 3, 4, 5])
    bm.allocate(again)
    assert again.num_computed == 0


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, 4, prefix_caching=False)
    a = _seq(list(range(9)))
    bm.allocate(a)
    _computed(bm, a)
    bm.free_seq(a)
    b = _seq(list(range(9)))
    bm.allocate(b)
    assert b.num_computed == 0 and not bm.by_key


# ---- scheduler --------------------------------------------------------------------------

def _turn(sched: Scheduler, budget: int, token: int = 7) -> list[tuple[Sequence, int]]:
    """One step without a model: schedule, mark computed, give each completed sequence a token."""
    plan = sched.schedule(budget)
    sched.computed(plan)
    for seq, n in plan:
        if seq.num_computed == seq.num_tokens:
            seq.accept(token)
            if seq.finished:
                sched.finish(seq)
    return plan


def test_long_prompts_are_chunked_while_decodes_go_on():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8)
    short = _seq([1, 2, 3], max_tokens=20, sid=1)
    sched.add(short)
    _turn(sched, 32)
    long = _seq(list(range(100)), max_tokens=2, sid=2)
    sched.add(long)
    chunks = []
    while long.num_computed < long.num_tokens - 1 or not long.token_ids:
        plan = _turn(sched, 32)
        assert plan[0] == (short, 1)  # the running stream decodes in every step
        chunks += [n for s, n in plan if s is long]
    assert chunks == [32, 32, 32, 4]


def test_several_prompts_prefill_in_one_step():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8)
    seqs = [_seq([i] * 5, sid=i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    plan = _turn(sched, 64)
    assert [(s.seq_id, n) for s, n in plan] == [(0, 5), (1, 5), (2, 5)]
    assert [n for _, n in _turn(sched, 64)] == [1, 1, 1]


def test_out_of_blocks_preempts_the_newest_and_recomputes_it():
    sched = Scheduler(BlockManager(6, 2), max_num_seqs=4)
    first, second = _seq([1, 2, 3], max_tokens=6, sid=1), _seq([4, 5, 6], max_tokens=6, sid=2)
    sched.add(first)
    sched.add(second)
    for _ in range(40):
        if not len(sched):
            break
        _turn(sched, 64)
    assert first.finished and second.finished
    assert len(first.token_ids) == len(second.token_ids) == 6
    assert sched.preemptions >= 1 and second.preempted >= 1 and first.preempted == 0
    assert sched.blocks.num_free == 6


def test_max_num_seqs_bounds_the_running_set():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2)
    for i in range(5):
        sched.add(_seq([i, i], sid=i))
    plan = sched.schedule(64)
    assert len(plan) == 2 and len(sched.waiting) == 3


# ---- the decode kernel ------------------------------------------------------------------

@pytest.fixture(params=["native", "plain"])
def attention(request):
    """``tpserve.models.attention`` with its paged decode kernel built (else the test skips), as
    this CPU runs it and with the plain loops that CPUs without AVX-512 run."""
    from tpserve.models import attention

    if attention.extension() is None:
        pytest.skip("the paged decode kernel could not be built here")
    attention.extension().use_plain_loops(request.param == "plain")
    yield attention
    attention.extension().use_plain_loops(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5])
def test_decode_kernel_equals_gathering_and_sdpa(attention, dtype, window):
    torch.manual_seed(0)
    blocks, bs, kv_heads, dim = 12, 4, 2, 16
    k = torch.randn(blocks, bs, kv_heads, dim).to(dtype)
    v = torch.randn(blocks, bs, kv_heads, dim).to(dtype)
    tables = torch.tensor([[3, 7, 1, 0], [3, 7, 9, 2], [5, 0, 0, 0]])  # rows 0 and 1 share two blocks
    lens = torch.tensor([11, 16, 1])
    for kv_of_q, uniform in (([0, 0, 1, 1], True), ([0, 0, 0, 1, 1], False)):
        index = torch.tensor(kv_of_q)
        q = torch.randn(3, len(kv_of_q), dim).to(dtype)
        got = attention._paged_decode_op(q, k, v, tables, lens, index, dim ** -0.5, window)
        want = attention.decode_gathered(q, k, v, tables, lens, index, uniform, window)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [0, 300])
def test_decode_kernel_splits_long_rows_into_parts(attention, window):
    """Rows longer than the kernel's part of 256 keys, beside short ones: the parts' softmaxes
    merge into the whole row's."""
    torch.manual_seed(3)
    bs, kv_heads, dim = 16, 3, 64
    k = torch.randn(80, bs, kv_heads, dim) * 2  # spread scores: the parts' maxima differ
    v = torch.randn(80, bs, kv_heads, dim)
    order = torch.randperm(80)
    tables = torch.stack([order[:60], order[20:80], order[5:65]])
    lens = torch.tensor([957, 3, 257])  # 4 parts, 1, 2 (one key in the last)
    index = torch.arange(9) // 3
    q = torch.randn(3, 9, dim)
    got = attention._paged_decode_op(q, k, v, tables, lens, index, dim ** -0.5, window)
    want = attention.decode_gathered(q, k, v, tables, lens, index, True, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _rows_as_alone_and_as_sdpa(attention, q, k, v, tables, lens, index, window) -> None:
    """The kernel's rows, read in groups where their tables allow: each bit for bit what it is
    alone, and all of them what gathering and SDPA give."""
    scale = q.shape[-1] ** -0.5
    got = attention._paged_decode_op(q, k, v, tables, lens, index, scale, window)
    for r in range(len(lens)):
        alone = attention._paged_decode_op(q[r:r + 1], k, v, tables[r:r + 1], lens[r:r + 1], index, scale, window)
        assert torch.equal(got[r:r + 1], alone), r
    want = attention.decode_gathered(q, k, v, tables, lens, index, True, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 300])
def test_decode_kernel_takes_a_chunks_rows_together(attention, window):
    """A prompt chunk's rows (one table, one more key each) read each part of their keys once,
    together, more than a group's worth of them included: each row's result is bit for bit what
    it is alone, and what gathering and SDPA give."""
    torch.manual_seed(4)
    bs, kv_heads, dim = 16, 3, 64
    k = torch.randn(80, bs, kv_heads, dim) * 2
    v = torch.randn(80, bs, kv_heads, dim)
    order = torch.randperm(80)
    chunk = 20  # rows: more than the kernel's 16 a group
    tables = torch.stack([order[20:80]] + [order[:60]] * chunk + [order[5:65]])
    lens = torch.tensor([300] + list(range(500, 500 + chunk)) + [257])  # the chunk's keys cross a part's end
    index = torch.arange(9) // 3
    q = torch.randn(len(lens), 9, dim)
    _rows_as_alone_and_as_sdpa(attention, q, k, v, tables, lens, index, window)


@pytest.mark.parametrize("window", [0, 300])
def test_decode_kernel_shares_a_cached_prefix_between_rows(attention, window):
    """Streams that share a system prompt's blocks (more of them than a group holds), each with
    blocks of its own after it, and one unrelated row: each row's result is bit for bit what it
    is alone, and what gathering and SDPA give."""
    torch.manual_seed(5)
    bs, kv_heads, dim = 16, 3, 64
    k = torch.randn(120, bs, kv_heads, dim) * 2
    v = torch.randn(120, bs, kv_heads, dim)
    order = torch.randperm(120)
    shared, streams = order[:36].tolist(), 20  # 576 keys: two whole parts of 256 and part of a third
    own = order[36:].tolist()
    tables = [shared + own[2 * i:2 * i + 2] for i in range(streams)] + [own[50:88]]
    lens = [576 + 3 + i % 20 for i in range(streams)] + [600]
    width = max(len(t) for t in tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    lens = torch.tensor(lens)
    index = torch.arange(9) // 3
    q = torch.randn(len(lens), 9, dim)
    _rows_as_alone_and_as_sdpa(attention, q, k, v, tables, lens, index, window)


@pytest.mark.parametrize("window", [0, 5])
def test_short_prompt_chunks_attend_through_the_kernel_as_sdpa_does(attention, window, monkeypatch):
    """A decode row, then two short chunks over cached prefixes (kernel rows), then a long one (SDPA)."""
    torch.manual_seed(1)
    bs, kv_heads, dim, heads = 4, 3, 16, 9
    k = torch.randn(20, bs, kv_heads, dim)
    v = torch.randn(20, bs, kv_heads, dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    long = attention.KERNEL_CHUNK + 1
    keys = long + 3  # over 3 cached ones
    positions = [6] + [9, 10] + [3] + list(range(keys - long, keys))
    chunks = [(2, 11, [4, 8, 2]), (1, 4, [5]), (long, keys, [9, 1, 3, 6, 12, 14, 15, 16, 17, 18, 19][:-(-keys // bs)])]

    def run():
        step = attention.make_step(inv_freq, 1.0, torch.float32, positions, slots=list(range(len(positions))),
                                   tables=[[7, 11]], chunks=chunks, window=window)
        q = torch.randn(len(positions), heads, dim, generator=torch.Generator().manual_seed(2))
        return step, attention.attend(q, None, None, step, (k, v), torch.arange(heads) // 3, True)

    step, got = run()
    assert step.num_decode == 4 and len(step.chunks) == 1  # the two short chunks became kernel rows
    monkeypatch.setattr(attention, "KERNEL_CHUNK", 0)
    step, want = run()
    assert step.num_decode == 1 and len(step.chunks) == 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)



def test_a_chunk_without_a_block_table_reads_its_keys_back_from_the_cache(attention):
    """A step built without block tables (a script's own prefill), whose rope already wrote K/V
    into the cache (``fused.rope_store``: attend gets k and v None): the chunk reads them back at
    its slots, and attends as it would to k and v handed over directly."""
    torch.manual_seed(3)
    bs, kv_heads, dim, heads, length = 4, 3, 16, 9, 7
    k_cache, v_cache = torch.randn(6, bs, kv_heads, dim), torch.randn(6, bs, kv_heads, dim)
    slots = [21, 22, 23, 8, 9, 10, 11]  # blocks 5 and 2, out of order: only the slots say where
    k, v = torch.randn(length, kv_heads, dim), torch.randn(length, kv_heads, dim)
    k_cache.view(-1, kv_heads, dim)[slots] = k
    v_cache.view(-1, kv_heads, dim)[slots] = v
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    step = attention.make_step(inv_freq, 1.0, torch.float32, list(range(length)), slots=slots,
                               chunks=[(length, length, None)])
    q, index = torch.randn(length, heads, dim), torch.arange(heads) // 3
    got = attention.attend(q, None, None, step, (k_cache, v_cache), index, True)
    want = attention.attend(q, k, v, attention.make_step(inv_freq, 1.0, torch.float32, list(range(length)),
                                                         chunks=[(length, length, None)]), None, index, True)
    torch.testing.assert_close(got, want)


# ---- the engine against the loops it replaced -----------------------------------------------

@pytest.fixture(scope="module")
def reference_model(tmp_path_factory):
    return save_reference_model(tmp_path_factory.mktemp("ref") / "model")


def run_reference(path: str, options: dict) -> dict:
    import os

    from tpserve.engine import llm_engine
    from tpserve.engine.spmd import generate
    from tpserve.models import load_model

    kernel = os.environ.get("TPSERVE_PAGED_KERNEL")
    if options.pop("gather", False):
        os.environ["TPSERVE_PAGED_KERNEL"] = "0"
    budget, preempt = llm_engine.MAX_PREFILL, Scheduler._preempt
    llm_engine.MAX_PREFILL = options.pop("max_prefill", budget)
    preempted = []
    Scheduler._preempt = lambda self, seq: (preempted.append(seq.seq_id), preempt(self, seq))
    try:
        model = load_model(path, dtype="float32", device="cpu", progress=False)
        out = {name: generate(model, PROMPTS, SamplingParams(**kw), **options) for name, kw in SAMPLING.items()}
        return {**out, "preempted": len(preempted)}
    finally:
        llm_engine.MAX_PREFILL, Scheduler._preempt = budget, preempt
        if kernel is None:
            os.environ.pop("TPSERVE_PAGED_KERNEL", None)
        else:
            os.environ["TPSERVE_PAGED_KERNEL"] = kernel


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_engine_matches_the_recorded_outputs(tp_run, reference_model, tp):
    results = tp_run(tp, run_reference, reference_model, {})
    for name in SAMPLING:
        assert all(r[name] == results[0][name] for r in results)
        assert results[0][name] == REFERENCE["static"]["1"][name], f"TP={tp} {name}"


@pytest.mark.parametrize("options", [
    # 10 blocks of 16 tokens (2 layers x K,V x 2 KV heads x 8 dims x fp32 = 4 KiB each) for 20 blocks' worth
    {"kv_cache_memory": 10 * 4096},
    {"prefix_caching": False},
    {"max_prefill": 8, "block_size": 4},  # every prompt in chunks of 8, and small blocks
    {"gather": True},  # the stock-torch decode path
], ids=["preempting", "no-prefix-caching", "chunked", "gathering"])
def test_engine_outputs_do_not_depend_on_how_it_schedules(tp_run, reference_model, options):
    results = tp_run(2, run_reference, reference_model, dict(options))
    if "kv_cache_memory" in options:
        assert results[0]["preempted"] > 0
    for name in SAMPLING:
        assert results[0][name] == REFERENCE["static"]["1"][name], f"{options} {name}"


def test_a_request_that_can_never_fit_is_refused_clearly(reference_model):
    from tpserve import LLM

    block = 2 * 2 * 3 * 8 * 16 * 4  # 2 layers x K,V x 3 KV heads x 8 dims x 16 tokens x fp32
    with LLM(reference_model, kv_cache_memory=4 * block) as llm:
        assert llm.kv_cache_blocks == 4
        with pytest.raises(ValueError, match=r"needs 94 tokens of KV cache, more than the 64 .*kv_cache_memory"):
            llm.generate([PROMPTS[4]], SamplingParams(max_tokens=24))
        fits = llm.generate([PROMPTS[0]] * 3, SamplingParams(max_tokens=24, ignore_eos=True))  # 3 x 31 > 64: preempts
        assert [o.outputs[0].token_ids for o in fits] == [REFERENCE["static"]["1"]["greedy"][0]] * 3
