"""Sharded tpserve checkpoints: save at TP=4, load at TP=1..4 bit-exact, damage detection,
crash safety, training roots, the engine and the command line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

PROMPTS = [[5, 17, 33, 2, 91, 7, 64], [120, 3], [44, 9, 150, 11, 6]]
CHUNK_BYTES = 1000  # 3 indices per checksum chunk for these 72-wide tensors: many chunks, misaligned reshards


def _config(tie: bool = False):
    import transformers as tf

    # 9 query / 3 KV heads: at TP=4 ranks 1 and 2 both hold KV head 1 (replication overlap); at TP=3
    # the MLP (100 wide) and KV boundaries fall inside the TP=4 shards
    return tf.LlamaConfig(vocab_size=160, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                          max_position_embeddings=128, initializer_range=0.1, num_attention_heads=9,
                          num_key_value_heads=3, attention_bias=True, tie_word_embeddings=tie)


def _save_transformers(path: Path, tie: bool = False) -> list[torch.Tensor]:
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(_config(tie)).eval()
    model.save_pretrained(path)
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0] for p in PROMPTS]


# ---- functions run on every rank of a live group ----

def save_from(src: str, out: str, chunk_bytes: int) -> str:
    import tpserve.checkpoint.manifest as manifest
    from tpserve import load_model, save_checkpoint

    model = load_model(src, dtype="float32", device="cpu", progress=False)
    old, manifest.CHUNK_BYTES = manifest.CHUNK_BYTES, chunk_bytes
    try:
        return str(save_checkpoint(model, out))
    finally:
        manifest.CHUNK_BYTES = old


def compare(src: str, ckpt: str, ref: list[torch.Tensor]) -> dict:
    """Load the transformers source and the checkpoint at this group's degree: same parameters,
    same logits, bit for bit."""
    from tpserve.engine.runner import full_logits
    from tpserve.models import load_model

    a = load_model(src, dtype="float32", device="cpu", progress=False)
    b = load_model(ckpt, dtype="float32", device="cpu", progress=False)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    out = {"same_names": list(pa) == list(pb),
           "differ": [n for n in pa if not torch.equal(pa[n], pb[n])]}
    la, lb = full_logits(a, PROMPTS), full_logits(b, PROMPTS)
    if la is not None:
        out["logits_equal"] = all(torch.equal(x, y) for x, y in zip(la, lb))
        out["abs_err"] = max((x - r).abs().max().item() for x, r in zip(lb, ref))
    return out


def load_error(path: str) -> str:
    from tpserve.checkpoint.safetensors_io import CheckpointError
    from tpserve.models import load_model

    with pytest.raises(CheckpointError) as info:
        load_model(path, dtype="float32", device="cpu", progress=False)
    return str(info.value)


# ---- fixtures ----

@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "llama_9_3"
    return path, _save_transformers(path)


@pytest.fixture(scope="module")
def ckpt4(tp_run, src, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tp4"
    assert tp_run(4, save_from, str(src[0]), str(out), CHUNK_BYTES) == [str(out)] * 4
    return out


@pytest.fixture()
def damaged(ckpt4, tmp_path):
    def make() -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(ckpt4, dst)
        return dst
    return make


def _manifest(path: Path) -> dict:
    return json.loads((path / "tpserve.json").read_text())


# ---- format ----

def test_layout_on_disk(ckpt4, src):
    from safetensors import safe_open

    m = _manifest(ckpt4)
    assert m["tp_size"] == 4 and [f["file"] for f in m["files"]] == [f"rank-0000{r}-of-00004.safetensors" for r in range(4)]
    for name in ("config.json", "generation_config.json"):
        assert (ckpt4 / name).is_file()
    k = m["tensors"]["model.layers.0.self_attn.k_proj.weight"]
    # KV heads (8 rows each) at TP=4: rank 2 holds heads 1-2, so head 1 is on ranks 1 and 2; the owned regions tile
    assert [s["range"] for s in k["shards"]] == [[0, 8], [8, 16], [8, 24], [16, 24]]
    assert [s["owned"] for s in k["shards"]] == [[0, 8], [8, 16], [16, 24], [24, 24]]
    norm = m["tensors"]["model.norm.weight"]
    assert norm["split_dim"] is None and [s["owned"] for s in norm["shards"]] == [[0, 1], [1, 1], [1, 1], [1, 1]]
    with safe_open(ckpt4 / "rank-00002-of-00004.safetensors", "pt") as f:  # plain safetensors, this rank's shards
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (16, 72)
        assert f.get_tensor("model.norm.weight").shape == (72,)
        assert f.metadata()["tpserve_rank"] == "2"


def test_convert_writes_the_same_rank_files_as_a_live_save(ckpt4, src, tmp_path, monkeypatch):
    import tpserve.checkpoint.manifest as manifest
    from tpserve.models.convert import convert

    monkeypatch.setattr(manifest, "CHUNK_BYTES", CHUNK_BYTES)
    out = convert(src[0], tmp_path / "conv", 4, progress=False)
    for r in range(4):
        name = f"rank-0000{r}-of-00004.safetensors"
        assert (out / name).read_bytes() == (ckpt4 / name).read_bytes()
    assert _manifest(out)["tensors"] == _manifest(ckpt4)["tensors"]


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_tp4_checkpoint_loads_bit_exact_at_every_degree(tp_run, src, ckpt4, tp):
    results = tp_run(tp, compare, str(src[0]), str(ckpt4), src[1])
    for r in results:
        assert r["same_names"] and r["differ"] == [], f"TP={tp}: parameters differ from the source: {r['differ']}"
    assert results[0]["logits_equal"], f"TP={tp}: logits differ from loading the transformers source"
    assert results[0]["abs_err"] <= 1e-4


def test_reads_own_file_at_same_degree_and_only_overlapping_bytes_when_resharding(ckpt4, src):
    from tpserve.checkpoint.load import piece_bytes, plan_reads
    from tpserve.checkpoint.manifest import read_manifest
    from tpserve.models import load_config
    from tpserve.models.layout import layout

    m = read_manifest(ckpt4)
    config = load_config(src[0])
    total = sum(math_prod(t.shape) * t.dtype.itemsize for t in m.tensors.values())
    for tp in (1, 2, 3, 4):
        for rank, shards in enumerate(layout(config, tp)):
            need = read = slack = 0
            for name, s in shards.items():
                pieces = plan_reads(m, name, s, rank)
                if tp == 4:
                    assert {p.rank for p in pieces} == {rank}, f"{name}: rank {rank} reads another rank's file"
                t = m.tensors[name]
                full = math_prod(t.shape) * t.dtype.itemsize
                local = full if s.dim is None else full // t.shape[s.dim] * (s.end - s.start)
                need += local
                read += sum(piece_bytes(m, p) for p in pieces)
                if t.split_dim is not None:  # rounding out to checksum chunks: at most one chunk at each end
                    per_chunk = full // t.shape[t.split_dim] * t.shards[0].chunk
                    slack += 2 * per_chunk * len(pieces)
            assert need <= read <= need + slack, f"TP={tp} rank {rank}: read {read} bytes for {need}"
            if tp in (1, 2, 4):  # shard boundaries line up: exactly the bytes needed
                assert read == need
        if tp == 1:
            assert read == total


def math_prod(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def test_saving_over_a_checkpoint_needs_overwrite(ckpt4, src, tmp_path):
    from tpserve.models.convert import convert, verify

    dst = tmp_path / "c"
    shutil.copytree(ckpt4, dst)
    with pytest.raises(FileExistsError, match="already holds a tpserve checkpoint"):
        convert(src[0], dst, 2, progress=False)
    convert(src[0], dst, 2, overwrite=True, progress=False)
    assert _manifest(dst)["tp_size"] == 2 and verify(dst)["files"] == 2
    assert not list(tmp_path.glob(".c.*")), "temporary directories were left behind"
    with pytest.raises(FileExistsError, match="not a tpserve checkpoint"):  # never deletes other data
        convert(src[0], src[0], 2, overwrite=True, progress=False)


# ---- damage: caught before any weight is used, on every rank ----

def _tensor_span(path: Path, rank: int, name: str) -> tuple[int, int]:
    shard = _manifest(path)["tensors"][name]["shards"][rank]
    return tuple(shard["offsets"])


def test_flipped_byte_is_caught_by_verify_and_by_every_loading_rank(tp_run, damaged):
    from tpserve.checkpoint.safetensors_io import CheckpointError
    from tpserve.models.convert import verify

    d = damaged()
    name = "model.layers.1.mlp.down_proj.weight"  # split along dim 1: checksum chunks are strided
    f = d / "rank-00002-of-00004.safetensors"
    b, e = _tensor_span(d, 2, name)
    raw = bytearray(f.read_bytes())
    raw[(b + e) // 2] ^= 0x01
    f.write_bytes(raw)
    with pytest.raises(CheckpointError) as info:
        verify(d)
    assert f.name in str(info.value) and name in str(info.value) and "checksum mismatch" in str(info.value)
    for tp in (4, 2):  # the same-degree fast path and a reshard
        msgs = tp_run(tp, load_error, str(d))
        for msg in msgs:
            assert f.name in msg and name in msg and "checksum mismatch" in msg, msg


def test_truncated_and_missing_files(tp_run, damaged):
    from tpserve.checkpoint.safetensors_io import CheckpointError
    from tpserve.checkpoint.verify import checkpoint_problem
    from tpserve.models.convert import verify

    d = damaged()
    f = d / "rank-00001-of-00004.safetensors"
    f.write_bytes(f.read_bytes()[:-500])
    with pytest.raises(CheckpointError, match=r"rank-00001-of-00004.safetensors: file has .*tensor lm_head.weight .*truncated"):
        verify(d)
    for msg in tp_run(2, load_error, str(d)):
        assert f.name in msg and "truncated" in msg and "tensor lm_head.weight" in msg, msg
    assert "has" in checkpoint_problem(d)
    f.unlink()
    with pytest.raises(CheckpointError, match="rank-00001-of-00004.safetensors: rank 1's file is missing"):
        verify(d)
    for msg in tp_run(4, load_error, str(d)):
        assert f.name in msg and "missing" in msg, msg


def test_damaged_manifest_is_named(damaged):
    from tpserve.checkpoint.safetensors_io import CheckpointError
    from tpserve.models.convert import verify

    d = damaged()
    m = _manifest(d)
    m["tensors"]["model.layers.0.self_attn.k_proj.weight"]["shards"][3]["owned"] = [16, 24]  # overlaps rank 2
    (d / "tpserve.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="k_proj.weight: owned regions do not tile the tensor: overlap"):
        verify(d)


# ---- crash safety and training roots ----

_SLOW_SAVE = textwrap.dedent("""
    import sys, time
    from tpserve.checkpoint import save
    from tpserve.models.convert import convert
    real, calls = save._write_all, []

    def write_then_stall(fd, data):  # a save that is mid-way through writing its rank files
        real(fd, data)
        calls.append(1)
        if len(calls) == 4:
            print("writing", flush=True)
            time.sleep(120)

    save._write_all = write_then_stall
    convert(sys.argv[1], sys.argv[2], 2, progress=False)
