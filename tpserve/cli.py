"""The ``tpserve`` command."""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpserve", description="Tensor-parallel LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="check every parallel layer against its dense twin on N local processes")
    p.add_argument("--tp", type=_positive_int, default=2, help="number of processes (TP degree)")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "selfcheck":
        from tpserve.parallel.selfcheck import run

        try:
            run(args.tp, args.seed)
        except Exception as exc:  # a rank failed: its own output says why
            print(f"tpserve selfcheck: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
