"""File-system helpers for atomic writes: the one way checkpoints and conversions appear."""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import socket
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or directory's data to disk (directories too, so a rename is durable)."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists: leftovers of a dead writer may be removed."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# ---- publishing a directory atomically ------------------------------------------------------
# A directory is built in a hidden sibling, ``.{name}.tmp-{host}-{pid}-{random}``, and appears
# by one rename; a replaced one is moved to ``.{name}.old-...`` first where the two cannot be
# swapped in one step. Siblings of a writer that died on this host are removed on the next try.


def _sibling(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_siblings(final: str | os.PathLike) -> None:
    """Delete the build and replaced siblings of ``final`` whose process is gone (this host
    only: a pid means nothing on another machine sharing the directory)."""
    final = Path(final)
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        prefix = f".{final.name}.{kind}-"
        for d in final.parent.glob(prefix + "*"):
            parts = d.name[len(prefix):].rsplit("-", 2)
            if len(parts) == 2:  # written before the host was part of the name: this host's
                parts = [host, *parts]
            try:
                if parts[0] == host and int(parts[1]) != os.getpid() and not pid_alive(int(parts[1])):
                    shutil.rmtree(d, ignore_errors=True)
            except ValueError:
                continue


def build_dir(final: str | os.PathLike) -> Path:
    """A new hidden sibling of ``final`` to build it in (after clearing dead writers' ones)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
    tmp = _sibling(final, "tmp")
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


def publish_dir(tmp: Path, final: Path, replace: bool) -> bool:
    """Make the finished ``tmp`` visible as ``final`` in one step, so readers see the old
    directory or the new one. When ``final`` already has contents, it is replaced only if
    ``replace`` (atomically swapped where the file system can, else moved aside first), and
    False is returned otherwise (``tmp`` is left for the caller)."""
    try:
        os.rename(tmp, final)  # also replaces an empty directory
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) and not final.exists():
            raise
        if not replace:
            return False
        if not _exchange(tmp, final):
            old = _sibling(final, "old")
            os.rename(final, old)
            os.rename(tmp, final)
            tmp = old
        shutil.rmtree(tmp, ignore_errors=True)  # what was replaced
    fsync_path(final.parent)
    return True
