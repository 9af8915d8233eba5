"""Saving a sharded checkpoint from live ranks, and writing one from a model on disk in one
process (``models.convert`` supplies the cut).

Saving is atomic: files are written into a hidden sibling directory, fsynced, the manifest is
written last, and one rename publishes the directory, so a crash at any point leaves either the
old state or the new one, never a directory that looks complete and is not.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from tpserve.parallel.agree import gather_agreed, raise_first
from tpserve.parallel.comm import broadcast_object, group_rank, group_size
from tpserve.parallel.partition import slice_shape
from tpserve.parallel.quantize import quantization_config
from tpserve.parallel.shards import param_shards
from tpserve.parallel.training import model_group
from tpserve.utils.dtypes import DTYPE_NAME
from tpserve.utils.fs import build_dir, fsync_path, publish_dir
from tpserve.utils.threads import run_in_threads
from tpserve.version import __version__

from .load import _fill, _open_rank, _OpenFile, plan_reads
from .manifest import (
    DTYPE_NAMES,
    MANIFEST_NAME,
    build_manifest,
    chunk_length,
    chunk_spans,
    dump_manifest,
    layout_ownership,
    owned_cut,
    rank_file_name,
    read_manifest,
)
from .resume import optimizer_state, write_meta
from .safetensors_io import CheckpointError, _bytes_view, open_checkpoint
from .sharded import (
    _CRC,
    _OUT,
    _WRITE_STEP,
    AUX_PATTERNS,
    DATA_ALIGN,
    OPTIMIZER_DIR,
    _caught,
    crc32,
    is_checkpoint,
)


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
        cut = owned_cut(s.start, s.end, owners[name][rank]) if s.dim is not None else 0
        out.append(_Entry(name, dtype_of(name), slice_shape(s.full_shape, s.dim, s.start, s.end), s.dim, cut))
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


def _make_tmp(final: Path, overwrite: bool) -> Path:
    check_save_target(final, overwrite)
    return build_dir(final)


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Make the finished ``tmp`` visible as ``final`` (``utils.fs.publish_dir``): readers see the
    old checkpoint or the new one."""
    if not publish_dir(tmp, final, replace=overwrite and is_checkpoint(final)):
        raise FileExistsError(f"{final} was filled by someone else while saving; not replacing it")


def _copy_aux(src: Path | None, tmp: Path, config, updates: dict | None = None, live_config: bool = False) -> dict:
    """Copy config, tokenizer and generation files from ``src``; write config.json from the
    live model's config if the source has none (or ``live_config``: a transformers model's own
    config is the fact, the directory it came from may be older); set ``updates``'s keys in it
    (the saved dtype, transformers' ``quantization_config``). Returns the config as saved."""
    if src is not None and Path(src).is_dir():
        skip = ("config.json",) if live_config and config is not None else ()
        for pattern in (p for p in AUX_PATTERNS if p not in skip):
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
    saved = json.loads(cfg.read_text())
    if updates and any(saved.get(k) != v for k, v in updates.items()):
        saved.update(updates)
        cfg.write_text(json.dumps(saved, indent=2) + "\n")
        fsync_path(cfg)
    return saved


def _write_manifest_and_publish(tmp: Path, final: Path, aux_src: Path | None, config, layouts: list[dict], records: list[dict],
            overwrite: bool, updates: dict | None = None, live_config: bool = False) -> None:
    """Rank files are written and fsynced: add config and tokenizer, the manifest last, publish."""
    for rec in records:
        f = tmp / rec["file"]
        if not f.is_file() or f.stat().st_size != rec["size"]:
            raise CheckpointError(f"{f}: rank {rec['rank']}'s file is not visible (complete) from rank 0; save to a "
                                  f"directory every rank shares")
    cfg = _copy_aux(aux_src, tmp, config, updates, live_config)
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


_KEEP = (FileExistsError,)  # raised as themselves on every rank; other failures as CheckpointError


def _saved_config_updates(model: nn.Module) -> dict:
    """What config.json must say beyond the live config for ``LLM`` to serve the checkpoint: the
    architecture (a transformers model built from a config has none) and the weights' dtype."""
    updates: dict = {}
    quantized = quantization_config(model)
    if quantized is not None:
        updates["quantization_config"] = quantized
    config = getattr(model, "config", None)
    if config is not None and getattr(model, "source_path", None) is None and not getattr(config, "architectures", None):
        updates["architectures"] = [type(model).__name__]
    floats = [p.dtype for n, p in model.named_parameters()
              if p.dtype.is_floating_point and not n.endswith(("weight_scale", "weight_min"))]
    if floats:  # what the files hold, whatever the source said (a model trained or loaded in float32)
        updates["torch_dtype"] = updates["dtype"] = DTYPE_NAME[floats[0]]
    return updates


def _pretrained_dir(model: nn.Module) -> str | None:
    """The directory a transformers model was loaded from (its tokenizer goes with the checkpoint)."""
    where = getattr(model, "name_or_path", None)
    return where if where and Path(where).is_dir() else None


