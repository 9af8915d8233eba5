"""Training through the parallel layers at TP = 2, 3: optimizer steps with clipping equal the
dense twin's, randomness in parallel regions, save -> resume, and what training saves serves."""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 96
MAX_NORM = 0.3  # below the norms these models reach, so clipping scales every step
STEPS = 6
REPO = Path(__file__).resolve().parent.parent


def hf_config(kv: int = 6, tied: bool = False, dropout: float = 0.0, vocab: int = VOCAB):
    import transformers as tf

    return tf.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=kv, max_position_embeddings=64,
                          tie_word_embeddings=tied, attention_dropout=dropout, initializer_range=0.1)


def hf_model(seed: int = 0, **kw):
    import transformers as tf

    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(hf_config(**kw))


def batch(step: int, micro: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


def hf_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def native_loss(model, ids):
    """The same loss through tpserve's own model, which takes tokens flattened to [N]."""
    b, t = ids.shape
    step = model.make_step(list(range(t)) * b, chunks=[(t, t, None)] * b)
    logits = model(ids.reshape(-1), step).view(b, t, -1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def dense_clip(model):
    return torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)


def tp_clip(model):
    from tpserve.parallel import clip_grad_norm_

    return clip_grad_norm_(model, MAX_NORM, check_replicated=True)


def train(model, opt, clip, loss_of=hf_loss, steps=STEPS, start=0, micro=1, autocast=False):
    """Per-step losses and pre-clipping gradient norms."""
    losses, norms = [], []
    for s in range(start, start + steps):
        opt.zero_grad()
        total = 0.0
        for m in range(micro):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_of(model, batch(s, m)) / micro
            loss.backward()
            total += loss.item()
        norms.append(float(clip(model)))
        opt.step()
        losses.append(total)
    return losses, norms


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def assert_runs_match(got, want, rtol, what):
    for name, g, w in zip(("losses", "norms"), got, want):
        assert torch.allclose(torch.tensor(g), torch.tensor(w), rtol=rtol, atol=0), f"{what} {name}: {g} != dense {w}"


# ------------------------------------------------------------------ the dense twin's run, on every rank


def check_optimizers_match_dense(tied: bool) -> dict:
    from tpserve.parallel import parallelize

    out = {}
    for make in (adamw, sgd):
        dense = hf_model(tied=tied)
        twin = copy.deepcopy(dense)
        want = train(dense, make(dense), dense_clip)
        parallelize(twin)
        got = train(twin, make(twin), tp_clip)
        assert_runs_match(got, want, 1e-5, f"{make.__name__} tied={tied}")
        assert min(want[1]) > MAX_NORM, "clipping never scaled: the test would not see a wrong norm"
        out[make.__name__] = got
    # torch's own clip sees one rank's shards: the norm the issue reported wrong
    model = parallelize(hf_model(tied=tied))
    hf_loss(model, batch(0)).backward()
    local = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    out["torch_local_norm"], out["dense_norm"] = local, out["adamw"][1][0]
    return out


@pytest.mark.parametrize("tp,tied", [(2, True), (3, False)])
def test_adamw_and_sgd_with_clipping_equal_the_dense_model(tp_run, tp, tied):
    results = tp_run(tp, check_optimizers_match_dense, tied)
    assert all(r["adamw"] == results[0]["adamw"] for r in results), "ranks disagree on losses or norms"
    assert abs(results[0]["torch_local_norm"] - results[0]["dense_norm"]) > 1e-3  # what tpserve's clip corrects


def check_accumulation_and_autocast() -> str:
    from tpserve.parallel import parallelize

    dense = hf_model()
    twin = parallelize(copy.deepcopy(dense))
    dense_acc, twin_acc = copy.deepcopy(dense), copy.deepcopy(twin)
    want = train(dense, adamw(dense), dense_clip, micro=2, steps=3)
    got = train(twin, adamw(twin), tp_clip, micro=2, steps=3)
    assert_runs_match(got, want, 1e-5, "accumulated micro-batches, float32")
    want = train(dense_acc, adamw(dense_acc), dense_clip, micro=2, steps=3, autocast=True)
    got = train(twin_acc, adamw(twin_acc), tp_clip, micro=2, steps=3, autocast=True)
    assert_runs_match(got, want, 3e-2, "autocast(bfloat16)")
    return "ok"


def test_gradient_accumulation_and_bf16_autocast(tp_run):
    tp_run(2, check_accumulation_and_autocast)


def check_native_model(path: str, saved: str) -> list:
    """tpserve's own model (6 query / 2 KV heads: at TP=3 two ranks share each KV head) trains
    like the transformers model it was loaded from, and resumes from its own checkpoint."""
    import transformers as tf

    from tpserve import load_checkpoint, load_model, save_checkpoint

    dense = tf.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    want = train(dense, adamw(dense), dense_clip)

    def native():
        return load_model(path, dtype="float32", progress=False).train().requires_grad_(True)

    model = native()
    opt = adamw(model)
    got = train(model, opt, tp_clip, loss_of=native_loss, steps=3)
    save_checkpoint(model, saved, optimizer=opt)
    rest = train(model, opt, tp_clip, loss_of=native_loss, steps=3, start=3)
    got = (got[0] + rest[0], got[1] + rest[1])
    assert_runs_match(got, want, 1e-5, "native model")
    again = native()
    opt = adamw(again)
    load_checkpoint(again, saved, optimizer=opt)
    assert train(again, opt, tp_clip, loss_of=native_loss, steps=3, start=3) == rest, "native resume"
    return got[0]


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("native") / "llama"
    hf_model(kv=2, tied=True).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("tp", [2, 3])
def test_native_model_trains_like_its_dense_twin(tp_run, native_dir, tp, tmp_path):
    tp_run(tp, check_native_model, native_dir, str(tmp_path / "native-step-3"))


# ------------------------------------------------------------------ clipping's edges


def check_clip_edges() -> str:
    from tpserve.parallel import clip_grad_norm_, group_rank, parallelize

    dense = hf_model()
    twin = parallelize(copy.deepcopy(dense))
    for m in (dense, twin):
        hf_loss(m, batch(0)).backward()
    want = torch.nn.utils.clip_grad_norm_(dense.parameters(), 1e9, norm_type=math.inf)
    got = clip_grad_norm_(twin, 1e9, norm_type=math.inf)
    assert torch.allclose(got, want, rtol=1e-6), (got, want)
    twin.model.norm.weight.grad[0] += 1.0 if group_rank() == 1 else 0.0
    with pytest.raises(RuntimeError, match="model.norm.weight differs between rank 0 and rank 1"):
        clip_grad_norm_(twin, 1.0, check_replicated=True)
    twin.model.norm.weight.grad[0] = float("nan")
    with pytest.raises(RuntimeError, match="is nan, so it cannot be clipped"):
        clip_grad_norm_(twin, 1.0, error_if_nonfinite=True)
    return "ok"


def test_clipping_inf_norm_nonfinite_and_replica_check(tp_run):
    tp_run(2, check_clip_edges)


# ------------------------------------------------------------------ randomness


class DropoutBlock(nn.Module):
    def __init__(self, d: int = 16, h: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.inner, self.outer = nn.Dropout(0.5), nn.Dropout(0.5)

    def forward(self, x):
        return x + self.outer(self.fc2(self.inner(F.gelu(self.fc1(x)))))


def check_dropout_streams() -> dict:
    from tpserve.parallel import all_gather_object, manual_seed, parallelize

    torch.manual_seed(0)
    model = parallelize(nn.Sequential(DropoutBlock(), DropoutBlock()), {"*.fc1": "colwise", "*.fc2": "rowwise"})
    masks = {}
    for name in ("inner", "outer"):
        model[0].get_submodule(name).register_forward_hook(lambda m, a, out, name=name: masks.__setitem__(name, out == 0))
    model.train()

    def run():
        manual_seed(7)
        losses = []
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for s in range(3):
            opt.zero_grad()
            loss = model(torch.randn(4, 16, generator=torch.Generator().manual_seed(s))).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    state = copy.deepcopy(model.state_dict())
    first = run()
    model.load_state_dict(state)
    again = run()
    assert first == again, "a fixed seed must give the same run"
    every = all_gather_object({k: v.tolist() for k, v in masks.items()})
    assert all(e["outer"] == every[0]["outer"] for e in every), "replicated dropout drew different masks on the ranks"
    assert every[0]["inner"] != every[1]["inner"], "sharded dropout drew the same mask on every rank's shard"
    zero = float(masks["inner"].float().mean())
    assert 0.35 < zero < 0.65, f"dropout p=0.5 zeroed {zero:.2f} of a shard"
    replicated = all_gather_object([model[i].fc2.bias.tolist() for i in range(2)])
    assert all(r == replicated[0] for r in replicated), "replicated parameters drifted apart"
    return {"losses": first}


def test_dropout_replicated_alike_sharded_apart(tp_run):
    results = tp_run(2, check_dropout_streams)
    assert results[0] == results[1]


def check_attention_dropout_llama() -> str:
    """transformers' attention dropout runs on each rank's heads: the replicas stay identical."""
    from tpserve.parallel import all_gather_object, manual_seed, parallelize

    model = parallelize(hf_model(dropout=0.3)).train()
    manual_seed(3)
    first = train(model, adamw(model), tp_clip, steps=3)
    weights = all_gather_object(model.model.norm.weight.tolist())
    assert all(w == weights[0] for w in weights)
    again_model = parallelize(hf_model(dropout=0.3)).train()
    manual_seed(3)
    assert train(again_model, adamw(again_model), tp_clip, steps=3) == first
    return "ok"


def test_attention_dropout_in_a_parallelized_llama(tp_run):
    tp_run(2, check_attention_dropout_llama)


# ------------------------------------------------------------------ checkpoints: resume, reshard, serve


def check_save_midway(path: str) -> dict:
    from tpserve import save_checkpoint
    from tpserve.parallel import parallelize

    model = parallelize(hf_model())
    opt = adamw(model)
    train(model, opt, tp_clip, steps=3)
    save_checkpoint(model, path, optimizer=opt)
    rest = train(model, opt, tp_clip, steps=3, start=3)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch(9)).logits
    save_checkpoint(model, path + "-final")
    return {"rest": rest, "logits": logits}


def check_resume(path: str) -> tuple:
    from tpserve import load_checkpoint
    from tpserve.parallel import parallelize

    model = parallelize(hf_model(seed=5))  # other weights: all must come from the checkpoint
    opt = adamw(model)
    load_checkpoint(model, path, optimizer=opt)
    return train(model, opt, tp_clip, steps=3, start=3)


def test_resume_continues_identically_at_any_degree(tp_run, tmp_path):
    """Saved at TP=2 after 3 steps, resumed at TP=2 and at TP=3 (optimizer state resharded like
    the weights): the next 3 steps equal the uninterrupted run's and the dense model's."""
    dense = hf_model()
    want = train(dense, adamw(dense), dense_clip)
    path = str(tmp_path / "step-3")
    saved = tp_run(2, check_save_midway, path)[0]
    assert_runs_match(saved["rest"], (want[0][3:], want[1][3:]), 1e-5, "uninterrupted")
    assert (tmp_path / "step-3" / "optimizer" / "optimizer.json").is_file()
    from tpserve.checkpoint.safetensors_io import CheckpointError
    from tpserve.models.convert import verify

    assert verify(path)["optimizer_tensors"] > 0  # verify checks the optimizer's files too
    same = tp_run(2, check_resume, path)[0]
    assert same == saved["rest"], "resumed at the same degree, the run must continue exactly"
    other = tp_run(3, check_resume, path)[0]
    assert_runs_match(other, saved["rest"], 1e-5, "resumed at TP=3")
    rank_file = next((tmp_path / "step-3" / "optimizer").glob("rank-00001-*"))
    data = bytearray(rank_file.read_bytes())
    data[-3] ^= 0xFF
    rank_file.write_bytes(data)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify(path)
    with pytest.raises(Exception, match="checksum mismatch"):  # and a resume refuses it, on every rank
        tp_run(2, check_resume, path)

    from tpserve import LLM

    dense.eval()
    with torch.no_grad():
        dense_logits = dense(input_ids=batch(9)).logits
    assert torch.allclose(saved["logits"], dense_logits, atol=1e-4), "the TP run's model is not its dense twin's"
    ids = batch(9).tolist()
    for tp in (1, 2):
        with LLM(model=path + "-final", tensor_parallel_size=tp, dtype="float32") as llm:
            for row, want_logits in zip(llm.logits(ids), saved["logits"]):
                assert torch.allclose(row, want_logits, atol=1e-4), f"served at TP={tp}: the trained model's logits differ"


def test_resume_with_a_different_optimizer_is_a_clear_error(tp_run, tmp_path):
    tp_run(2, check_save_midway, str(tmp_path / "ck"))
    with pytest.raises(Exception, match="AdamW's, not SGD's"):
        tp_run(2, check_wrong_optimizer, str(tmp_path / "ck"))


def check_wrong_optimizer(path: str) -> None:
    from tpserve import load_checkpoint
    from tpserve.parallel import parallelize

    model = parallelize(hf_model())
    load_checkpoint(model, path, optimizer=sgd(model))


# ------------------------------------------------------------------ the example script


def test_finetune_example_trains_saves_and_serves(tmp_path):
    """examples/finetune_tp.py under torchrun at TP=2 on a small random Llama with the default
    model's tokenizer; the result serves through `tpserve generate`."""
    from tpserve.checkpoint.default_model import default_model_path

    src = tmp_path / "base"
    hf_model(vocab=49152).save_pretrained(src)
    for f in default_model_path().glob("tokenizer*"):
        shutil.copy(f, src / f.name)
    out = tmp_path / "tuned"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(REPO / "examples" / "finetune_tp.py"), "--model",
                          str(src), "--out", str(out), "--steps", "4"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in run.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 4 and losses[-1] < losses[0], run.stdout
    gen = subprocess.run([sys.executable, "-m", "tpserve", "generate", "--model", str(out), "--max-tokens", "4",
                          "--ignore-eos", "Hello"], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-3000:]
