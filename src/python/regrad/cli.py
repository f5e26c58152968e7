"""The `regrad` console script: `regrad demo`, `regrad check`, `regrad bench` (also `python -m regrad ...`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regrad", description="Fast, correct gradients for custom training losses on token log-probabilities."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .demo import add_arguments

    add_arguments(sub.add_parser("demo", help="train the local byte-level model with regularizers (< 1 minute)"))
    from ._check_cli import add_arguments as add_check_arguments

    add_check_arguments(sub.add_parser(
        "check", help="compare a regularizer's numerical gradient with autograd, its grad_fn or its analytic gradient",
        description="Compares regrad's numerical gradient of TARGET with a reference on a generated batch. "
                    "Exit status: 0 pass, 1 fail, 2 usage error."))
    sub.add_parser("bench", help="run the benchmarks (arguments go to regrad.bench)", add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 usage error or command not available,
    130 interrupted by Ctrl-C, 141 stdout closed by its reader, as `regrad demo | head` does)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("regrad: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away: stop quietly, and keep the interpreter's final flush
        # from raising again ("Exception ignored ... BrokenPipeError")
        if sys.stdout is not None:
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
        return 141


def _main(argv: Optional[List[str]]) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bench"]:
        return _bench(args_list[1:])
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        try:
            import torch  # noqa: F401  # the demo trains a torch model
        except ImportError:
            print("regrad demo needs torch, which is not installed: pip install 'regrad[demo]'", file=sys.stderr)
            return 2
        from .demo import run_from_args

        return run_from_args(args)
    if args.command == "check":
        from ._check_cli import run_from_args as run_check

        return run_check(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2


def _bench(argv: List[str]) -> int:
    """Forwards to `regrad.bench.main(argv)` when that module is installed."""
    try:
        bench = importlib.import_module("regrad.bench")
    except ImportError as err:
        if err.name not in ("regrad.bench",):
            raise
        print("regrad bench is not available in this installation (no regrad.bench module); "
              "run the scripts in the repository's bench/ folder instead", file=sys.stderr)
        return 2
    return int(bench.main(argv) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
