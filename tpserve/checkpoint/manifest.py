"""The manifest of a tpserve sharded checkpoint (``tpserve.json``): building, reading, checking.

The format is specified in docs/checkpoint-format.md. Everything a loader trusts about the rank
files comes from here, so ``read_manifest`` checks the manifest's own consistency (every range
inside its tensor, byte spans that fit their shapes, owned regions tiling every tensor exactly)
before any file is opened: a damaged manifest is reported as such, not as odd reads later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tpserve.parallel.partition import slice_shape
from tpserve.utils.dtypes import SAFETENSORS_CODES

from .safetensors_io import DTYPES, CheckpointError

MANIFEST_NAME = "tpserve.json"
FORMAT_NAME = "tpserve-sharded-checkpoint"
FORMAT_VERSION = 1
CHECKSUM = "crc32"
# Checksums cover ~1 MiB pieces of each shard, cut along its split dimension, so a resharding
# rank can check the bytes it reads without reading the rest of an old shard.
CHUNK_BYTES = 1 << 20
DTYPE_NAMES = SAFETENSORS_CODES  # torch dtype -> safetensors code, as the manifest writes it


def rank_file_name(rank: int, tp: int) -> str:
    return f"rank-{rank:05d}-of-{tp:05d}.safetensors"


@dataclass(frozen=True)
class ShardRecord:
    """What one rank's file holds of one tensor."""

    rank: int
    start: int  # held range along the split dimension (whole tensors: 0, 1)
    end: int
    owned: tuple[int, int]  # the part this rank owns; empty (start == end) when a neighbour owns it all
    offset: int  # absolute byte offset of the shard's data in the rank file
    nbytes: int
    chunk: int  # indices of the split dimension per checksum chunk (whole tensors: 1)
    crc32: tuple[int, ...]


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]  # the full (unsplit) shape
    dtype: torch.dtype
    split_dim: int | None  # None: whole on every rank (replicated)
    shards: tuple[ShardRecord, ...]

    @property
    def extent(self) -> int:
        """Length of the axis ranges and ownership are measured on; a whole tensor is one unit."""
        return self.shape[self.split_dim] if self.split_dim is not None else 1

    def local_shape(self, shard: ShardRecord) -> tuple[int, ...]:
        return slice_shape(self.shape, self.split_dim, shard.start, shard.end)

    def spans(self, shard: ShardRecord) -> list[tuple[int, int]]:
        """The shard's checksum chunks as local index ranges of the split dimension."""
        if self.split_dim is None:
            return [(0, 1)]
        return chunk_spans(shard.end - shard.start, owned_cut(shard.start, shard.end, shard.owned), shard.chunk)

    def shard_of(self, rank: int) -> ShardRecord | None:
        for shard in self.shards:
            if shard.rank == rank:
                return shard
        return None


@dataclass(frozen=True)
class FileRecord:
    rank: int
    name: str
    size: int
    crc32: int


@dataclass
class Manifest:
    path: Path  # the checkpoint directory
    tp: int
    config: dict
    files: list[FileRecord]
    tensors: dict[str, TensorRecord]

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def file_path(self, rank: int) -> Path:
        return self.path / self.files[rank].name

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for t in self.tensors.values() for s in t.shards)


def shard_range(dim: int | None, start: int, end: int) -> tuple[int, int]:
    """A layout Shard's range on the manifest's axis: whole tensors are the single unit 0..1."""
    return (0, 1) if dim is None else (start, end)


def ownership(ranges: dict[int, tuple[int, int]], extent: int, what: str) -> dict[int, tuple[int, int]]:
    """Who owns which part of a tensor whose ranks hold ``ranges`` (possibly overlapping, e.g.
    replicated KV heads): in order of range start, each rank owns what no earlier rank does."""
    owned, cursor = {}, 0
    for rank, (start, end) in sorted(ranges.items(), key=lambda kv: (kv[1][0], kv[0])):
        if start > cursor:
            raise CheckpointError(f"{what}: no rank holds indices {cursor}..{start} (the ranks' shards leave a gap)")
        lo = max(start, cursor)
        hi = max(end, cursor)
        owned[rank] = (lo, hi)
        cursor = hi
    if cursor != extent:
        raise CheckpointError(f"{what}: the ranks' shards cover 0..{cursor} of {extent}")
    return owned