def _write_agreed(directory: Path, shards_of: Callable[[], dict], tensors: dict[str, torch.Tensor], rank: int,
                  tp: int, group) -> tuple[list[dict], list[dict]]:
    """Every rank writes its file of ``tensors`` into ``directory``; returns every rank's layout
    and file record. Each step's outcome travels with the gather that ends it (parallel.agree),
    so a failure on one rank is raised on all of them instead of leaving the others waiting."""
    shards, err = None, None
    try:
        shards = shards_of()
    except Exception as exc:
        err = _caught(exc)
    layouts = gather_agreed(shards, err, group, CheckpointError, _KEEP)  # ownership decides the chunks
    record, err = None, None
    try:
        directory.mkdir(exist_ok=True)
        entries = _entries(shards, rank, layout_ownership(layouts), lambda n: tensors[n].dtype)
        record = _write_rank_file(directory / rank_file_name(rank, tp), rank, tp, entries,
                                  lambda e: _host_tensor(tensors[e.name]))
    except Exception as exc:
        err = _caught(exc)
    return layouts, gather_agreed(record, err, group, CheckpointError, _KEEP)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False,
                    group: dist.ProcessGroup | None = None, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Save this rank's shards of ``model`` into the checkpoint directory ``path``.

    Every rank of the group calls it; each writes its own file in parallel, rank 0 adds the
    config, tokenizer and manifest and publishes the directory. All ranks return the same path
    or raise the same error. ``path`` must be on storage every rank can see. ``group``
    defaults to the model's own (a native tpserve model's), else the default group.
    ``optimizer``: its state is saved too, cut like the weights (``checkpoint.resume``), for
    :func:`load_checkpoint` to resume training at this or another TP degree. A
    ``parallelize()``d transformers model's checkpoint records its architecture, so ``LLM``
    serves it at any TP degree.
    """
    group = model_group(model, group)  # by default the model's own: the group its layers were cut over
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
        raise_first([(0, err)], rank, CheckpointError, _KEEP)
    try:
        params = dict(model.named_parameters())
        layouts, records = _write_agreed(Path(tmp), lambda: param_shards(model), params, rank, tp, group)
        opt_meta = None
        if optimizer is not None:
            state, err = ({}, {}, None), None
            try:
                state = optimizer_state(model, optimizer)
            except Exception as exc:
                err = _caught(exc)
            gather_agreed(None, err, group, CheckpointError, _KEEP)
            tensors, opt_shards, opt_meta = state
            if tensors:
                opt_layouts, opt_records = _write_agreed(Path(tmp) / OPTIMIZER_DIR, lambda: opt_shards, tensors, rank,
                                                         tp, group)
        err = None
        if rank == 0:
            try:
                if opt_meta is not None:
                    opt_dir = Path(tmp) / OPTIMIZER_DIR
                    opt_dir.mkdir(exist_ok=True)
                    if opt_meta["tensors"]:
                        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                        text = dump_manifest(build_manifest({"optimizer": opt_meta["class"]}, tp, opt_layouts,
                                                            opt_records, created, __version__))
                        (opt_dir / MANIFEST_NAME).write_text(text)
                        fsync_path(opt_dir / MANIFEST_NAME)
                    write_meta(opt_dir, opt_meta)
                    fsync_path(opt_dir)
                native = getattr(model, "source_path", None)
                _write_manifest_and_publish(Path(tmp), final, native or _pretrained_dir(model),
                                            getattr(model, "config", None), layouts, records, overwrite,
                                            _saved_config_updates(model), live_config=native is None)
            except Exception as exc:
                err = _caught(exc)
        err = broadcast_object(err if rank == 0 else None, 0, group)
        if err:
            raise_first([(0, err)], rank, CheckpointError, _KEEP)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---- converting



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
                    overwrite: bool = False, progress: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Write the model at ``src_dir`` (transformers directory or tpserve checkpoint) as a tpserve
    checkpoint cut as ``layouts`` says (one ``param_shards`` dict per rank; ``models.convert``
    asks the model for them), in this one process: each rank file is written by its own thread
    from ranged reads of the source. ``dtype``: cast the floating-point tensors to it (config.json's
    ``torch_dtype`` says so); None keeps the source's."""
    tp = len(layouts)
    final = check_save_target(output, overwrite)
    source_dtype, read = (_tpserve_source if is_checkpoint(src_dir) else _transformers_source)(src_dir, layouts[0])

    def dtype_of(name: str) -> torch.dtype:
        stored = source_dtype(name)
        return dtype if dtype is not None and stored.is_floating_point else stored

    owners = layout_ownership(layouts)
    entries = [_entries(layouts[r], r, owners, dtype_of) for r in range(tp)]
    total = sum(math.prod(e.shape) * e.dtype.itemsize for es in entries for e in es)

    def write(rank: int, advance) -> dict:
        def fetch(e: _Entry) -> torch.Tensor:
            stored = source_dtype(e.name)
            out = _OUT.tensor(e.shape, stored)
            read(e.name, layouts[rank][e.name], out, rank)
            return out if stored == e.dtype else out.to(e.dtype)

        return _write_rank_file(tmp / rank_file_name(rank, tp), rank, tp, entries[rank], fetch, advance)

    tmp = _make_tmp(final, overwrite)
    try:
        records = run_in_threads(write, range(tp), min(tp, os.cpu_count() or 1), total=total,
                                 desc=f"converting to TP={tp}", progress=progress)
        _write_manifest_and_publish(tmp, final, src_dir, config, layouts, records, overwrite,
                                    {"torch_dtype": DTYPE_NAME[dtype], "dtype": DTYPE_NAME[dtype]} if dtype else None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
