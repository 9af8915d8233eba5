"""Shared-memory collectives: the same results as gloo (bit-identical on every rank), deadlines
and dead peers, nothing left in /dev/shm, and engines on top of them."""

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distpool import comm_error_after, spawn_once

from tpserve.parallel import (
    TensorParallelConfig,
    all_gather,
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    broadcast_tensor,
    set_group_timeout,
    shm,
    shm_setup,
)
from tpserve.parallel.comm import gather_to_rank0, summer

SLOT = shm.SLOT_BYTES
COUNTS = [1, 7, 1024, 1025, SLOT // 4 + 3, 3 * SLOT // 4 + 1]  # one round, several rounds, odd tails


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def check_against_gloo() -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    assert shm.of(dist.group.WORLD) is not None, "the pool's group should run over shared memory"
    gloo = dist.new_group(backend="gloo")  # the same ranks, without shared memory
    assert shm.of(gloo) is None
    gen = torch.Generator().manual_seed(rank)
    worst, digests = {}, []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in COUNTS:
            x = torch.randn(n, generator=gen).to(dtype)
            fast, slow = all_reduce_sum(x.clone()), all_reduce_sum(x.clone(), group=gloo)
            tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 4e-3}[dtype]
            err = ((fast.float() - slow.float()).abs().max() / slow.float().abs().max().clamp(min=1)).item()
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
            assert err <= tol, (dtype, n, err)
            digests.append(_digest(fast))
    # 16-bit sums are exactly a float sum in rank order, rounded once (every tile and tail of
    # the vectorized loop; NaN, infinities and values that round up to the next exponent)
    for dtype in (torch.bfloat16, torch.float16):
        for n in (1, 511, 513, 4099, SLOT // 2 + 17):
            x = torch.randn(n, generator=gen).mul(2.0 ** rank).to(dtype)
            if n > 8:
                x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0 + 2.0 ** -9 * (rank + 1)])
            pieces = all_gather(x.unsqueeze(0), dim=0, group=gloo)
            want = pieces[0].float()
            for piece in pieces[1:]:
                want += piece.float()
            got = all_reduce_sum(x.clone())
            assert torch.equal(got.isnan(), want.isnan()), (dtype, n)
            assert torch.equal(got[~got.isnan()], want.to(dtype)[~got.isnan()]), (dtype, n)
    # a non-contiguous tensor is summed in place too, by all_reduce_sum and by a decode loop's summer
    total = summer()
    for reduce in (all_reduce_sum, total):
        base = torch.arange(12.0).view(3, 4) * (rank + 1)
        col = base[:, 1]
        reduce(col)
        assert torch.equal(base[:, 1], torch.tensor([1.0, 5.0, 9.0]) * world * (world + 1) / 2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 1000, generator=gen).to(dtype)
        assert torch.equal(total(x.clone()), all_reduce_sum(x.clone())), dtype
    # uneven pieces along every dimension, sizes given or found, a rank with nothing
    for dim in (0, 1, 2):
        for sizes in ([r + 1 for r in range(world)], [0] + [3] * (world - 1), [SLOT // 8 + r for r in range(world)]):
            shape = [2, 3, 5]
            shape[dim] = sizes[rank]
            piece = torch.randn(shape, generator=gen)
            for given in (sizes, None):
                fast = all_gather(piece, dim=dim, sizes=given)
                slow = all_gather(piece, dim=dim, sizes=sizes, group=gloo)
                assert torch.equal(fast, slow), (dim, sizes)
            last = piece.movedim(dim, -1).contiguous()
            got = gather_to_rank0(last, sizes)
            want = gather_to_rank0(last, sizes, group=gloo)
            assert (got is None) == (rank != 0) and (got is None or torch.equal(got, want))
    for dtype in (torch.float32, torch.int64, torch.bfloat16, torch.uint8):
        for n in (1, 1000, SLOT + 5):
            src = world - 1
            b = (torch.arange(n) % 97).to(dtype) if rank == src else torch.zeros(n, dtype=dtype)
            assert torch.equal(broadcast_tensor(b, src=src), (torch.arange(n) % 97).to(dtype))
    big = {"text": "héllo" * 100_000, "rank": 0}
    assert broadcast_object(big if rank == 0 else None) == big
    assert all_gather_object(rank) == list(range(world))
    same = all_gather_object(digests)
    assert all(d == same[0] for d in same), "ranks disagree on the bits of a sum"
    return worst


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_every_collective_equals_gloo(tp_run, tp):
    worst = tp_run(tp, check_against_gloo)[0]
    assert worst["torch.float32"] <= 1e-6


def check_two_groups_at_once() -> list:
    cfg = TensorParallelConfig(rank=dist.get_rank(), world_size=dist.get_world_size(), tp_size=2, backend="gloo")
    group = cfg.init()
    assert shm.of(group) is not None and shm.of(group) is not shm.of(dist.group.WORLD)
    out = []
    for i in range(50):  # the two pairs and the whole world interleave their rounds
        t = torch.full((300,), float(dist.get_rank() + i))
        all_reduce_sum(t, group=group)
        w = all_reduce_sum(torch.ones(3))
        out.append((t[0].item(), w[0].item()))
    return out


def test_groups_of_one_process_keep_their_rounds_apart(tp_run):
    out = tp_run(4, check_two_groups_at_once)
    for rank, rows in enumerate(out):
        first = 0 if rank < 2 else 2
        assert rows == [(float(2 * i + 2 * first + 1), 4.0) for i in range(50)]


def check_group_over_simulated_hosts(hosts: list[int]) -> dict:
    """A group whose ranks claim to sit on ``hosts[rank]``: all-reduce sums on each host in
    shared memory and between hosts over gloo; the other collectives keep gloo."""
    rank = dist.get_rank()
    real = shm_setup.host_key
    shm_setup.host_key = lambda: f"host-{hosts[rank]}"
    try:
        group = dist.new_group(backend="gloo")
        fast = shm_setup.attach(group, 30.0)
    finally:
        shm_setup.host_key = real
    gloo = dist.new_group(backend="gloo")
    gen = torch.Generator().manual_seed(rank)
    digests, worst = [], 0.0
    for dtype in (torch.float32, torch.bfloat16):
        for n in COUNTS[:5]:
            x = torch.randn(n, generator=gen).to(dtype)
            got, want = all_reduce_sum(x.clone(), group=group), all_reduce_sum(x.clone(), group=gloo)
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1)).item()
            assert err <= (1e-6 if dtype == torch.float32 else 2e-2), (dtype, n, err)
            worst = max(worst, err) if dtype == torch.float32 else worst
            digests.append(_digest(got))
    piece = torch.randn(2, rank + 1, generator=gen)
    assert torch.equal(all_gather(piece, dim=1, group=group), all_gather(piece, dim=1, group=gloo))
    assert broadcast_object("from 0" if rank == 0 else None, 0, group) == "from 0"
    same = all_gather_object(digests)
    assert all(d == same[0] for d in same), "ranks disagree on the bits of a sum"
    return {"local": fast.world, "members": fast.members, "spans": fast.spans_hosts,
            "cross": fast.cross is not None, "worst": worst}


