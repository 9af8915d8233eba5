"""``LLM`` as a library object: models without a tokenizer, constructors that clean up after
any failure, several engines in one process, and the incremental detokenizer."""

import atexit
import os
import shutil
import signal
import time

import pytest
import torch
import torch.distributed as dist

from tpserve import LLM, SamplingParams
from tpserve.engine.detokenizer import IncrementalDetokenizer
from tpserve.parallel import group_timeout

PROMPTS = [[5, 17, 33, 2, 91, 7, 64], [120, 3], [44, 9, 150, 11, 6]]
NEW = 8


def _children() -> list[int]:
    """Live worker processes of this process (not multiprocessing's resource tracker)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    worker = b"spawn_main" in f.read()
                if int(fields[1]) == os.getpid() and fields[0] != "Z" and worker:
                    kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A random transformers Llama saved with save_pretrained and no tokenizer files, with its
    logits and greedy tokens (argmax, one step at a time) as transformers computes them."""
    import transformers as tf

    path = tmp_path_factory.mktemp("bare") / "llama"
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                         initializer_range=0.1, eos_token_id=2, bos_token_id=1)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)  # eos must then come from config.json
    assert not any(p.name.startswith(("tokenizer", "vocab", "special")) for p in path.iterdir())
    logits, greedy = [], []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            logits.append(model(ids).logits[0])
            for _ in range(NEW):
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
            greedy.append(ids[0, len(p):].tolist())
    return path, logits, greedy


# ---- a model without a tokenizer ----------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_model_without_tokenizer_matches_transformers(bare, tp):
    path, ref_logits, ref_greedy = bare
    with LLM(model=path, tensor_parallel_size=tp) as llm:
        assert llm.tokenizer is None and llm.eos_ids == {2}
        logits = llm.logits(PROMPTS)
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW, ignore_eos=True))
    for got, ref in zip(logits, ref_logits):
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert [o.outputs[0].token_ids for o in outs] == ref_greedy
    assert all(o.outputs[0].text == "" and o.prompt is None for o in outs)


def test_without_tokenizer_text_needs_one_and_tokenizer_path_gives_one(bare, tmp_path):
    from transformers import AutoTokenizer

    path, _, ref_greedy = bare
    with LLM(model=path) as llm:
        with pytest.raises(ValueError, match=r"no tokenizer was found in the model directory .*tokenizer=PATH"):
            llm.generate("Hello")
        with pytest.raises(ValueError, match="needs a tokenizer"):
            llm.chat([{"role": "user", "content": "Hi"}])
        with pytest.raises(ValueError, match="stop strings need"):
            llm.generate([PROMPTS[0]], SamplingParams(stop=["x"]))
        # end-of-sequence comes from config.json: a greedy run stops at id 2 when it comes
        out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW))[0].outputs[0]
        ref = ref_greedy[0][:ref_greedy[0].index(2)] if 2 in ref_greedy[0] else ref_greedy[0]
        assert out.token_ids == ref

    # a tokenizer small enough for this model's 160 ids (one character a token), saved elsewhere
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(vocab={chr(0x100 + i): i for i in range(160)}, merges=[]))
    raw.decoder = decoders.Fuse()
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    with LLM(model=path, tokenizer=tok_dir) as llm:
        prompt = "".join(chr(0x100 + t) for t in PROMPTS[0])
        out = llm.generate(prompt, SamplingParams(max_tokens=NEW, ignore_eos=True))[0]
    assert out.prompt_token_ids == PROMPTS[0]
    assert out.outputs[0].token_ids == ref_greedy[0]
    assert out.outputs[0].text == tok.decode(ref_greedy[0], skip_special_tokens=True) != ""
    with pytest.raises(FileNotFoundError, match="tokenizer path"):
        LLM(model=path, tokenizer=tmp_path / "nowhere")


