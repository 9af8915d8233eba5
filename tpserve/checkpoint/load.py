"""Loading a sharded checkpoint at any TP degree.

At the saved degree each rank reads only its own file; at another degree each rank reads only
the byte ranges of the old files that overlap its new slice (rounded out to checksum chunks).
Every byte used is checked against its chunk's CRC before ``load_model`` returns, and all ranks
agree on any error, so a damaged checkpoint fails on every rank with one message. On CPU, when
dtypes match and a parameter is one contiguous span of a file, the parameter is a view of the
memory-mapped file rather than a copy: no second copy of the weights in RAM.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tpserve.parallel.shards import param_shards
from tpserve.utils.threads import run_in_threads

from .manifest import (
    DTYPE_NAMES,
    Manifest,
    ShardRecord,
    TensorRecord,
    read_manifest,
)
from .safetensors_io import CheckpointError, read_header
from .sharded import _CRC, _narrow, crc32


@dataclass(frozen=True)
class Piece:
    """Copy ``src`` (along ``axis``) of rank ``rank``'s shard of ``name`` into ``dst`` of the
    destination, after checking checksum chunks ``chunks`` of that shard. ``axis`` None: whole."""

    name: str
    rank: int
    axis: int | None
    src: tuple[int, int]
    dst: tuple[int, int]
    chunks: tuple[int, int]


def _tensor_of_shape(manifest: Manifest, name: str, full_shape) -> TensorRecord:
    """The manifest's record of ``name``, checked against the shape config.json implies."""
    t = manifest.tensors.get(name)
    if t is None:
        raise CheckpointError(f"{manifest.manifest_path}: tensor {name} is missing from the checkpoint (the model "
                              f"config.json describes has it)")
    if tuple(t.shape) != tuple(full_shape):
        raise CheckpointError(f"{manifest.manifest_path}: tensor {name}: checkpoint shape {list(t.shape)}, the model "
                              f"expects {list(full_shape)} (does config.json match the weights?)")
    return t


def plan_reads(manifest: Manifest, name: str, want, rank: int) -> list[Piece]:
    """Which bytes of which old rank files fill ``want`` (a layout ``Shard``) on ``rank``.

    A rank's own file is used when it holds the whole slice (always, at the saved degree);
    otherwise the owned regions that overlap the slice, which tile it exactly.
    """
    t = _tensor_of_shape(manifest, name, want.full_shape)
    candidates = [s for s in (t.shard_of(rank), t.shard_of(rank % manifest.tp)) if s is not None]
    if t.split_dim is None:  # whole on every rank: read one copy
        holder = (candidates or [s for s in t.shards if s.owned[0] < s.owned[1]])[0]
        if want.dim is None:
            return [Piece(name, holder.rank, None, (0, 1), (0, 1), (0, 1))]
        return [Piece(name, holder.rank, want.dim, (want.start, want.end), (0, want.end - want.start), (0, 1))]
    d = t.split_dim
    if want.dim is not None and want.dim != d:
        raise CheckpointError(f"{manifest.manifest_path}: tensor {name} is split along dim {d} in the checkpoint but "
                              f"dim {want.dim} in this model (saved by a different tpserve version?); re-convert it")
    a, b = (want.start, want.end) if want.dim is not None else (0, t.shape[d])

    def piece(s: ShardRecord, lo: int, hi: int) -> Piece:
        local_lo, local_hi = lo - s.start, hi - s.start
        hit = [c for c, (c0, c1) in enumerate(t.spans(s)) if c0 < local_hi and local_lo < c1]
        return Piece(name, s.rank, d, (local_lo, local_hi), (lo - a, hi - a), (hit[0], hit[-1] + 1))

    for s in candidates:
        if s.start <= a and b <= s.end:
            return [piece(s, a, b)]
    pieces = []
    for s in sorted(t.shards, key=lambda s: s.owned):
        lo, hi = max(a, s.owned[0]), min(b, s.owned[1])
        if lo < hi:
            pieces.append(piece(s, lo, hi))
    return pieces