@pytest.mark.parametrize("hosts", [[0, 0, 1, 1], [0, 1, 1], [0, 0, 1]])
def test_group_over_two_hosts_sums_each_host_in_shared_memory(tp_run, hosts):
    out = tp_run(len(hosts), check_group_over_simulated_hosts, hosts)
    for rank, facts in enumerate(out):
        members = [r for r, h in enumerate(hosts) if h == hosts[rank]]
        assert facts["members"] == members and facts["local"] == len(members) and facts["spans"]
        assert facts["cross"] == (rank == members[0])  # one rank per host talks to the other host
        assert facts["worst"] <= 1e-6


def _all_reduce_error(timeout: float) -> str:
    """How long rank 0's next all-reduce took to fail, and the error it raised."""
    return comm_error_after(lambda: all_reduce_sum(torch.ones(64), timeout=timeout))


def _peer_dies_mid_run(timeout: float, how: str = "all_reduce_sum") -> str:
    for _ in range(20):
        all_reduce_sum(torch.ones(64))
    if dist.get_rank() == 1:
        os._exit(3)  # a zombie until its parent reaps it: still dead
    if how == "summer":  # a decode loop's sums: the group's deadline, asked once
        set_group_timeout(dist.group.WORLD, timeout)
        total = summer()
        return comm_error_after(lambda: total(torch.ones(64)))
    return _all_reduce_error(timeout)


