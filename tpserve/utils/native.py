"""Small C++ modules built with ``torch.utils.cpp_extension``, once per machine and source."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


def load_extension(src: Path, prefix: str, extra_cflags: tuple[str, ...] = ("-O3",)):
    """The module built from ``src``, imported directly when this source was built before
    (torch's ``load`` spends ~2 s checking a cached build, in every process), else built now.
    The name carries a hash of the source and torch's version, so an edit rebuilds."""
    import torch
    from torch.utils.cpp_extension import _get_build_directory, load

    name = f"{prefix}_{hashlib.sha1(src.read_bytes() + torch.__version__.encode()).hexdigest()[:12]}"
    built = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    if built.is_file():
        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load(name=name, sources=[str(src)], extra_cflags=list(extra_cflags), verbose=False)
