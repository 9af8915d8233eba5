"""Sampling in vLLM's shape through the paged engine: log-probabilities (generated and prompt,
found across vocabulary shards), n completions sharing a prompt, penalties, min_p, stop tokens."""

import pytest
import torch
from reference_model import PROMPTS, save_reference_model

from tpserve import LLM, SamplingParams
from tpserve.engine.sampling import penalise


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_reference_model(tmp_path_factory.mktemp("sampling") / "model")


@pytest.fixture(scope="module", params=[1, 3])
def llm(request, model_dir):
    with LLM(model_dir, tensor_parallel_size=request.param) as engine:
        yield engine


def test_logprobs_equal_log_softmax_of_the_logits(llm):
    prompt = PROMPTS[4]
    out = llm.generate([prompt], SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True))[0]
    generated = out.outputs[0].token_ids
    lsm = torch.log_softmax(llm.logits([prompt + generated])[0], dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry, row = out.prompt_logprobs[i], lsm[i - 1]
        assert abs(entry[prompt[i]].logprob - float(row[prompt[i]])) < 1e-5
        assert entry[prompt[i]].rank == int((row > row[prompt[i]]).sum()) + 1
        top = {t for t, lp in entry.items() if lp.rank <= 2}
        assert set(row.topk(2).indices.tolist()) <= top | {prompt[i]}
    assert len(out.outputs[0].logprobs) == 4
    for j, (tok, entry) in enumerate(zip(generated, out.outputs[0].logprobs)):
        row = lsm[len(prompt) - 1 + j]
        assert int(row.argmax()) == tok  # greedy
        assert abs(entry[tok].logprob - float(row[tok])) < 1e-5 and entry[tok].rank == 1
        assert set(row.topk(3).indices.tolist()) == set(entry)


def test_n_completions_share_the_prompt_and_the_first_is_the_seeded_one(llm):
    hits = llm.engine.blocks.hits
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    three = llm.generate([PROMPTS[2]], SamplingParams(**{**params.__dict__, "n": 3}))[0]
    assert [o.index for o in three.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in three.outputs}) == 3
    assert llm.engine.blocks.hits - hits >= 2 * 32  # the other two reused the prompt's two full blocks
    one = llm.generate([PROMPTS[2]], params)[0]
    assert one.outputs[0].token_ids == three.outputs[0].token_ids


def test_penalties_min_p_and_stop_tokens(llm):
    prompt = PROMPTS[0]
    last = llm.logits([prompt])[0][-1]
    params = SamplingParams(max_tokens=1, repetition_penalty=1.7, presence_penalty=0.5)
    want = int(penalise(last, params, prompt, []).argmax())
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == [want]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    only_best = SamplingParams(max_tokens=8, temperature=1.0, min_p=1.0, seed=5, ignore_eos=True)
    assert llm.generate([prompt], only_best)[0].outputs[0].token_ids == greedy
    stopped = llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=[greedy[3]]))[0]
    assert stopped.outputs[0].token_ids == greedy[:greedy.index(greedy[3])]
    assert stopped.outputs[0].finish_reason == "stop"


def test_bad_sampling_values_are_clear_errors(llm):
    for kwargs, words in [({"n": 0}, "n must be"), ({"min_p": 2.0}, "min_p"), ({"logprobs": -1}, "logprobs"),
                          ({"repetition_penalty": 0}, "repetition_penalty"), ({"stop_token_ids": [-3]}, "stop_token_ids")]:
        with pytest.raises(ValueError, match=words):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="more than 20"):
        llm.generate([PROMPTS[0]], SamplingParams(logprobs=21))


