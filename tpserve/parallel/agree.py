"""Every rank agrees on how a step ended: when one rank fails, every rank raises its error.

A rank that fails on its own must still reach the collective its peers wait in, or they wait
until the deadline; so each step's outcome travels with the gather that ends it, and a failure
anywhere becomes the same error everywhere (the failing rank's own text on that rank, "rank r:
..." on the others).
"""

from __future__ import annotations

from typing import Any

from .comm import all_gather_object

Failure = tuple[str, str]  # (exception type name, text)


def describe(exc: BaseException, plain: tuple[type[BaseException], ...] = ()) -> Failure:
    """How ``exc`` travels to the peers; types in ``plain`` say their message without their name."""
    text = str(exc) if isinstance(exc, plain) else f"{type(exc).__name__}: {exc}"
    return type(exc).__name__, text


def raise_first(failures: list[tuple[int, Failure]], rank: int, error: type[Exception],
                keep: tuple[type[Exception], ...] = ()) -> None:
    """Raise the first ``(rank, failure)``: as ``error``, or as its own type if that is in ``keep``."""
    r, (kind, text) = failures[0]
    text = text if r == rank else f"rank {r}: {text}"
    own = next((t for t in keep if t.__name__ == kind), None)
    raise (own or error)(text)


def gather_agreed(value: Any, failure: Failure | None, group, error: type[Exception],
                  keep: tuple[type[Exception], ...] = ()) -> list:
    """Every rank's ``value``, once every rank has said how its step ended (``failure``: None,
    or :func:`describe` of what it raised); if any failed, every rank raises (:func:`raise_first`)."""
    gathered = all_gather_object((value, failure), group)
    failures = [(r, f) for r, (_, f) in enumerate(gathered) if f]
    if failures:
        raise_first(failures, group.rank(), error, keep)
    return [v for v, _ in gathered]