def piece_bytes(manifest: Manifest, p: Piece) -> int:
    """Bytes a rank reads (and checks) for ``p``: its checksum chunks, whole."""
    t = manifest.tensors[p.name]
    s = t.shard_of(p.rank)
    if t.split_dim is None:
        return s.nbytes
    spans = t.spans(s)
    return (spans[p.chunks[1] - 1][1] - spans[p.chunks[0]][0]) * (s.nbytes // (s.end - s.start))


@dataclass
class _OpenFile:
    path: Path
    base: torch.Tensor  # the whole file as uint8, memory-mapped (copy-on-write)


def _open_rank(manifest: Manifest, rank: int) -> _OpenFile:
    """Map rank ``rank``'s file after checking that it is there, has the manifest's size and a
    header that agrees with the manifest: a damaged file fails here, before any data is used."""
    rec = manifest.files[rank]
    path = manifest.file_path(rank)
    held = sorted(((t, s) for t in manifest.tensors.values() for s in t.shards if s.rank == rank),
                  key=lambda ts: ts[1].offset)
    if not path.is_file():
        example = f" (it holds {len(held)} tensors, e.g. {held[0][0].name})" if held else ""
        raise CheckpointError(f"{path}: rank {rank}'s file is missing{example}; restore it or re-save the checkpoint")
    size = path.stat().st_size
    if size != rec.size:
        if size < rec.size:
            cut = next(((t, s) for t, s in held if s.offset + s.nbytes > size), None)
            what = (f"tensor {cut[0].name} (bytes {cut[1].offset}..{cut[1].offset + cut[1].nbytes}) is cut off"
                    if cut else "its end is missing")
            raise CheckpointError(f"{path}: file has {size} bytes but the manifest says {rec.size}: {what} "
                                  f"(truncated file?); restore it or re-save the checkpoint")
        raise CheckpointError(f"{path}: file has {size} bytes but the manifest says {rec.size} (replaced or appended "
                              f"to?); restore it or re-save the checkpoint")
    refs = read_header(path)
    for t, s in held:
        ref = refs.get(t.name)
        if ref is None or (ref.offset, ref.shape, ref.dtype) != (s.offset, t.local_shape(s), t.dtype):
            got = "absent" if ref is None else f"{DTYPE_NAMES[ref.dtype]} {list(ref.shape)} at byte {ref.offset}"
            raise CheckpointError(f"{path}: tensor {t.name}: the file's header disagrees with the manifest (file: {got}; "
                                  f"manifest: {DTYPE_NAMES[t.dtype]} {list(t.local_shape(s))} at byte {s.offset}); the "
                                  f"file was replaced or damaged, restore it or re-save the checkpoint")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return _OpenFile(path, torch.frombuffer(mm, dtype=torch.uint8))


def _shard_view(f: _OpenFile, t: TensorRecord, s: ShardRecord) -> torch.Tensor:
    """The shard as a tensor over the mapped file (a copy only if a foreign file misaligned it)."""
    shape = t.local_shape(s)
    if s.nbytes == 0:
        return torch.empty(shape, dtype=t.dtype)
    raw = f.base[s.offset:s.offset + s.nbytes]
    if s.offset % t.dtype.itemsize:
        raw = raw.clone()
    return raw.view(t.dtype).view(shape)


def _check_chunks(f: _OpenFile, t: TensorRecord, s: ShardRecord, chunks: tuple[int, int]) -> int:
    """CRC-check chunks ``chunks`` of a shard; returns their bytes."""
    view = _shard_view(f, t, s)
    spans = t.spans(s)
    n = 0
    for c in range(*chunks):
        lo, hi = spans[c]
        region = view if t.split_dim is None else view.narrow(t.split_dim, lo, hi - lo)
        data = _CRC.bytes_of(region)
        crc = crc32(data)
        if crc != s.crc32[c]:
            where = "its data" if t.split_dim is None else f"indices {s.start + lo}..{s.start + hi} of dim {t.split_dim}"
            raise CheckpointError(f"{f.path}: tensor {t.name}: checksum mismatch in {where} (crc32 {crc:08x}, manifest "
                                  f"{s.crc32[c]:08x}); the file is damaged, restore it or re-save the checkpoint")
        n += len(data)
    return n


def _fill(dest: torch.Tensor, pieces: list[Piece], manifest: Manifest, files: dict[int, _OpenFile]) -> int:
    """Check and copy every piece into ``dest``; returns the bytes checked."""
    n = 0
    for p in pieces:
        t = manifest.tensors[p.name]
        s = t.shard_of(p.rank)
        n += _check_chunks(files[p.rank], t, s, p.chunks)
        with torch.no_grad():
            _narrow(dest, p.axis, p.dst).copy_(_narrow(_shard_view(files[p.rank], t, s), p.axis, p.src))
    return n


def _fill_param(param: nn.Parameter, pieces: list[Piece], manifest: Manifest, files: dict[int, _OpenFile],
                zero_copy: bool) -> int:
    """Fill a parameter; on CPU with matching dtype and one contiguous source span, make it a
    view of the mapped file instead (checked all the same)."""
    # only where the parameter's memory is plain C order (not e.g. the transposed decode layout)
    if zero_copy and len(pieces) == 1 and param.device.type == "cpu" and param.is_contiguous():
        p = pieces[0]
        t = manifest.tensors[p.name]
        s = t.shard_of(p.rank)
        if t.dtype == param.dtype and s.offset % t.dtype.itemsize == 0:
            view = _narrow(_shard_view(files[p.rank], t, s), p.axis, p.src)
            if view.is_contiguous() and view.shape == param.shape and view.numel():
                n = _check_chunks(files[p.rank], t, s, p.chunks)
                param.data = view
                return n
    return _fill(param.data, pieces, manifest, files)


def _load_local(model: nn.Module, path: Path, rank: int, threads: int, progress: bool, zero_copy: bool) -> int:

    manifest = read_manifest(path)
    shards = param_shards(model)
    params = dict(model.named_parameters())
    plans = {name: plan_reads(manifest, name, shard, rank) for name, shard in shards.items()}
    files = {r: _open_rank(manifest, r) for r in sorted({p.rank for ps in plans.values() for p in ps})}
    sizes = {name: sum(piece_bytes(manifest, p) for p in ps) for name, ps in plans.items()}

    def run(name: str, advance) -> int:
        n = _fill_param(params[name], plans[name], manifest, files, zero_copy)
        advance(n)
        return n

    biggest_first = sorted(plans, key=sizes.get, reverse=True)
    return sum(run_in_threads(run, biggest_first, threads, total=sum(sizes.values()), desc="loading checkpoint",
                              progress=progress))


def load_sharded_weights(model: nn.Module, path: str | os.PathLike, group: dist.ProcessGroup | None = None,
                         threads: int = 8, progress: bool = True, zero_copy: bool = True) -> int:
    """Fill ``model`` (this rank's shard, any TP degree) from the tpserve checkpoint at ``path``.

    Every byte used is CRC-checked first; if any rank fails, every rank raises that error, so
    none waits in a collective. Returns the bytes this rank read.
    """
    from tpserve.parallel import get_group, group_rank
    from tpserve.parallel.agree import describe, gather_agreed

    group = get_group(group)
    rank = group_rank(group)
    failure, nbytes = None, 0
    try:
        nbytes = _load_local(model, Path(path), rank, threads, progress and rank == 0, zero_copy)
    except Exception as exc:  # any failure must reach the other ranks, or they wait in the collective below
        failure = describe(exc, (CheckpointError,))
    gather_agreed(None, failure, group, CheckpointError)
    return nbytes
