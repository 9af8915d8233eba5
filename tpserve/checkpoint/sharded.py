"""Sharded tpserve checkpoints: save on every rank (or convert in one process), load at any TP
degree, verify, and find the newest complete one under a training root.

The format is in docs/checkpoint-format.md: a directory with one safetensors file per rank
holding exactly that rank's shards (transformers names, logical layout) and a manifest,
``tpserve.json``, that says where every shard lives, which rank owns which region, and the CRC32
of every file and of every ~1 MiB chunk of every shard.

Saving is atomic: files are written into a hidden sibling directory, fsynced, the manifest is
written last, and one rename publishes the directory, so a crash at any point leaves either the
old state or the new one, never a directory that looks complete and is not.

Loading at the saved degree reads only the rank's own file; at another degree each rank reads
only the byte ranges of the old files that overlap its new slice (rounded out to checksum
chunks). Every byte used is checked against its chunk's CRC before ``load_model`` returns, and
all ranks agree on any error, so a damaged checkpoint fails on every rank with one message. On
CPU, when dtypes match and a parameter is one contiguous span of a file, the parameter is a
view of the memory-mapped file rather than a copy: no second copy of the weights in RAM.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import json
import math
import mmap
import os
import re
import secrets
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from tpserve.parallel.shards import param_shards
from tpserve.utils.fs import fsync_path, pid_alive
from tpserve.version import __version__

from .manifest import (
    DTYPE_NAMES,
    MANIFEST_NAME,
    Manifest,
    ShardRecord,
    TensorRecord,
    build_manifest,
    chunk_length,
    chunk_spans,
    dump_manifest,
    layout_ownership,
    owned_cut,
    rank_file_name,
    read_manifest,
)
from .safetensors_io import CheckpointError, _bytes_view, open_checkpoint, read_header

try:  # ISA-L's CRC32 is zlib's function (same polynomial, same values) at ~20 instead of ~4 GB/s
    from isal.isal_zlib import crc32
    CRC32_IMPL = "isal"
except ImportError:
    from zlib import crc32
    CRC32_IMPL = "zlib"

# Files that travel with the weights, copied from the source directory when present.
AUX_PATTERNS = ("config.json", "generation_config.json", "tokenizer*.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
DATA_ALIGN = 64  # the header is padded so tensor data starts here: mmap'd shards are aligned for their dtype
_READ_STEP = 64 << 20
_WRITE_STEP = 16 << 20


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Does ``path`` hold a committed tpserve checkpoint (its manifest exists)?"""
    return (Path(path) / MANIFEST_NAME).is_file()


# ================================================================================== helpers


class _Scratch(threading.local):
    """A per-thread reusable buffer: fresh memory costs page faults, which cost more than the copy."""

    buf: torch.Tensor | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
        return self.buf[:nbytes]

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.take(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)

    def bytes_of(self, t: torch.Tensor) -> memoryview:
        """``t``'s bytes in C order: a view when it is contiguous, else a copy made here."""
        if t.numel() == 0:
            return memoryview(b"")
        if not t.is_contiguous():
            dst = self.tensor(tuple(t.shape), t.dtype)
            dst.copy_(t)
            t = dst
        return _bytes_view(t)


_OUT = _Scratch()  # shards being converted
_CRC = _Scratch()  # strided checksum chunks


def _narrow(t: torch.Tensor, axis: int | None, span: tuple[int, int]) -> torch.Tensor:
    return t if axis is None else t.narrow(axis, span[0], span[1] - span[0])


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"


def _raise_agreed(errors: list[tuple[int, tuple[str, str]]], rank: int) -> None:
    """Raise the first rank's error on every rank (its own text on that rank, "rank r: ..." elsewhere)."""
    r, (kind, text) = errors[0]
    text = text if r == rank else f"rank {r}: {text}"
    raise FileExistsError(text) if kind == "FileExistsError" else CheckpointError(text)


def _caught(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc) if isinstance(exc, (CheckpointError, FileExistsError)) else _error_text(exc)