def test_skip_tokenizer_init_and_the_cli_tokenizer_flag(bare, tmp_path, capsys):
    from tpserve.checkpoint.default_model import default_model_path
    from tpserve.cli import main

    with LLM(skip_tokenizer_init=True) as llm:  # the default model, token ids only
        assert llm.tokenizer is None
        out = llm.generate([[1, 504, 3458]], SamplingParams(max_tokens=3))[0].outputs[0]
        assert len(out.token_ids) == 3 and out.text == ""
        with pytest.raises(ValueError, match="skip_tokenizer_init=True was given"):
            llm.generate("Hello")
    path, _, _ = bare
    assert main(["generate", "--model", str(path), "Hello"]) == 1
    assert "no tokenizer was found" in capsys.readouterr().err
    default_dir = default_model_path()
    assert main(["generate", "--model", str(default_dir), "--tokenizer", str(default_dir), "--max-tokens", "4",
                 "The capital of France is"]) == 0
    assert capsys.readouterr().out.strip()


# ---- constructors that clean up -----------------------------------------------------------

def _dying_worker(*args):
    """worker_main, except that this worker dies (exit code 7) while loading its shard."""
    import tpserve.models
    from tpserve.engine.worker import worker_main

    tpserve.models.load_model = lambda *a, **k: os._exit(7)
    worker_main(*args)


def _interrupted_load(*args, **kwargs):
    raise KeyboardInterrupt


def _broken_model(kind: str, src, tmp_path):
    """A copy of ``src`` broken in one way."""
    dst = tmp_path / kind
    shutil.copytree(src, dst)
    if kind == "truncated":
        weights = dst / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif kind == "bad-tokenizer":
        (dst / "tokenizer.json").write_text("{ this is not a tokenizer")
    return dst


class _Hooks:
    """Stands in for ``atexit`` inside the engine module: which exit hooks are still registered."""

    def __init__(self) -> None:
        self.live: list = []

    def register(self, fn):
        self.live.append(fn)
        return atexit.register(fn)

    def unregister(self, fn) -> None:
        self.live = [f for f in self.live if f != fn]
        atexit.unregister(fn)


def _assert_nothing_left(threads: int, hooks: _Hooks, workers_before: set[int]) -> None:
    assert not dist.is_initialized()
    assert torch.get_num_threads() == threads
    assert hooks.live == []
    deadline = time.monotonic() + 5
    while set(_children()) - workers_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(_children()) - workers_before == set()  # (other tests' process pools may be running)


STAGES = [(stage, tp) for stage in ("bad-path", "bad-tokenizer", "truncated", "worker-dies", "ctrl-c")
          for tp in (1, 2) if not (stage == "worker-dies" and tp == 1)]  # TP=1 has no worker


@pytest.mark.parametrize("stage,tp", STAGES)
def test_a_failed_llm_leaves_nothing_and_the_next_one_works(bare, tmp_path, monkeypatch, stage, tp):
    import tpserve.engine.llm as llm_module
    import tpserve.models

    path, _, ref_greedy = bare
    threads, hooks, before = torch.get_num_threads(), _Hooks(), set(_children())
    monkeypatch.setattr(llm_module, "atexit", hooks)
    model = {"bad-path": tmp_path / "missing"}.get(stage, path)
    if stage in ("truncated", "bad-tokenizer"):
        model = _broken_model(stage, path, tmp_path)
    expected = {"bad-path": FileNotFoundError, "bad-tokenizer": ValueError, "truncated": ValueError,
                "worker-dies": llm_module.WorkerError, "ctrl-c": KeyboardInterrupt}[stage]
    with monkeypatch.context() as m:
        if stage == "worker-dies":
            m.setattr(llm_module, "worker_main", _dying_worker)
        if stage == "ctrl-c":
            m.setattr(tpserve.models, "load_model", _interrupted_load)
        start = time.monotonic()
        with pytest.raises(expected) as err:
            LLM(model=model, tensor_parallel_size=tp)
    assert time.monotonic() - start < 60
    if stage == "worker-dies":
        assert "rank 1: pid" in str(err.value) and "exit code 7" in str(err.value)
    if stage == "truncated":
        assert "model.safetensors" in str(err.value)
    _assert_nothing_left(threads, hooks, before)
    with LLM(model=path, tensor_parallel_size=tp) as llm:
        out = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in out] == ref_greedy
    _assert_nothing_left(threads, hooks, before)