""")


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_usable(tp_run, src, ckpt4, tmp_path):
    from tpserve.checkpoint.resolve import resolve_model_path
    from tpserve.checkpoint.verify import find_latest_checkpoint
    from tpserve.models.convert import convert

    root = tmp_path / "run"
    root.mkdir()
    shutil.copytree(ckpt4, root / "step-100")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(src[0]), str(root / "step-200")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (root / "step-200").exists()
    partial = list(root.glob(".step-200.tmp-*"))
    assert len(partial) == 1 and any(partial[0].glob("rank-*.safetensors"))
    (root / "step-300").mkdir()  # a crashed writer of another kind: rank files, no manifest
    shutil.copy(ckpt4 / "rank-00000-of-00004.safetensors", root / "step-300")
    assert find_latest_checkpoint(root) == root / "step-100"
    assert resolve_model_path(root) == root / "step-100"
    assert tp_run(2, compare, str(src[0]), str(resolve_model_path(root)), src[1])[0]["logits_equal"]
    convert(src[0], root / "step-200", 2, progress=False)  # the next save to the same step succeeds ...
    assert not list(root.glob(".step-200.tmp-*"))  # ... and clears the dead save's leftovers
    assert find_latest_checkpoint(root) == root / "step-200"
    shutil.copytree(root / "step-100", root / "step-1000")  # numeric order, not string order
    assert find_latest_checkpoint(root) == root / "step-1000"


def test_root_with_only_incomplete_checkpoints(tmp_path, ckpt4):
    from tpserve.checkpoint.resolve import resolve_model_path
    from tpserve.checkpoint.safetensors_io import CheckpointError

    (tmp_path / "step-5").mkdir()
    shutil.copy(ckpt4 / "rank-00000-of-00004.safetensors", tmp_path / "step-5")
    with pytest.raises(CheckpointError, match=r"none of its 1 checkpoint directories is complete \(step-5: .*tpserve.json"):
        resolve_model_path(tmp_path)


# ---- the engine ----

def test_llm_save_sharded_then_load_at_another_degree(src, tmp_path):
    from tpserve import LLM
    from tpserve.checkpoint.default_model import default_model_path

    model_dir = tmp_path / "with_tokenizer"
    shutil.copytree(src[0], model_dir)
    for f in default_model_path().glob("tokenizer*"):
        shutil.copy(f, model_dir)
    with LLM(model=str(model_dir), tensor_parallel_size=2) as llm:
        before = llm.logits(PROMPTS)
        assert llm.save_sharded(tmp_path / "saved") == tmp_path / "saved"
        with pytest.raises(FileExistsError, match="already holds"):
            llm.save_sharded(tmp_path / "saved")
        after = llm.logits(PROMPTS)  # a refused save leaves the engine working
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    with LLM(model=str(tmp_path / "saved"), tensor_parallel_size=1) as llm:
        again = llm.logits(PROMPTS)
        assert llm.generate([[5, 17, 33]])[0].outputs[0].token_ids  # the copied tokenizer works
    for a, b in zip(before, again):
        assert (a - b).abs().max().item() <= 1e-4


# ---- command line ----

def test_cli_convert_and_verify(src, tmp_path, capsys):
    from tpserve.cli import main

    out = tmp_path / "cli"
    assert main(["convert", str(src[0]), "--tp", "3", "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"ok {out}: 3 rank files")
    assert main(["convert", str(out), "--tp", "2", "--output", str(tmp_path / "from_ckpt")]) == 0  # tpserve -> tpserve
    assert main(["verify", str(tmp_path / "from_ckpt")]) == 0
    capsys.readouterr()
    inspected = []
    for path in (src[0], out):  # inspect reads a tpserve checkpoint's full shapes from its manifest
        assert main(["inspect", str(path), "--tp", "2"]) == 0
        inspected.append(capsys.readouterr().out.splitlines())
    assert inspected[1][0].endswith("(tpserve checkpoint cut for TP=3)")
    assert inspected[1][1:] == inspected[0][1:]
    for argv, needle in [(["convert", str(src[0]), "--tp", "3", "--output", str(out)], "already holds"),
                         (["convert", str(src[0]), "--tp", "10", "--output", str(tmp_path / "x")], "TP=10"),
                         (["convert", str(tmp_path / "nope"), "--tp", "2", "--output", str(tmp_path / "y")], "does not exist"),
                         (["verify", str(src[0])], "no tpserve.json")]:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and err.startswith(f"tpserve {argv[0]}: error:"), err
    f = out / "rank-00001-of-00003.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x40
    f.write_bytes(raw)
    proc = subprocess.run([sys.executable, "-m", "tpserve.cli", "verify", str(out)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f.name in lines[0] and ": tensor lm_head.weight:" in lines[0] and "checksum mismatch" in lines[0]