# ================================================================================== writing


@dataclass(frozen=True)
class _Entry:
    """One tensor going into a rank file, in its local (this rank's) shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    split_dim: int | None
    cut: int  # local index where this rank's owned region starts (see manifest.chunk_spans)


def _entries(shards: dict, rank: int, owners: dict, dtype_of: Callable[[str], torch.dtype]) -> list[_Entry]:
    """What rank ``rank``'s file holds: each tensor's local shape, and where its checksum chunks are cut."""
    out = []
    for name, s in shards.items():
        shape = list(s.full_shape)
        cut = 0
        if s.dim is not None:
            shape[s.dim] = s.end - s.start
            cut = owned_cut(s.start, s.end, owners[name][rank])
        out.append(_Entry(name, dtype_of(name), tuple(shape), s.dim, cut))
    return out


def _write_all(fd: int, data: memoryview) -> None:
    """Write in 16 MiB steps: one huge write() measured ~10x slower here (0.4 vs 5 GB/s)."""
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:done + _WRITE_STEP])


def _chunk_crcs(t: torch.Tensor, e: _Entry, chunk: int) -> list[int]:
    """CRC32 of each checksum chunk of ``t`` (a range of the split dimension), each chunk's
    bytes taken in C order (docs/checkpoint-format.md)."""
    if e.split_dim is None:
        return [crc32(_CRC.bytes_of(t))]
    spans = chunk_spans(t.shape[e.split_dim], e.cut, chunk)
    return [crc32(_CRC.bytes_of(t.narrow(e.split_dim, lo, hi - lo))) for lo, hi in spans]


def _write_rank_file(path: Path, rank: int, tp: int, entries: list[_Entry],
                     fetch: Callable[[_Entry], torch.Tensor], on_bytes: Callable[[int], None] | None = None) -> dict:
    """Write one rank's safetensors file, checksumming as it goes; fsynced before it returns.

    Tensors are ordered by element size (largest first) so every shard starts aligned for its
    dtype with no gaps, as safetensors requires. Returns what the manifest needs to know.
    """
    order = sorted(entries, key=lambda e: -e.dtype.itemsize)
    header: dict = {"__metadata__": {"format": "pt", "tpserve_rank": str(rank), "tpserve_tp_size": str(tp)}}
    pos = 0
    for e in order:
        n = math.prod(e.shape) * e.dtype.itemsize
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)
    prefix = len(raw).to_bytes(8, "little") + raw
    tensors = {}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(prefix))
        crc = crc32(prefix)
        for e in order:
            t = fetch(e)
            if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                raise CheckpointError(f"{path}: tensor {e.name}: got {t.dtype} {list(t.shape)} to write, expected "
                                      f"{e.dtype} {list(e.shape)}")
            data = _bytes_view(t) if t.numel() else memoryview(b"")
            crc = crc32(data, crc)
            chunk = chunk_length(e.shape, e.split_dim, e.dtype.itemsize)
            begin = len(prefix) + header[e.name]["data_offsets"][0]
            tensors[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "offsets": [begin, begin + len(data)], "chunk": chunk,
                               "crc32": _chunk_crcs(t, e, chunk)}
            _write_all(fd, data)
            if on_bytes is not None:
                on_bytes(len(data))
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return {"rank": rank, "file": path.name, "size": size, "crc32": crc, "tensors": tensors}


def check_save_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """The absolute target directory, or an error if a checkpoint may not be saved there.

    A new or empty directory is fine; an existing tpserve checkpoint only with ``overwrite``;
    anything else (a transformers model directory, say) never, so a typo cannot delete data.
    """
    final = Path(path).expanduser().absolute()
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a directory; save the checkpoint to a new directory")
    if is_checkpoint(final):
        if not overwrite:
            raise FileExistsError(f"{final} already holds a tpserve checkpoint; pass overwrite=True (--overwrite) "
                                  f"to replace it, or save to a new directory")
    elif final.is_dir() and any(final.iterdir()):
        raise FileExistsError(f"{final} exists, is not empty and is not a tpserve checkpoint; refusing to replace "
                              f"it: save to a new or empty directory")
    return final


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _remove_stale_tmp(final: Path) -> None:
    """Delete temporary directories of earlier saves to ``final`` whose process died (this host only:
    a pid means nothing on another machine sharing the directory)."""
    host = socket.gethostname()
    for d in final.parent.glob(_tmp_prefix(final) + "*"):
        try:
            d_host, pid, _ = d.name[len(_tmp_prefix(final)):].rsplit("-", 2)
            if d_host == host and not pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
        except ValueError:
            continue


def _make_tmp(final: Path, overwrite: bool) -> Path:
    check_save_target(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = final.parent / f"{_tmp_prefix(final)}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Make the finished ``tmp`` visible as ``final``: one rename (or an atomic swap with the old
    checkpoint when overwriting), so readers see the old checkpoint or the new one."""
    try:
        os.rename(tmp, final)  # also replaces an empty directory
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not (overwrite and is_checkpoint(final)):
            raise FileExistsError(f"{final} was filled by someone else while saving; not replacing it") from None
        if not _exchange(tmp, final):
            old = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(final, old)
            os.rename(tmp, final)
            tmp = old
        shutil.rmtree(tmp, ignore_errors=True)  # the replaced checkpoint
    fsync_path(final.parent)