# ---- several engines in one process -------------------------------------------------------

def test_two_engines_of_different_degrees_side_by_side(bare, monkeypatch):
    import tpserve.engine.llm as llm_module

    path, _, ref_greedy = bare
    threads, hooks, before = torch.get_num_threads(), _Hooks(), set(_children())
    monkeypatch.setattr(llm_module, "atexit", hooks)
    one = LLM(model=path, tensor_parallel_size=1, comm_timeout=11)
    two = LLM(model=path, tensor_parallel_size=2, comm_timeout=22)
    try:
        assert not dist.is_initialized()  # neither took torch's default group
        assert group_timeout(one.group) == 11 and group_timeout(two.group) == 22
        assert torch.get_num_threads() == threads  # rank 0's share of the cores is set only during calls
        params = SamplingParams(max_tokens=NEW, ignore_eos=True)
        for _ in range(2):
            for llm in (one, two, one):
                assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == ref_greedy
        assert torch.get_num_threads() == threads
        two.close()
        assert [o.outputs[0].token_ids for o in one.generate(PROMPTS, params)] == ref_greedy
        three = LLM(model=path, tensor_parallel_size=3)  # and a new one beside it
        assert [o.outputs[0].token_ids for o in three.generate(PROMPTS, params)] == ref_greedy
        three.close()
        assert [o.outputs[0].token_ids for o in one.generate(PROMPTS, params)] == ref_greedy
    finally:
        one.close()
        two.close()
    _assert_nothing_left(threads, hooks, before)


def test_a_killed_worker_of_one_engine_leaves_the_other_running(bare):
    path, _, ref_greedy = bare
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    with LLM(model=path, tensor_parallel_size=2) as survivor:
        victim = LLM(model=path, tensor_parallel_size=2)
        os.kill(victim._workers[0].pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="killed by signal 9"):
            victim.generate(PROMPTS, params)
        assert [o.outputs[0].token_ids for o in survivor.generate(PROMPTS, params)] == ref_greedy


# ---- the incremental detokenizer ----------------------------------------------------------

def test_incremental_detokenizer_equals_a_full_decode():
    import random

    from transformers import AutoTokenizer

    from tpserve.checkpoint.default_model import default_model_path

    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    text = "Grüße aus Köln 🎉🐍 — 東京は晴れ。  Ünïcødé\n\ttabs <|im_end|> done"
    cases = [tok(text)["input_ids"]] + [[random.Random(s).randrange(len(tok)) for _ in range(200)] for s in range(8)]
    for ids in cases:
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.add(t) for t in ids]
        assert "".join(pieces) == detok.text
        assert detok.text + detok.tail == tok.decode(ids, skip_special_tokens=True)
        assert all("\ufffd" not in p[-1:] for p in pieces)  # no piece ends inside a character
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    detok = IncrementalDetokenizer(Counting())
    for t in tok(text * 20)["input_ids"]:
        detok.add(t)
    assert max(calls) < 20  # short windows, not the whole completion


def test_an_error_in_rank_0s_own_step_is_named_as_such(monkeypatch):
    """At TP=1 there is no worker to blame: the error says rank 0 raised, and what."""
    import tpserve.engine.llm as llm_module
    from tpserve.engine.llm import WorkerError

    real = llm_module.execute

    def broken(model, cmd, state):
        if cmd[0] == "step":
            raise RuntimeError("a kernel refused its input")
        return real(model, cmd, state)

    with LLM() as llm:
        monkeypatch.setattr(llm_module, "execute", broken)
        with pytest.raises(WorkerError, match=r"rank 0 \(this process\) raised RuntimeError: a kernel refused"):
            llm.generate(["hi"], SamplingParams(max_tokens=2))
