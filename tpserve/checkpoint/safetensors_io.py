"""Ranged reads from safetensors files.

Each rank reads only the bytes of its own slice: the header is parsed and checked here (so a
truncated file or lying offsets are caught before any weight is used), and tensor data is read
with ``os.preadv`` straight into the destination parameter when dtypes agree, or through a
buffer the size of the slice when they do not. No rank maps or reads a whole tensor it only
holds a shard of.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tpserve.parallel.partition import slice_shape
from tpserve.utils.dtypes import SAFETENSORS_DTYPES as DTYPES

MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged or disagrees with the model; names file and tensor."""


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def _pread_exact(fd: int, buf: memoryview, offset: int, path: Path, name: str) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: tensor {name}: file ends at byte {offset + done}, before its data does "
                                  f"(truncated file?)")
        done += n


@dataclass
class TensorRef:
    """One tensor inside a safetensors file; reading it reads only the slice asked for."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    def get_shape(self) -> list[int]:
        return list(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read_into(self, dest: torch.Tensor, dim: int | None = None, start: int = 0, end: int = 0) -> int:
        """Copy ``self[start:end]`` along ``dim`` (all of it when ``dim`` is None) into ``dest``,
        converting dtype; returns the bytes read."""
        shape = list(slice_shape(self.shape, dim, start, end))
        if list(dest.shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {self.name}: slice shape {shape} does not fit destination {list(dest.shape)}")
        direct = dest.dtype == self.dtype and dest.device.type == "cpu" and dest.is_contiguous()
        buf = dest if direct else torch.empty(shape, dtype=self.dtype)
        mv = _bytes_view(buf) if buf.numel() else memoryview(b"")
        item = self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if dim is None or dim == 0 or math.prod(self.shape[:dim]) == 1:
                lead = math.prod(self.shape[1:]) if dim in (None, 0) else math.prod(self.shape[dim + 1:])
                first = 0 if dim is None else start * lead
                _pread_exact(fd, mv, self.offset + first * item, self.path, self.name)
            else:  # one contiguous run per leading index (e.g. per row for a column slice)
                outer = math.prod(self.shape[:dim])
                inner = math.prod(self.shape[dim + 1:])
                run = (end - start) * inner * item
                stride = self.shape[dim] * inner * item
                for i in range(outer):
                    _pread_exact(fd, mv[i * run:(i + 1) * run], self.offset + i * stride + start * inner * item,
                                 self.path, self.name)
        finally:
            os.close(fd)
        if not direct:
            with torch.no_grad():
                dest.copy_(buf)
        return len(mv)

    def __getitem__(self, index) -> torch.Tensor:
        """Tensor for ``index`` (slices along at most one dimension), read from disk."""
        index = index if isinstance(index, tuple) else (index,)
        if index == (Ellipsis,):
            index = ()
        dim, start, end = None, 0, 0
        for d, s in enumerate(index):
            if not isinstance(s, slice) or s.step not in (None, 1):
                raise TypeError(f"TensorRef supports plain slices only, got {index!r}")
            lo, hi, _ = s.indices(self.shape[d])
            if (lo, hi) != (0, self.shape[d]):
                if dim is not None:
                    raise TypeError("TensorRef slices along one dimension at a time")
                dim, start, end = d, lo, hi
        out = torch.empty(slice_shape(self.shape, dim, start, end), dtype=self.dtype)
        self.read_into(out, dim, start, end)
        return out


def read_header(path: str | Path) -> dict[str, TensorRef]:
    """Parse and check one file's header: every tensor's dtype, shape and byte range must be
    consistent and inside the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} does not fit in a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    data_size = size - 8 - n
    refs: dict[str, TensorRef] = {}
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(x) for x in meta["shape"])
            begin, stop = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {name}: malformed header entry {meta!r} ({exc})") from None
        want = math.prod(shape) * dtype.itemsize
        if begin < 0 or stop - begin != want:
            raise CheckpointError(f"{path}: tensor {name}: offsets {begin}..{stop} span {stop - begin} bytes but "
                                  f"shape {list(shape)} of {meta['dtype']} needs {want}")
        if stop > data_size:
            raise CheckpointError(f"{path}: tensor {name}: data ends at byte {stop} but the file holds only {data_size} "
                                  f"bytes of data (truncated file?)")
        spans.append((begin, stop, name))
        refs[name] = TensorRef(path, name, dtype, shape, 8 + n + begin)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0} and {n1} overlap in the file (offsets lie)")
    return refs


def open_checkpoint(path: str | Path) -> dict[str, TensorRef]:
    """Every tensor of a transformers checkpoint (a directory with ``model.safetensors`` or
    ``model.safetensors.index.json``, or one ``.safetensors`` file), headers checked."""
    path = Path(path)
    if path.is_file():
        return read_header(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        files: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            files.setdefault(fname, []).append(tensor)
        refs: dict[str, TensorRef] = {}
        for fname, tensors in files.items():
            fpath = path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: file named by {index.name} is missing (it should hold {tensors[0]}"
                                      f"{f' and {len(tensors) - 1} more tensors' if len(tensors) > 1 else ''})")
            found = read_header(fpath)
            for tensor in tensors:
                if tensor not in found:
                    raise CheckpointError(f"{fpath}: tensor {tensor} is listed in {index.name} but not in the file")
                refs[tensor] = found[tensor]
        return refs
    single = path / "model.safetensors"
    if single.is_file():
        return read_header(single)
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")