def _copy_aux(src: Path | None, tmp: Path, config) -> dict:
    """Copy config, tokenizer and generation files from ``src``; write config.json from the
    live model's config if the source has none. Returns the config as saved."""
    if src is not None and Path(src).is_dir():
        for pattern in AUX_PATTERNS:
            for f in sorted(Path(src).glob(pattern)):
                if f.is_file():
                    shutil.copyfile(f, tmp / f.name)
                    fsync_path(tmp / f.name)
    cfg = tmp / "config.json"
    if not cfg.is_file():
        if config is None:
            raise CheckpointError(f"{src}: no config.json to save with the checkpoint")
        config.to_json_file(cfg)
        fsync_path(cfg)
    return json.loads(cfg.read_text())


def _finish(tmp: Path, final: Path, aux_src: Path | None, config, layouts: list[dict], records: list[dict],
            overwrite: bool) -> None:
    """Rank files are written and fsynced: add config and tokenizer, the manifest last, publish."""
    for rec in records:
        f = tmp / rec["file"]
        if not f.is_file() or f.stat().st_size != rec["size"]:
            raise CheckpointError(f"{f}: rank {rec['rank']}'s file is not visible (complete) from rank 0; save to a "
                                  f"directory every rank shares")
    cfg = _copy_aux(aux_src, tmp, config)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    text = dump_manifest(build_manifest(cfg, len(records), layouts, records, created, __version__))
    mpath = tmp / MANIFEST_NAME
    mpath.write_text(text)
    fsync_path(mpath)
    fsync_path(tmp)
    _publish(tmp, final, overwrite)


