"""Verifying a checkpoint's every byte, and finding the newest complete one under a training
root (``root/step-100``, ``root/step-200``, ...)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .load import _check_chunks, _open_rank, _tensor_of_shape
from .manifest import (
    MANIFEST_NAME,
    Manifest,
    read_manifest,
)
from .safetensors_io import CheckpointError, _bytes_view
from .sharded import _READ_STEP, OPTIMIZER_DIR, crc32, is_checkpoint


def _check_expected(manifest: Manifest, expected: dict[str, tuple[int, ...]]) -> None:
    """The manifest's tensors are exactly ``expected`` (name -> full shape)."""
    for name, shape in expected.items():
        _tensor_of_shape(manifest, name, shape)
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
    _verify_files(manifest)
    summary = {"path": str(path), "tp": manifest.tp, "files": manifest.tp, "tensors": len(manifest.tensors),
               "bytes": sum(f.size for f in manifest.files)}
    if (path / OPTIMIZER_DIR / MANIFEST_NAME).is_file():  # optimizer state saved beside the weights
        opt = read_manifest(path / OPTIMIZER_DIR)
        _verify_files(opt)
        summary["optimizer_tensors"] = len(opt.tensors)
        summary["bytes"] += sum(f.size for f in opt.files)
    return summary


def _verify_files(manifest: Manifest) -> None:
    """Every rank file's presence, size, header, every chunk's CRC and the whole file's CRC."""
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


# ---- training roots


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
