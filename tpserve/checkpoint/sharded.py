"""Sharded tpserve checkpoints: what saving (``save``), loading at any TP degree (``load``) and
verifying (``verify``) share.

The format is in docs/checkpoint-format.md: a directory with one safetensors file per rank
holding exactly that rank's shards (transformers names, logical layout) and a manifest,
``tpserve.json``, that says where every shard lives, which rank owns which region, and the CRC32
of every file and of every ~1 MiB chunk of every shard.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import torch

from tpserve.parallel.agree import describe

from .manifest import MANIFEST_NAME
from .safetensors_io import CheckpointError, _bytes_view

try:  # ISA-L's CRC32 is zlib's function (same polynomial, same values) at ~20 instead of ~4 GB/s
    from isal.isal_zlib import crc32  # noqa: F401  (used by save, load and verify)
    CRC32_IMPL = "isal"
except ImportError:
    from zlib import crc32  # noqa: F401
    CRC32_IMPL = "zlib"

# Files that travel with the weights, copied from the source directory when present.
OPTIMIZER_DIR = "optimizer"  # optimizer state saved beside the weights (checkpoint.resume)
AUX_PATTERNS = ("config.json", "generation_config.json", "tokenizer*.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
DATA_ALIGN = 64  # the header is padded so tensor data starts here: mmap'd shards are aligned for their dtype
_READ_STEP = 64 << 20
_WRITE_STEP = 16 << 20


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Does ``path`` hold a committed tpserve checkpoint (its manifest exists)?"""
    return (Path(path) / MANIFEST_NAME).is_file()


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


def _caught(exc: BaseException) -> tuple[str, str]:
    """How a checkpoint step's failure travels to the peers (``parallel.agree``)."""
    return describe(exc, (CheckpointError, FileExistsError))