def _host_tensor(p: torch.Tensor) -> torch.Tensor:
    t = p.detach()
    return (t.cpu() if t.device.type != "cpu" else t).contiguous()


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False,
                    group: dist.ProcessGroup | None = None) -> Path:
    """Save this rank's shards of ``model`` into the checkpoint directory ``path``.

    Every rank of the group calls it; each writes its own file in parallel, rank 0 adds the
    config, tokenizer and manifest and publishes the directory. All ranks return the same path
    or raise the same error. ``path`` must be on storage every rank can see. ``group``
    defaults to the model's own (a native tpserve model's), else the default group.
    """
    from tpserve.parallel import all_gather_object, broadcast_object, get_group, group_rank, group_size

    group = get_group(group if group is not None else getattr(model, "group", None))  # a native model knows its own
    rank, tp = group_rank(group), group_size(group)
    final = Path(path).expanduser().absolute()
    tmp, err = None, None
    if rank == 0:
        try:
            tmp = str(_make_tmp(final, overwrite))
        except Exception as exc:
            err = _caught(exc)
    tmp, err = broadcast_object((tmp, err) if rank == 0 else None, 0, group)
    if err:
        _raise_agreed([(0, err)], rank)
    # Any failure must reach the other ranks (or they would wait in the next collective): each
    # step's outcome travels with the gather that ends it.
    shards, err = None, None
    try:
        shards = param_shards(model)
    except Exception as exc:
        err = _caught(exc)
    gathered = all_gather_object((shards, err), group)  # every rank's cut: ownership decides the checksum chunks
    errors = [(r, g[1]) for r, g in enumerate(gathered) if g[1]]
    layouts = [g[0] for g in gathered]
    if not errors:
        record = None
        try:
            params = dict(model.named_parameters())
            entries = _entries(shards, rank, layout_ownership(layouts), lambda n: params[n].dtype)
            record = _write_rank_file(Path(tmp) / rank_file_name(rank, tp), rank, tp, entries,
                                      lambda e: _host_tensor(params[e.name]))
        except Exception as exc:
            err = _caught(exc)
        gathered = all_gather_object((record, err), group)
        errors = [(r, g[1]) for r, g in enumerate(gathered) if g[1]]
    if rank == 0 and not errors:
        try:
            _finish(Path(tmp), final, getattr(model, "source_path", None), getattr(model, "config", None),
                    layouts, [g[0] for g in gathered], overwrite)
        except Exception as exc:
            errors = [(0, _caught(exc))]
    if rank == 0 and errors:
        shutil.rmtree(tmp, ignore_errors=True)
    errors = broadcast_object(errors if rank == 0 else None, 0, group)
    if errors:
        _raise_agreed(errors, rank)
    return final


# ================================================================================== reading


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


def _record(manifest: Manifest, name: str, full_shape) -> TensorRecord:
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
    t = _record(manifest, name, want.full_shape)
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
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="loading checkpoint", leave=False,
                   disable=None, mininterval=0.25)
    lock = threading.Lock()

    def run(name: str) -> int:
        n = _fill_param(params[name], plans[name], manifest, files, zero_copy)
        if bar is not None:
            with lock:
                bar.update(n)
        return n

    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = [pool.submit(run, name) for name in sorted(plans, key=sizes.get, reverse=True)]
            return sum(f.result() for f in futures)
    finally:
        if bar is not None:
            bar.close()


def load_sharded_weights(model: nn.Module, path: str | os.PathLike, group: dist.ProcessGroup | None = None,
                         threads: int = 8, progress: bool = True, zero_copy: bool = True) -> int:
    """Fill ``model`` (this rank's shard, any TP degree) from the tpserve checkpoint at ``path``.

    Every byte used is CRC-checked first; if any rank fails, every rank raises that error, so
    none waits in a collective. Returns the bytes this rank read.
    """
    from tpserve.parallel import all_gather_object, get_group, group_rank

    group = get_group(group)
    rank = group_rank(group)
    error, nbytes = None, 0
    try:
        nbytes = _load_local(model, Path(path), rank, threads, progress and rank == 0, zero_copy)
    except Exception as exc:  # any failure must reach the other ranks, or they wait in the collective below
        error = _error_text(exc)
    bad = [(r, e) for r, e in enumerate(all_gather_object(error, group)) if e]
    if bad:
        r, e = bad[0]
        raise CheckpointError(e if r == rank else f"rank {r}: {e}")
    return nbytes


# ================================================================================== converting (models.convert supplies the layout)


def _transformers_source(path: Path, shards: dict):
    """(dtype_of, read) for a transformers directory: ranged reads of each slice. Every tensor
    the model needs (``shards``: name -> layout Shard) is checked up front."""
    refs = open_checkpoint(path)
    for name, s in shards.items():
        r = refs.get(name)
        if r is None:
            raise CheckpointError(f"{path}: tensor {name} is missing from the checkpoint")
        if tuple(r.shape) != tuple(s.full_shape):
            raise CheckpointError(f"{r.path}: tensor {name}: shape {list(r.shape)}, the model config.json describes "
                                  f"expects {list(s.full_shape)}")

    def read(name: str, shard, out: torch.Tensor, rank: int) -> None:
        refs[name].read_into(out, shard.dim, shard.start, shard.end)

    return (lambda name: refs[name].dtype), read


