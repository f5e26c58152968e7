"""`regrad bench`: regrad's gradient routes against torch autograd and the peers, as a table, JSON and a plot.

    regrad bench [--profile quick|full] [--routes ...] [--peers ...] [--sizes ...] [--dtype float32|float64]
                 [--repeats N] [--budget SECONDS] [--json out.json] [--plot out.png]

Also `python -m regrad.bench`. Modules: `suite` (problem, routes, measuring), `peers`, `timing`,
`report`. See docs/benchmarks.md, section "regrad bench (full profile)".
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "PROFILES", "parse_size"]

# profile -> defaults (sizes, repeats, per-cell budget in seconds)
PROFILES: Dict[str, Dict[str, Any]] = {
    "quick": {"sizes": [100, 1_000, 10_000], "repeats": 3, "budget": 0.5},
    "full": {"sizes": [100, 1_000, 10_000, 100_000, 1_000_000], "repeats": 5, "budget": 6.0},
}
MAX_SIZE = 10**8


class UsageError(Exception):
    """Bad command-line input: reported as one line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _names(values: Optional[List[str]]) -> Optional[List[str]]:
    """Names given as separate words and/or comma-separated lists."""
    if values is None:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def parse_size(text: str) -> int:
    """A size N: a positive integer (1000, 1e4, 10_000), at most 1e8."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise UsageError(f"size {text!r} is not a number; sizes are integers like 1000 or 1e4") from None
    if value != value or value in (float("inf"), float("-inf")) or value != int(value):
        raise UsageError(f"size {text!r} is not an integer")
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive")
    if value > MAX_SIZE:
        raise UsageError(f"size {text!r} is larger than the limit {MAX_SIZE:.0e}")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    from .peers import PEERS
    from .suite import ROUTES

    parser = _Parser(prog="regrad bench", description="regrad's gradient routes vs torch autograd and the peers.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick: N up to 1e4, < 1 minute; full: N up to 1e6, several minutes (default quick)")
    parser.add_argument("--routes", nargs="+", metavar="ROUTE",
                        help=f"regrad routes (default all): {', '.join(ROUTES)}; 'none' for none")
    parser.add_argument("--peers", nargs="+", metavar="PEER",
                        help=f"peers (default: all installed): {', '.join(PEERS)}; 'none' for none")
    parser.add_argument("--sizes", nargs="+", metavar="N", help="numbers of log-probs (default: the profile's)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="log-prob dtype (default float32)")
    parser.add_argument("--repeats", type=int, help="timed runs per cell, median reported (default: the profile's)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="time per (route, N) before it is extrapolated from a prefix or skipped (default: the profile's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement runs")
    parser.add_argument("--json", metavar="PATH", help="write the raw figures as JSON")
    parser.add_argument("--plot", metavar="PATH", help="draw time and error vs N (PNG; needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    return parser


def _select(given: Optional[List[str]], known: Sequence[str], what: str) -> Optional[List[str]]:
    names = _names(given)
    if names is None:
        return None
    if names == ["none"]:
        return []
    if names == ["all"]:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


PLOT_FORMATS = (".png", ".svg", ".pdf")


def _check_output(path: Optional[str], flag: str) -> None:
    """An output path that can be written once the run is over (checked first, so no run is lost)."""
    if path is None:
        return
    if not path:
        raise UsageError(f"{flag} needs a file path")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path!r} cannot be written (permissions)")
    if flag == "--plot" and os.path.splitext(path)[1].lower() not in PLOT_FORMATS:
        raise UsageError(f"--plot {path!r}: the file name must end in one of {', '.join(PLOT_FORMATS)}")


def _settings(argv: Sequence[str]) -> Dict[str, Any]:
    """Parsed and validated options; raises UsageError."""
    from .peers import PEERS, missing_module
    from .suite import ROUTES

    args = _parser().parse_args(list(argv))
    profile = PROFILES[args.profile]
    routes = _select(args.routes, list(ROUTES), "route")
    peers = _select(args.peers, list(PEERS), "peer")
    notes: List[str] = []
    if peers is None:  # default: every installed peer; missing ones are named
        peers = []
        for name in PEERS:
            module = missing_module(name)
            if module is None:
                peers.append(name)
            else:
                notes.append(f"peer {name!r} skipped: {module} is not installed")
    else:
        for name in peers:
            module = missing_module(name)
            if module is not None:
                raise UsageError(f"peer {name!r} needs {module}, which is not installed (pip install {module}, "
                                 "or `pip install regrad[bench]`)")
    if importlib.util.find_spec("torch") is None:
        raise UsageError("regrad bench needs torch (autograd is the reference): pip install torch")
    sizes = [parse_size(s) for s in args.sizes] if args.sizes else list(profile["sizes"])
    repeats = profile["repeats"] if args.repeats is None else args.repeats
    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {repeats}")
    budget = profile["budget"] if args.budget is None else args.budget
    if not budget > 0 or budget == float("inf"):
        raise UsageError(f"--budget must be a positive number of seconds, got {budget}")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    _check_output(args.json, "--json")
    _check_output(args.plot, "--plot")
    if args.json and args.plot and os.path.realpath(args.json) == os.path.realpath(args.plot):
        raise UsageError(f"--json and --plot name the same file {args.json!r}; the plot would overwrite the JSON")
    return {"profile": args.profile, "routes": list(ROUTES) if routes is None else routes, "peers": peers,
            "sizes": sorted(set(sizes)), "dtype": args.dtype, "repeats": repeats, "budget": budget,
            "memory": not args.no_memory, "json": args.json, "plot": args.plot, "markdown": args.markdown,
            "notes": notes}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; returns the exit code (0 ok, 1 a route failed or an output could not be
    written, 2 bad input)."""
    try:
        settings = _settings(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"regrad bench: error: {err}", file=sys.stderr)
        print("usage: regrad bench [--profile quick|full] [--routes ...] [--peers ...] [--sizes ...] "
              "[--dtype float32|float64] [--repeats N] [--budget SECONDS] [--json PATH] [--plot PATH] "
              "(regrad bench --help)", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    from . import report
    from .suite import LOSS_DESCRIPTION, run_suite
    from .timing import machine

    for note in settings["notes"]:
        print(note, file=sys.stderr)
    info = machine(("scipy", "numdifftools", "matplotlib"))
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), file=sys.stderr)
    results = run_suite(settings["sizes"], settings["dtype"], settings["routes"], settings["peers"],
                        repeats=settings["repeats"], budget=settings["budget"], memory=settings["memory"])
    date = datetime.date.today().isoformat()
    print(f"\nregrad bench ({settings['profile']} profile, {settings['dtype']}, {date}): {LOSS_DESCRIPTION}")
    print(f"median of up to {settings['repeats']} runs; budget {settings['budget']:g} s per route and N; "
          "errors vs float64 autograd; 'est.' = extrapolated from a prefix of the coordinates")
    print(report.table(results, markdown=settings["markdown"]))
    print()
    for line in report.crossover_lines(results):
        print(line)
    print(f"\n{report.MEMORY_NOTE}")
    meta = {"date": date, "profile": settings["profile"], "dtype": settings["dtype"], "sizes": settings["sizes"],
            "routes": settings["routes"], "peers": settings["peers"], "repeats": settings["repeats"],
            "budget_s": settings["budget"], "loss": LOSS_DESCRIPTION, "machine": info, "notes": settings["notes"]}
    written = True
    if settings["json"]:
        written = _write(lambda: report.write_json(settings["json"], results, meta), settings["json"]) and written
    if settings["plot"]:
        title = (f"regrad bench, {settings['profile']} profile, {settings['dtype']} · {info['cpu']}, "
                 f"{info.get('torch_threads', '?')} threads · {date}")
        written = _write(lambda: report.plot(settings["plot"], results, title), settings["plot"]) and written
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(f"regrad bench: {len(failed)} cell(s) failed: " + "; ".join(f"{r.label} at N={r.n:,}" for r in failed),
              file=sys.stderr)
    return 0 if written and not failed else 1


def _write(write: Any, path: str) -> bool:
    """Writes one output file; a failure (disk full, a path that changed) is one line, not a lost table."""
    try:
        write()
    except OSError as err:
        print(f"regrad bench: could not write {path}: {err}", file=sys.stderr)
        return False
    print(f"wrote {path}")
    return True