def test_a_shared_prefix_is_computed_once_and_reused_after_its_request_ended(llm):
    shared_a, shared_b = PROMPTS[2], PROMPTS[3]  # 40 tokens in common: two full blocks of 16
    first = llm.generate([shared_a], SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids
    hits = llm.engine.blocks.hits
    llm.generate([shared_b], SamplingParams(max_tokens=4, ignore_eos=True))
    assert llm.engine.blocks.hits - hits == 32
    again = llm.generate([shared_a], SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids
    assert again == first  # from cached blocks, the same tokens


def test_prompt_chunks_are_sized_by_measured_step_times():
    from tpserve.engine.llm_engine import FIRST_CHUNK, ITL_SLACK, MAX_PREFILL, MIN_CHUNK, StepTimer

    timer = StepTimer(block_size=16)
    assert timer.budget(decoding=False) == MAX_PREFILL  # nobody is waiting for a token
    assert timer.budget(decoding=True) == FIRST_CHUNK  # nothing measured yet
    timer.record(decode_rows=16, prompt_tokens=0, seconds=0.050)
    timer.record(decode_rows=16, prompt_tokens=100, seconds=0.150)  # 1 ms per prompt token
    assert timer.budget(decoding=True) == int(ITL_SLACK * 0.050 / 0.001) > 16
    # late in a long prompt each token attends to more keys: a dearer token counts at once ...
    timer.record(decode_rows=16, prompt_tokens=5, seconds=0.075)  # 5 ms per prompt token
    assert timer.token_s == pytest.approx(0.005)
    assert timer.budget(decoding=True, long=True) == int(ITL_SLACK * timer.decode_s / timer.token_s) > MIN_CHUNK
    assert timer.budget(decoding=True) == 16  # short prompts still start a block at a time
    timer.record(decode_rows=16, prompt_tokens=1, seconds=0.150)  # 100 ms: the floor, never less
    assert timer.budget(decoding=True, long=True) == MIN_CHUNK
    timer.record(decode_rows=16, prompt_tokens=10, seconds=0.070)  # ... a cheaper one slowly
    assert 0.010 < timer.token_s < 0.100
    timer.record(decode_rows=16, prompt_tokens=0, seconds=30.0)  # a compile: the estimate moves, but not to 30 s
    assert timer.decode_s < 0.2


def test_only_a_long_prompt_in_mid_prefill_takes_chunks_below_a_block():
    """The engine's side of the rule above: which prompts count as long, and when."""
    from tpserve.engine.llm_engine import LONG_PROMPT, MIN_CHUNK, LLMEngine

    chunk_sizes: list[list[int]] = []

    def run(cmd):  # a model that answers token 7 to everything, and records each step's prompt chunks
        batch = cmd[1]
        chunk_sizes.append([n for n, _, _ in batch["chunks"]])
        return torch.full((len(batch["logit_rows"]),), 7), None

    engine = LLMEngine(run, num_blocks=256, block_size=16, max_num_seqs=8, prefix_caching=False)
    engine.timer.record = lambda *args: None  # times fixed so that any chunk costs more than the slack:
    engine.timer.decode_s = engine.timer.token_s = 0.01  # every budget is its floor
    greedy = SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0)
    engine.add([1, 2, 3], greedy)
    engine.step()  # its prompt: from now on a stream is decoding

    def prefill(prompt_len: int, keep: bool = False) -> list[int]:
        chunk_sizes.clear()
        seq = engine.add(list(range(10, 10 + prompt_len)), greedy)
        while seq.num_computed < prompt_len:
            engine.step()
        if not keep:
            engine.abort(seq)
        return [sizes[0] for sizes in chunk_sizes]

    short = prefill(LONG_PROMPT - 1)
    assert short[:-1] == [16] * (len(short) - 1)  # a block a step, and the rest
    long = prefill(LONG_PROMPT + 36, keep=True)
    # from its first chunk (taken from the waiting queue) to its last, the floor for long prompts
    assert set(long[:-1]) == {MIN_CHUNK} and sum(long) == LONG_PROMPT + 36
    engine.step()  # the long one decodes now: a short prompt goes a block a step again
    assert prefill(LONG_PROMPT - 1) == short


def test_a_long_prompt_the_cache_mostly_holds_takes_a_block_a_step():
    """A chat request after a shared system prompt has a few tokens to compute: it starts a block
    at a time (time to first token), where an uncached prompt as long is cut to the floor."""
    from tpserve.engine.llm_engine import LONG_PROMPT, MIN_CHUNK, LLMEngine

    chunk_sizes: list[list[int]] = []

    def run(cmd):
        chunk_sizes.append([n for n, _, _ in cmd[1]["chunks"]])
        return torch.full((len(cmd[1]["logit_rows"]),), 7), None

    engine = LLMEngine(run, num_blocks=256, block_size=16, max_num_seqs=8, prefix_caching=True)
    engine.timer.record = lambda *args: None
    engine.timer.decode_s = engine.timer.token_s = 0.01  # every budget is its floor
    greedy = SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0)
    engine.add([1, 2, 3], greedy)
    engine.step()  # a stream is decoding
    system = list(range(10, 10 + LONG_PROMPT + 32))  # whole blocks, so all of it can be cached

    def prefill(ids: list[int]) -> list[int]:
        chunk_sizes.clear()
        seq = engine.add(ids, greedy)
        while seq.num_computed < len(ids):
            engine.step()
        engine.abort(seq)  # its blocks stay cached
        return [sizes[0] if sizes else 1 for sizes in chunk_sizes]  # a last token alone goes as a decode row

    assert set(prefill(system + [5000])[:-1]) == {MIN_CHUNK}  # nothing cached: all of it to compute
    assert prefill(system + list(range(6000, 6040))) == [16, 16, 8]  # 40 to compute: a block a step