def _tpserve_source(path: Path, shards: dict):
    """(dtype_of, read) for a tpserve checkpoint: chunk-checked ranged reads, as when loading."""
    manifest = read_manifest(path)
    for name, s in shards.items():
        plan_reads(manifest, name, s, 0)  # raises for a missing tensor or a shape mismatch
    files: dict[int, _OpenFile] = {}
    lock = threading.Lock()

    def dtype_of(name: str) -> torch.dtype:
        return manifest.tensors[name].dtype

    def read(name: str, shard, out: torch.Tensor, rank: int) -> None:
        pieces = plan_reads(manifest, name, shard, rank)
        with lock:
            for r in {p.rank for p in pieces} - files.keys():
                files[r] = _open_rank(manifest, r)
        _fill(out, pieces, manifest, files)

    return dtype_of, read


def write_converted(src_dir: Path, output: str | os.PathLike, config, layouts: list[dict], *,
                    overwrite: bool = False, progress: bool = True) -> Path:
    """Write the model at ``src_dir`` (transformers directory or tpserve checkpoint) as a tpserve
    checkpoint cut as ``layouts`` says (one ``param_shards`` dict per rank; ``models.convert``
    asks the model for them), in this one process: each rank file is written by its own thread
    from ranged reads of the source."""
    tp = len(layouts)
    final = check_save_target(output, overwrite)
    dtype_of, read = (_tpserve_source if is_checkpoint(src_dir) else _transformers_source)(src_dir, layouts[0])
    owners = layout_ownership(layouts)
    entries = [_entries(layouts[r], r, owners, dtype_of) for r in range(tp)]
    total = sum(math.prod(e.shape) * e.dtype.itemsize for es in entries for e in es)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"converting to TP={tp}", leave=False, disable=None,
                   mininterval=0.25)
    lock = threading.Lock()

    def tick(n: int) -> None:
        if bar is not None:
            with lock:
                bar.update(n)

    def write(rank: int) -> dict:
        def fetch(e: _Entry) -> torch.Tensor:
            out = _OUT.tensor(e.shape, e.dtype)
            read(e.name, layouts[rank][e.name], out, rank)
            return out

        return _write_rank_file(tmp / rank_file_name(rank, tp), rank, tp, entries[rank], fetch, tick)

    tmp = _make_tmp(final, overwrite)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(tp, os.cpu_count() or 1))) as pool:
            records = list(pool.map(write, range(tp)))
        _finish(tmp, final, src_dir, config, layouts, records, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return final


# ================================================================================== verifying


def _check_expected(manifest: Manifest, expected: dict[str, tuple[int, ...]]) -> None:
    """The manifest's tensors are exactly ``expected`` (name -> full shape)."""
    for name, shape in expected.items():
        _record(manifest, name, shape)
    extra = sorted(set(manifest.tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{manifest.manifest_path}: tensor {extra[0]} is not part of the model config.json "
                              f"describes")


def verify(path: str | os.PathLike, expected: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Check a checkpoint's data completely: manifest consistency (owned regions tile every
    tensor), config.json present, and for every rank file its presence, size, header, every
    chunk's CRC and the whole file's CRC; with ``expected`` (name -> full shape, what config.json
    describes: ``models.convert.verify`` passes it), that the tensors are exactly those. Raises
    CheckpointError naming the first bad file and tensor."""
    path = Path(path)
    if not is_checkpoint(path):
        latest = find_latest_checkpoint(path) if path.is_dir() else None
        if latest is not None and latest != path:
            raise CheckpointError(f"{path}: no {MANIFEST_NAME} here; it is a training root, verify a step directory "
                                  f"(newest complete: {latest})")
        raise CheckpointError(f"{path}: no {MANIFEST_NAME}: not a tpserve checkpoint, or a save that never finished")
    manifest = read_manifest(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path / 'config.json'}: missing; copy it back from the model the checkpoint came from")
    if expected is not None:
        _check_expected(manifest, expected)
    files = {r: _open_rank(manifest, r) for r in range(manifest.tp)}
    for r, f in files.items():
        held = sorted(((t, s) for t in manifest.tensors.values() for s in t.shards if s.rank == r),
                      key=lambda ts: ts[1].offset)
        for t, s in held:
            _check_chunks(f, t, s, (0, len(s.crc32)))
        crc = 0
        data = _bytes_view(f.base)
        for at in range(0, len(data), _READ_STEP):
            crc = crc32(data[at:at + _READ_STEP], crc)
        if crc != manifest.files[r].crc32:
            raise CheckpointError(f"{f.path}: file checksum mismatch outside tensor data (header): crc32 {crc:08x}, "
                                  f"manifest {manifest.files[r].crc32:08x}; restore it or re-save the checkpoint")
    return {"path": str(path), "tp": manifest.tp, "files": manifest.tp, "tensors": len(manifest.tensors),
            "bytes": sum(f.size for f in manifest.files)}


# ================================================================================== training roots


def checkpoint_problem(path: str | os.PathLike, verify_data: bool = False) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is. Without ``verify_data`` this
    is cheap (manifest, config.json, every file present with its size); with it, ``verify``
    (every checksum)."""
    path = Path(path)
    try:
        if verify_data:
            verify(path)
            return None
        manifest = read_manifest(path)
        for f in manifest.files:
            p = path / f.name
            if not p.is_file():
                return f"{f.name} is missing"
            if p.stat().st_size != f.size:
                return f"{f.name} has {p.stat().st_size} bytes, the manifest says {f.size}"
        if not (path / "config.json").is_file():
            return "config.json is missing"
    except (CheckpointError, OSError) as exc:
        return str(exc)
    return None


def _step_key(d: Path) -> tuple[int, int]:
    """Newest first by the last number in the name (step-200 > step-100), then by commit time."""
    m = re.search(r"(\d+)\D*$", d.name)
    try:
        mtime = (d / MANIFEST_NAME).stat().st_mtime_ns
    except OSError:
        mtime = 0
    return (int(m.group(1)) if m else -1, mtime)


def _step_dirs(root: Path) -> list[Path]:
    """Subdirectories that are (or were meant to be) checkpoints; hidden ones are saves in flight."""
    out = []
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(".") and (is_checkpoint(d) or any(d.glob("rank-*.safetensors"))):
            out.append(d)
    return sorted(out, key=_step_key, reverse=True)


def find_latest_checkpoint(root: str | os.PathLike, verify_data: bool = False) -> Path | None:
    """The newest complete checkpoint under a training root (``root/step-100``, ``root/step-200``,
    ...), or ``root`` itself if it is one; None if there is none. Incomplete or half-written
    step directories are skipped; with ``verify_data`` so are ones whose checksums fail."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    if is_checkpoint(root):
        return root if checkpoint_problem(root, verify_data) is None else None
    for d in _step_dirs(root):
        if is_checkpoint(d) and checkpoint_problem(d, verify_data) is None:
            return d
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """``path`` if it is a tpserve checkpoint; the newest complete one if ``path`` is a training
    root; None if it is neither (a transformers directory, for instance)."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    if (path / "config.json").is_file() or not path.is_dir():
        return None
    steps = _step_dirs(path)
    if not steps:
        return None
    latest = find_latest_checkpoint(path)
    if latest is None:
        why = "; ".join(f"{d.name}: {checkpoint_problem(d) or 'incomplete'}" for d in steps[:3])
        raise CheckpointError(f"{path}: none of its {len(steps)} checkpoint directories is complete ({why})")
    return latest
