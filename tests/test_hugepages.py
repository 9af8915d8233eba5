"""``pack_on_huge_pages``: a loaded model's CPU tensors moved onto 2 MiB pages, values, views and
sharing kept, the old memory given back."""

import re

import pytest
import torch
from torch import nn

from tpserve.utils import hugepages


class Fused(nn.Module):
    """q/k as row views of one fused tensor kept in a tuple attribute (as ``fuse_columns`` does),
    and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        whole = torch.randn(96, 512)
        self.q = nn.Parameter(whole[:64], requires_grad=False)
        self.k = nn.Parameter(whole[64:], requires_grad=False)
        self.qk = (whole, None)
        self.embed = nn.Embedding(1000, 512)
        self.head = nn.Linear(512, 1000, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.arange(7, dtype=torch.int8))
        self.requires_grad_(False)


def _huge_kib(ptr: int) -> int:
    """AnonHugePages of the mapping that holds address ``ptr``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                inside = int(m[1], 16) <= ptr < int(m[2], 16)
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def test_tensors_keep_their_values_views_and_sharing_in_one_mapping(monkeypatch):
    monkeypatch.setattr(hugepages, "enabled", lambda: True)
    mod = Fused()
    before = {name: t.clone() for name, t in [*mod.named_parameters(), *mod.named_buffers()]}
    whole = mod.qk[0].clone()
    moved = hugepages.pack_on_huge_pages(mod)
    assert moved >= sum(t.numel() * t.element_size() for t in before.values())
    for name, t in [*mod.named_parameters(), *mod.named_buffers()]:
        assert torch.equal(t, before[name]), name
    assert torch.equal(mod.qk[0], whole)
    base = mod.qk[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in (mod.q, mod.k, mod.embed.weight, mod.scale))
    assert mod.q.data_ptr() == mod.qk[0].data_ptr() and mod.k.data_ptr() == mod.qk[0][64:].data_ptr()
    assert mod.head.weight is mod.embed.weight
    assert all(t.data_ptr() % hugepages.ALIGN == 0 for t in (mod.qk[0], mod.embed.weight, mod.scale))
    mod.qk[0][0, 0] = 5.0  # still one tensor: a write through the fused product shows in the view
    assert mod.q[0, 0].item() == 5.0
    x = torch.randint(0, 1000, (3,))
    assert torch.equal(mod.head(mod.embed(x)), before["embed.weight"][x] @ before["embed.weight"].t())


def test_big_weights_land_on_huge_pages(monkeypatch):
    if not hugepages.enabled():
        pytest.skip("transparent huge pages are off on this machine (or TPSERVE_HUGEPAGES=0)")
    lin = nn.Linear(2048, 4096, bias=False).requires_grad_(False)  # 32 MiB
    # (torch's own allocation may sit on huge pages already, after earlier tests: not asserted)
    assert hugepages.pack_on_huge_pages(lin) >= 32 << 20
    assert _huge_kib(lin.weight.data_ptr()) >= 16 << 10  # most of the 32 MiB (pages are advice)


def test_off_by_environment_and_for_tensors_that_need_grad(monkeypatch):
    lin = nn.Linear(64, 64)
    ptr = lin.weight.data_ptr()
    assert hugepages.pack_on_huge_pages(lin) == 0  # needs grad: a trainer's tensors stay put
    lin.requires_grad_(False)
    monkeypatch.setenv("TPSERVE_HUGEPAGES", "0")
    assert not hugepages.enabled() and hugepages.pack_on_huge_pages(lin) == 0
    assert lin.weight.data_ptr() == ptr
