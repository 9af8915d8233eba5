"""Checkpoint work that needs the model's own cut: converting a model to a tpserve checkpoint
for any TP degree, and verifying that a checkpoint holds what its config.json describes."""

from __future__ import annotations

import os
from pathlib import Path

from tpserve.checkpoint import save
from tpserve.checkpoint import verify as checks
from tpserve.checkpoint.resolve import resolve_model_path
from tpserve.checkpoint.sharded import is_checkpoint
from tpserve.utils.dtypes import MODEL_DTYPE_NAMES

from .layout import layout
from .registry import load_config


def convert(src: str | os.PathLike, output: str | os.PathLike, tp: int, *, overwrite: bool = False,
            progress: bool = True, dtype: str | None = None) -> Path:
    """Write the model at ``src`` (transformers directory, .gguf file, tpserve checkpoint or
    training root) as a tpserve checkpoint for ``tp`` ranks, in this one process, cut exactly as
    ``tp`` live ranks would hold it (``layout``); ``dtype`` (e.g. "bfloat16") casts its
    floating-point tensors."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"the TP degree must be a positive integer, got {tp!r}")
    src_dir = resolve_model_path(src)
    save.check_save_target(output, overwrite)  # before any work
    config = load_config(src_dir)
    cast = None
    if dtype not in (None, "auto"):
        if dtype not in MODEL_DTYPE_NAMES:
            raise ValueError(f"--dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
        cast = MODEL_DTYPE_NAMES[dtype]
    return save.write_converted(src_dir, output, config, layout(config, tp), overwrite=overwrite,
                                progress=progress, dtype=cast)


def verify(path: str | os.PathLike) -> dict:
    """``checkpoint.verify.verify`` (every file and checksum), and that the tensors are exactly
    the ones the checkpoint's config.json describes, full shapes included."""
    path = Path(path)
    expected = None
    if is_checkpoint(path) and (path / "config.json").is_file():
        expected = {name: s.full_shape for name, s in layout(load_config(path), 1)[0].items()}
    return checks.verify(path, expected)
