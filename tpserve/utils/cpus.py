"""Which cores each local rank computes on.

Ranks that share cores, or whose threads migrate between NUMA nodes, wait for each other in
every collective. Each local rank gets its own contiguous slice of the cores this process may
use, within one NUMA node where there are enough nodes (``/sys/devices/system/node``), as
vLLM's CPU backend does; ``TPSERVE_CPU_BIND`` overrides it ("0-3|4-7": rank 0 on cores 0-3,
rank 1 on 4-7, like ``VLLM_CPU_OMP_THREADS_BIND``; "off": no pinning).
"""

from __future__ import annotations

import os
from pathlib import Path

NODE_DIR = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> list[int]:
    """"0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11]."""
    cores: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            cores += range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise ValueError(f"{text!r} is not a CPU list like '0-3,8'") from None
    return cores


def numa_nodes(available: list[int], node_dir: Path = NODE_DIR) -> list[list[int]]:
    """The available cores grouped by NUMA node (one group when the machine says nothing)."""
    nodes = []
    for path in sorted(node_dir.glob("node[0-9]*/cpulist"), key=lambda p: int(p.parent.name[4:])):
        cores = [c for c in parse_cpulist(path.read_text()) if c in available]
        if cores:
            nodes.append(cores)
    return nodes or [list(available)]


def rank_cores(local_rank: int, local_world: int, available: list[int] | None = None,
               bind: str | None = None, node_dir: Path = NODE_DIR) -> list[int] | None:
    """The cores of ``local_rank`` among ``local_world`` ranks on this host; None: do not pin
    (``bind="off"``, or fewer cores than ranks, where ranks must share and the OS balances)."""
    bind = os.environ.get("TPSERVE_CPU_BIND") if bind is None else bind
    if bind == "off":
        return None
    if bind:
        slices = bind.split("|")
        if len(slices) != local_world:
            raise ValueError(f"TPSERVE_CPU_BIND={bind!r} names {len(slices)} core sets for {local_world} local ranks; "
                             f"give one per rank, separated by '|' (e.g. '0-3|4-7'), or 'off'")
        return parse_cpulist(slices[local_rank])
    available = sorted(os.sched_getaffinity(0)) if available is None else sorted(available)
    if len(available) < local_world:
        return None
    nodes = numa_nodes(available, node_dir)
    if len(nodes) >= local_world:  # whole nodes per rank: the nodes split as evenly as ranks allow
        per = len(nodes) // local_world
        return [c for node in nodes[local_rank * per:(local_rank + 1) * per] for c in node]
    flat = [c for node in nodes for c in node]  # ranks split the cores, contiguous and node by node
    per, extra = divmod(len(flat), local_world)
    start = local_rank * per + min(local_rank, extra)
    return flat[start:start + per + (local_rank < extra)]