def _peer_stalls(timeout: float) -> str:
    all_reduce_sum(torch.ones(4))
    if dist.get_rank() == 1:
        time.sleep(timeout + 3)
        os._exit(0)
    return _all_reduce_error(timeout)


def _rank0_error(fn, timeout: float, limit: float, *args) -> tuple[float, str]:
    status, value = spawn_once(fn, 2, timeout, *args, timeout=limit)[0]
    assert status == "ok", value
    elapsed, msg = value.split("|", 1)
    return float(elapsed), msg


@pytest.mark.parametrize("how", ["all_reduce_sum", "summer"])
def test_dead_peer_is_named_long_before_the_deadline(how):
    elapsed, msg = _rank0_error(_peer_dies_mid_run, 30.0, 90, how)
    assert elapsed < 5, msg
    assert "rank(s) [1]" in msg and "shared memory: peer exited" in msg, msg


def test_silent_peer_times_out_at_the_deadline():
    elapsed, msg = _rank0_error(_peer_stalls, 2.0, 60)
    assert 1.9 <= elapsed < 6 and "timed out" in msg and "rank(s) [1]" in msg, msg


def _segments() -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob("tpserve-*"))


def test_nothing_is_left_in_dev_shm():
    from tpserve import LLM, SamplingParams

    before = _segments()
    with LLM(tensor_parallel_size=2) as llm:
        assert shm.of(llm.group) is not None
        assert _segments() == before  # unlinked as soon as every rank mapped it
        llm.generate("Hi", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError):
        with LLM(tensor_parallel_size=2) as llm:
            llm.generate([[10**9]])
    victim = LLM(tensor_parallel_size=2)
    os.kill(victim._workers[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        victim.generate("Hello", SamplingParams(max_tokens=50, ignore_eos=True))
    with LLM(tensor_parallel_size=2) as llm:
        assert llm.generate("Hi", SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    assert _segments() == before


class _NoCommands:
    """A worker pipe that fails the test if a command is sent through it."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def send(self, msg) -> None:
        raise AssertionError(f"{msg[0]!r} went through a pipe")

    def __getattr__(self, name):
        return getattr(self.conn, name)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_commands_reach_the_workers_through_shared_memory():
    """No pipe and pickle per command; an idle worker waits without a deadline and almost no CPU,
    from 20 ms on (another engine in the process may be computing on its cores)."""
    from tpserve import LLM, SamplingParams

    with LLM(tensor_parallel_size=2) as llm:
        assert shm.of(llm.group) is not None
        pipes = llm._conns
        llm._conns = [_NoCommands(c) for c in pipes]
        try:
            ids = llm.generate("The capital of Germany is", SamplingParams(max_tokens=4))[0].outputs[0].token_ids
            assert len(ids) == 4
            assert len(llm.logits([[1, 2, 3]])) == 1
        finally:
            llm._conns = pipes
        worker = llm._workers[0].pid
        time.sleep(0.1)  # past the short naps (20 ms)
        before = _cpu_seconds(worker)
        time.sleep(0.8)
        idle = _cpu_seconds(worker) - before
        # naps of 1 ms: ~0.03 s; of 50 us, as for the whole first second before: ~0.15 s
        assert idle < 0.08, f"an idle worker used {idle:.2f} s of CPU in 0.8 s"
        assert len(llm.generate("Hi", SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2


def test_shm_off_by_environment(monkeypatch):
    from tpserve import LLM, SamplingParams

    monkeypatch.setenv("TPSERVE_SHM", "0")  # the workers inherit it
    with LLM(tensor_parallel_size=2) as llm:
        assert shm.of(llm.group) is None
        gloo = llm.generate("The capital of Germany is", SamplingParams(max_tokens=6))[0].outputs[0].token_ids
    monkeypatch.delenv("TPSERVE_SHM")
    with LLM(tensor_parallel_size=2) as llm:
        assert shm.of(llm.group) is not None
        fast = llm.generate("The capital of Germany is", SamplingParams(max_tokens=6))[0].outputs[0].token_ids
    assert fast == gloo


# ---- rank placement -------------------------------------------------------------------------

def test_each_local_rank_gets_its_own_cores(tmp_path):
    from tpserve.utils.cpus import parse_cpulist, rank_cores

    assert parse_cpulist("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    flat = tmp_path / "flat"  # a machine that says nothing about NUMA
    assert [rank_cores(r, 2, list(range(8)), "", flat) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [rank_cores(r, 3, list(range(8)), "", flat) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert rank_cores(0, 4, [0, 1], "", flat) is None  # more ranks than cores: the OS shares them out
    numa = tmp_path / "numa"
    for node, cpus in enumerate(["0-3,8-11", "4-7,12-15"]):
        (numa / f"node{node}").mkdir(parents=True)
        (numa / f"node{node}" / "cpulist").write_text(cpus + "\n")
    both = list(range(16))
    assert rank_cores(0, 2, both, "", numa) == [0, 1, 2, 3, 8, 9, 10, 11]  # a whole node each
    assert rank_cores(1, 2, both, "", numa) == [4, 5, 6, 7, 12, 13, 14, 15]
    assert [rank_cores(r, 4, both, "", numa) for r in range(4)] == [[0, 1, 2, 3], [8, 9, 10, 11],
                                                                     [4, 5, 6, 7], [12, 13, 14, 15]]
    assert rank_cores(1, 2, both, "0-3|4-7", numa) == [4, 5, 6, 7]  # TPSERVE_CPU_BIND
    assert rank_cores(1, 2, both, "off", numa) is None
    with pytest.raises(ValueError, match="names 1 core sets for 2 local ranks"):
        rank_cores(0, 2, both, "0-3", numa)


def test_workers_compute_on_their_own_cores():
    from tpserve import LLM

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    before = os.sched_getaffinity(0)
    with LLM(tensor_parallel_size=2) as llm:
        assert os.sched_getaffinity(llm._workers[0].pid) == set(llm._cores[1])
        assert llm._cores[0] and set(llm._cores[0]).isdisjoint(llm._cores[1])
        assert os.sched_getaffinity(0) == before  # the caller's thread keeps its cores between calls


PINNED_SCRIPT = '''
import os
import sys
import torch
import tpserve.engine.llm as engine
from tpserve import LLM, SamplingParams

seen = []
run = engine.execute


def spy(*args, **kwargs):
    seen.append((sorted(os.sched_getaffinity(0)), torch.get_num_threads()))
    return run(*args, **kwargs)


engine.execute = spy
if __name__ == "__main__":
    with LLM(tensor_parallel_size=2) as llm:
        llm.generate([[1, 504, 3458]], SamplingParams(max_tokens=2))
    sys.stdout.write(f"RANK {os.environ['LOCAL_RANK']} {seen[-1]} {sorted(os.sched_getaffinity(0))}\\n")
    sys.stdout.flush()
'''


TWO_HOSTS_SCRIPT = '''
import json
import os
import sys
import socket

from tpserve import LLM, SamplingParams
from tpserve.parallel import shm

reduces = [0]
run = shm.ShmComm.all_reduce


def counted(self, *args):
    reduces[0] += 1
    return run(self, *args)


shm.ShmComm.all_reduce = counted
if __name__ == "__main__":
    with LLM(tensor_parallel_size=4) as llm:
        fast = shm.of(llm.group)
        text = llm.generate(PROMPT, SamplingParams(max_tokens=8))[0].outputs[0].text
        facts = {"host": socket.gethostname(), "local": fast and fast.world, "spans": fast and fast.spans_hosts,
                 "cross": fast is not None and fast.cross is not None, "reduces": reduces[0], "text": text}
    sys.stdout.write(f"RANK {os.environ['RANK']} {json.dumps(facts)}\\n")  # one write: ranks share the pipe
    sys.stdout.flush()
'''


def test_tp4_over_two_simulated_hosts(tmp_path):
    """Two torchrun agents, each in its own UTS, IPC and mount namespace with a private /dev/shm
    (two hosts, as far as the ranks can tell), rendezvous on 127.0.0.1: TP=4 uses shared memory
    on each host and gloo between them, and says what one host says."""
    import json
    import shutil
    import socket
    import subprocess
    import sys

    from tpserve import LLM, SamplingParams

    prompt = "The capital of Germany is"
    probe = subprocess.run(["unshare", "--uts", "--ipc", "--mount", "sh", "-c",
                            "mount -t tmpfs tmpfs /dev/shm && hostname probe"], capture_output=True, text=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip(f"cannot make namespaces here (unshare: {probe.stderr.strip()[:200]})")
    script = tmp_path / "two_hosts.py"
    script.write_text(TWO_HOSTS_SCRIPT.replace("PROMPT", repr(prompt)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")  # a namespace's made-up hostname resolves to nothing
    agents = []
    for host in (0, 1):
        agent = (f"mount -t tmpfs -o size=64m tmpfs /dev/shm && hostname tpserve-host{host} && exec {sys.executable} "
                 f"-m torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d "
                 f"--rdzv-endpoint 127.0.0.1:{port} --rdzv-id two-hosts --local-addr 127.0.0.1 {script}")
        agents.append(subprocess.Popen(["unshare", "--uts", "--ipc", "--mount", "sh", "-c", agent], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=400)
            assert agent.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for agent in agents:
            agent.kill()
    facts = {}
    for line in "".join(outs).splitlines():
        if line.startswith("RANK "):
            rank, _, blob = line[5:].partition(" ")
            facts[int(rank)] = json.loads(blob)
    assert sorted(facts) == [0, 1, 2, 3], outs
    with LLM() as one:
        want = one.generate(prompt, SamplingParams(max_tokens=8))[0].outputs[0].text
    assert len({f["host"] for f in facts.values()}) == 2
    for rank, f in facts.items():
        assert f["text"] == want, (rank, f)
        assert f["local"] == 2 and f["spans"] and f["reduces"] > 0, (rank, f)
    assert sum(f["cross"] for f in facts.values()) == 2  # one rank per host crosses over gloo


def test_torchrun_ranks_split_the_host_cores(tmp_path):
    """Under torchrun, LOCAL_RANK / LOCAL_WORLD_SIZE choose each rank's slice; only its calls are pinned."""
    import subprocess
    import sys

    from tpserve.utils.cpus import rank_cores

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    script = tmp_path / "pinned.py"
    script.write_text(PINNED_SCRIPT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    everything = sorted(os.sched_getaffinity(0))
    for rank in (0, 1):
        cores = rank_cores(rank, 2)
        assert f"RANK {rank} ({cores}, {len(cores)}) {everything}" in run.stdout, run.stdout
