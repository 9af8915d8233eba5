"""Small C++ modules built with ``torch.utils.cpp_extension``, once per machine and source."""

from __future__ import annotations

import hashlib
import importlib.util
import platform
import warnings
from pathlib import Path

# build for the vector instructions of this CPU (each build is keyed by the CPU's features)
NATIVE_FLAGS = ("-march=native",) if platform.machine() in ("x86_64", "AMD64", "aarch64") else ()


def cpu_flags() -> bytes:
    """This CPU's feature flags (Linux), so a build for one CPU is never loaded on another."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    except OSError:
        return b""


def load_extension(src: Path, prefix: str, extra_cflags: tuple[str, ...] = ("-O3",)):
    """The module built from ``src``, imported directly when this source was built before
    (torch's ``load`` spends ~2 s checking a cached build, in every process), else built now.
    The name carries a hash of the source (and the headers beside it), torch's version, the flags and (for ``-march=native``)
    the CPU's features, so an edit or another CPU rebuilds."""
    import torch
    from torch.utils.cpp_extension import _get_build_directory, load

    key = src.read_bytes() + torch.__version__.encode() + " ".join(extra_cflags).encode()
    key += b"".join(h.read_bytes() for h in sorted(src.parent.glob("*.h")))  # headers it may include
    if "-march=native" in extra_cflags:
        key += cpu_flags()
    name = f"{prefix}_{hashlib.sha1(key).hexdigest()[:12]}"
    built = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    if built.is_file():
        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    ldflags = ["-fopenmp"] if "-fopenmp" in extra_cflags else []  # at::parallel_for runs on OpenMP threads
    return load(name=name, sources=[str(src)], extra_cflags=list(extra_cflags), extra_ldflags=ldflags, verbose=False)


_unavailable: dict[str, str] = {}  # source -> why it could not be built (warned once)


def optional_extension(src: Path, prefix: str, extra_cflags: tuple[str, ...], what: str, instead: str):
    """:func:`load_extension`'s module, or None when it cannot be built (no compiler, no
    headers), with one warning naming ``what`` is missing and what runs ``instead``."""
    key = str(src)
    if key in _unavailable:
        return None
    try:
        return load_extension(src, prefix, extra_cflags)
    except Exception as exc:
        text = str(exc).strip()
        _unavailable[key] = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        warnings.warn(f"tpserve: {what} is unavailable ({_unavailable[key]}); {instead}. Install g++ for it",
                      stacklevel=3)
        return None