def chunk_length(local_shape: tuple[int, ...], split_dim: int | None, itemsize: int) -> int:
    """Indices of the split dimension per checksum chunk: about CHUNK_BYTES per chunk."""
    if split_dim is None:
        return 1
    per_index = math.prod(local_shape[:split_dim] + local_shape[split_dim + 1:]) * itemsize
    return max(1, CHUNK_BYTES // max(1, per_index))


def chunk_spans(length: int, cut: int, chunk: int) -> list[tuple[int, int]]:
    """The checksum chunks of a shard holding ``length`` indices of its split dimension: first
    cut at ``cut`` (where the shard's owned region starts, so a reader of just the owned part
    needs no bytes before it), then every ``chunk`` indices from the start of each part."""
    spans = []
    for lo, hi in ((0, cut), (cut, length)):
        spans += [(i, min(i + chunk, hi)) for i in range(lo, hi, chunk)]
    return spans


def owned_cut(start: int, end: int, owned: tuple[int, int]) -> int:
    """Local index where a shard's owned region starts, if it starts strictly inside; else 0."""
    return owned[0] - start if start < owned[0] < end else 0


def layout_ownership(layouts: list[dict]) -> dict[str, dict[int, tuple[int, int]]]:
    """For every tensor of a TP layout (``layouts[r]``: rank r's ``{name: Shard}``), who owns what."""
    out = {}
    for name, first in layouts[0].items():
        extent = first.full_shape[first.dim] if first.dim is not None else 1
        ranges = {r: shard_range(lay[name].dim, lay[name].start, lay[name].end) for r, lay in enumerate(layouts)}
        out[name] = ownership(ranges, extent, f"tensor {name}")
    return out


# ---------------------------------------------------------------------------------- reading


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {what} (the manifest is damaged or was not written by tpserve; "
                              f"re-save the checkpoint)")


def _int(value, where: str, what: str, low: int = 0) -> int:
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= low, where,
          f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _pair(value, where: str, what: str) -> tuple[int, int]:
    _need(isinstance(value, list) and len(value) == 2, where, f"{what} must be [start, end], got {value!r}")
    lo, hi = _int(value[0], where, what), _int(value[1], where, what)
    _need(lo <= hi, where, f"{what} {value} ends before it starts")
    return lo, hi


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of the checkpoint directory ``path``, checked for internal consistency."""
    path = Path(path)
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST_NAME}: not a tpserve checkpoint, or a save that never finished")
    try:
        raw = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{mpath}: not valid JSON ({exc}); the manifest is damaged, re-save the checkpoint") from None
    where = str(mpath)
    _need(isinstance(raw, dict) and raw.get("format") == FORMAT_NAME, where, f"format is not {FORMAT_NAME!r}")
    version = _int(raw.get("format_version"), where, "format_version", 1)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format version {version} was written by a newer tpserve (this one reads "
                              f"up to {FORMAT_VERSION}); upgrade tpserve")
    _need(raw.get("checksum") == CHECKSUM, where, f"checksum must be {CHECKSUM!r}, got {raw.get('checksum')!r}")
    tp = _int(raw.get("tp_size"), where, "tp_size", 1)
    config = raw.get("config")
    _need(isinstance(config, dict), where, "config must be an object")
    files_raw = raw.get("files")
    _need(isinstance(files_raw, list) and len(files_raw) == tp, where, f"files must list {tp} rank files")
    files = []
    for rank, f in enumerate(files_raw):
        _need(isinstance(f, dict) and f.get("rank") == rank, where, f"files[{rank}] must describe rank {rank}")
        name = f.get("file")
        _need(isinstance(name, str) and name == Path(name).name and not name.startswith("."), where,
              f"files[{rank}].file must be a plain file name, got {name!r}")
        files.append(FileRecord(rank, name, _int(f.get("size"), where, f"{name}: size", 8),
                                _int(f.get("crc32"), where, f"{name}: crc32")))
    tensors_raw = raw.get("tensors")
    _need(isinstance(tensors_raw, dict) and tensors_raw, where, "tensors must be a non-empty object")
    tensors = {name: _tensor(name, t, tp, files, where) for name, t in tensors_raw.items()}
    return Manifest(path, tp, config, files, tensors)


def _tensor(name: str, t, tp: int, files: list[FileRecord], mpath: str) -> TensorRecord:
    where = f"{mpath}: tensor {name}"
    _need(isinstance(t, dict), where, "entry must be an object")
    shape = t.get("shape")
    _need(isinstance(shape, list), where, "shape must be a list")
    shape = tuple(_int(x, where, "shape entry") for x in shape)
    _need(t.get("dtype") in DTYPES, where, f"dtype {t.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[t["dtype"]]
    split = t.get("split_dim")
    if split is not None:
        _need(_int(split, where, "split_dim") < len(shape), where, f"split_dim {split} is outside shape {list(shape)}")
    extent = shape[split] if split is not None else 1
    shards_raw = t.get("shards")
    _need(isinstance(shards_raw, list) and shards_raw, where, "shards must be a non-empty list")
    shards, seen = [], set()
    for s in shards_raw:
        _need(isinstance(s, dict), where, "a shard entry must be an object")
        rank = _int(s.get("rank"), where, "shard rank")
        _need(rank < tp and rank not in seen, where, f"shard rank {rank} is outside 0..{tp - 1} or listed twice")
        seen.add(rank)
        swhere = f"{mpath}: tensor {name} (rank {rank})"
        start, end = _pair(s.get("range"), swhere, "range")
        _need(start < end <= extent, swhere, f"range {start}..{end} is empty or outside 0..{extent}")
        owned = _pair(s.get("owned"), swhere, "owned")
        _need(owned[0] == owned[1] or start <= owned[0] < owned[1] <= end, swhere,
              f"owned {owned[0]}..{owned[1]} is not inside its range {start}..{end}")
        b, e = _pair(s.get("offsets"), swhere, "offsets")
        local = list(shape)
        if split is not None:
            local[split] = end - start
        want = math.prod(local) * dtype.itemsize
        _need(e - b == want, swhere, f"offsets {b}..{e} span {e - b} bytes but shape {local} of {t['dtype']} needs {want}")
        _need(e <= files[rank].size, swhere, f"offsets end at byte {e}, past the {files[rank].size}-byte file "
                                             f"{files[rank].name}")
        chunk = _int(s.get("chunk"), swhere, "chunk", 1)
        crcs = s.get("crc32")
        n = len(chunk_spans(end - start, owned_cut(start, end, owned), chunk)) if split is not None else 1
        _need(isinstance(crcs, list) and len(crcs) == n, swhere, f"crc32 must list {n} chunk checksums")
        shards.append(ShardRecord(rank, start, end, owned, b, want, chunk,
                                  tuple(_int(c, swhere, "crc32 entry") for c in crcs)))
    cursor = 0
    for s in sorted((s for s in shards if s.owned[0] < s.owned[1]), key=lambda s: s.owned):
        _need(s.owned[0] == cursor, where, f"owned regions do not tile the tensor: "
                                            f"{'gap' if s.owned[0] > cursor else 'overlap'} at index {min(cursor, s.owned[0])} "
                                            f"(rank {s.rank} owns {s.owned[0]}..{s.owned[1]})")
        cursor = s.owned[1]
    _need(cursor == extent, where, f"owned regions cover 0..{cursor} of {extent}")
    return TensorRecord(name, shape, dtype, split, tuple(sorted(shards, key=lambda s: s.rank)))


# ---------------------------------------------------------------------------------- writing


def build_manifest(config: dict, tp: int, layouts: list[dict], records: list[dict], created: str,
                   version: str) -> dict:
    """The manifest for ``tp`` rank files. ``layouts[r]``: rank r's ``{name: Shard}`` (from
    ``param_shards`` or ``layout``); ``records[r]``: what writing rank r's file reported."""
    names = list(layouts[0])
    for r in range(1, tp):
        if set(layouts[r]) != set(names):
            extra = sorted(set(layouts[r]) ^ set(names))
            raise CheckpointError(f"rank {r} holds different tensors than rank 0 ({', '.join(extra[:3])})")
    tensors = {}
    for name in names:
        first = layouts[0][name]
        what = f"tensor {name}"
        for r in range(1, tp):
            s = layouts[r][name]
            if (s.dim, tuple(s.full_shape)) != (first.dim, tuple(first.full_shape)):
                raise CheckpointError(f"{what}: rank {r} splits it as dim {s.dim} of {list(s.full_shape)}, rank 0 as "
                                      f"dim {first.dim} of {list(first.full_shape)}")
    owners = layout_ownership(layouts)
    for name in names:
        first = layouts[0][name]
        what = f"tensor {name}"
        ranges = {r: shard_range(layouts[r][name].dim, layouts[r][name].start, layouts[r][name].end) for r in range(tp)}
        owned = owners[name]
        dtype = records[0]["tensors"][name]["dtype"]
        shards = []
        for r in range(tp):
            rec = records[r]["tensors"][name]
            if rec["dtype"] != dtype:
                raise CheckpointError(f"{what}: rank {r} holds {rec['dtype']}, rank 0 {dtype}")
            shards.append({"rank": r, "range": list(ranges[r]), "owned": list(owned[r]), "offsets": rec["offsets"],
                           "chunk": rec["chunk"], "crc32": rec["crc32"]})
        tensors[name] = {"shape": list(first.full_shape), "dtype": dtype, "split_dim": first.dim, "shards": shards}
    files = [{"rank": r, "file": rec["file"], "size": rec["size"], "crc32": rec["crc32"]} for r, rec in enumerate(records)]
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tp_size": tp, "created": created,
            "tpserve_version": version, "checksum": CHECKSUM, "config": config, "files": files, "tensors": tensors}


def dump_manifest(manifest: dict) -> str:
    """JSON text with one line per file and per shard, so a person can read it."""
    dumps = json.dumps
    lines = ["{"]
    for key, value in manifest.items():
        if key == "files":
            body = ",\n".join(f"  {dumps(f)}" for f in value)
            lines.append(f' "files": [\n{body}\n ],')
        elif key == "tensors":
            parts = []
            for name, t in value.items():
                head = {k: v for k, v in t.items() if k != "shards"}
                shards = ",\n".join(f"   {dumps(s)}" for s in t["shards"])
                parts.append(f"  {dumps(name)}: {dumps(head)[:-1]}, \"shards\": [\n{shards}\n  ]}}")
            lines.append(' "tensors": {\n' + ",\n".join(parts) + "\n },")
        else:
            lines.append(f" {dumps(key)}: {dumps(value)},")
    lines[-1] = lines[-1].rstrip(",")
    lines.append("}")
    return "\n".join(lines) + "\n"
