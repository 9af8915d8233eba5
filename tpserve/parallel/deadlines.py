"""How long a collective may wait: the one place ``TPSERVE_COMM_TIMEOUT`` is read.

The library's collectives (torchrun scripts, layers used on their own) wait 300 s by default:
a peer may be loading or compiling. An engine's group waits 30 s: its ranks run in lockstep,
so a longer silence means a dead or hung worker, and a server should say so quickly. The
variable, when set, is the deadline of both. Startup (loading, the first compile) waits
``TPSERVE_STARTUP_TIMEOUT`` (600 s).
"""

from __future__ import annotations

import os

LIBRARY_TIMEOUT_S = 300.0
ENGINE_TIMEOUT_S_DEFAULT = 30.0


def comm_timeout(default: float) -> float:
    """``TPSERVE_COMM_TIMEOUT`` if set, else ``default``."""
    raw = os.environ.get("TPSERVE_COMM_TIMEOUT")
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"TPSERVE_COMM_TIMEOUT={raw!r} is not a number of seconds") from None


DEFAULT_TIMEOUT_S = comm_timeout(LIBRARY_TIMEOUT_S)  # the library's deadline (set_default_timeout changes it)
ENGINE_TIMEOUT_S = comm_timeout(ENGINE_TIMEOUT_S_DEFAULT)
STARTUP_TIMEOUT_S = float(os.environ.get("TPSERVE_STARTUP_TIMEOUT", "600"))
