"""Output of `regrad bench`: the aligned table, the JSON record and the plot."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence

from .suite import Result, crossovers
from .timing import fmt_bytes, fmt_time

__all__ = ["table", "crossover_lines", "write_json", "plot"]

MEMORY_NOTE = ("peak RSS+: peak resident memory during one run above the resident memory before it (Linux "
               "VmHWM after resetting it; all allocators, torch's included; memory reused from free lists is "
               "not counted). traced: tracemalloc peak (Python objects and numpy arrays only).")

COLUMNS = ["route", "N", "time", "vs autograd", "max abs err", "max rel err", "peak RSS+", "traced", "nfev", "note"]


def _row(res: Result) -> List[str]:
    est = "est. " if res.status == "est" else ""
    time_text = (est + fmt_time(res.seconds)) if res.seconds is not None else "–"
    ratio = "–" if res.ratio_to_autograd is None else f"{est}{res.ratio_to_autograd:,.3g}x"
    abs_err = "–" if res.max_abs_error is None else f"{res.max_abs_error:.1e}"
    rel_err = "–" if res.max_rel_error is None else f"{res.max_rel_error:.1e}"
    nfev = "–" if res.nfev is None else f"{est}{res.nfev:,}"
    return [res.label, f"{res.n:,}", time_text, ratio, abs_err, rel_err, fmt_bytes(res.peak_rss_extra_bytes),
            fmt_bytes(res.peak_traced_bytes), nfev, res.note]


def table(results: Sequence[Result], markdown: bool = False) -> str:
    """The results as an aligned text table (one block per N), or as one markdown table."""
    rows = [_row(r) for r in results]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * 8 + ["---"]) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(COLUMNS[i]), *(len(row[i]) for row in rows)) if rows else len(COLUMNS[i]) for i in range(len(COLUMNS))]

    def fmt(row: List[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, len(row) - 1)] + [row[-1]]
        return "  ".join(cells).rstrip()

    lines = [fmt(COLUMNS), "  ".join("-" * w for w in widths[:-1]) + "  " + "-" * 4]
    last_n = None
    for res, row in zip(results, rows):
        if last_n is not None and res.n != last_n:
            lines.append("")
        last_n = res.n
        lines.append(fmt(row))
    return "\n".join(lines)


def crossover_lines(results: Sequence[Result]) -> List[str]:
    """One sentence per route: where it becomes more expensive than autograd."""
    lines = []
    for name, entry in crossovers(results).items():
        est = set(entry["estimated"])  # ratios from extrapolated times say so
        ratios = ", ".join(f"{int(n):,}: {'est. ' if int(n) in est else ''}{r:.3g}x"
                           for n, r in sorted(entry["ratios"].items(), key=lambda kv: int(kv[0])))
        if entry["faster_at_every_n"]:
            verdict = "cheaper than autograd at every N measured"
        elif entry["slower_at_every_n"]:
            verdict = "more expensive than autograd at every N measured"
        elif entry["slower_from_n"] is not None:
            n = entry["slower_from_n"]
            verdict = f"more expensive than autograd from N = {n:,}{' (est.)' if n in est else ''}"
        else:
            verdict = "mixed (cheaper at the largest N)"
        lines.append(f"{entry['label']}: {verdict} (time / autograd by N: {ratios})")
    return lines


def record(results: Sequence[Result], meta: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON record: run settings, machine, every cell's raw figures, crossovers."""
    return {**meta, "memory_note": MEMORY_NOTE, "results": [r.to_dict() for r in results],
            "crossovers": crossovers(results)}


def write_json(path: str, results: Sequence[Result], meta: Dict[str, Any]) -> None:
    """Writes `record(...)` to path."""
    with open(path, "w") as f:
        json.dump(record(results, meta), f, indent=1, allow_nan=False, default=str)
        f.write("\n")


def plot(path: str, results: Sequence[Result], title: str) -> None:
    """Time vs N (log-log) and max relative error vs N, one line per route; hollow markers are estimates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_err) = plt.subplots(1, 2, figsize=(13, 5.5))
    labels: List[str] = []
    for r in results:
        if r.label not in labels:
            labels.append(r.label)
    cmap = plt.get_cmap("tab20")
    for i, label in enumerate(labels):
        rows = [r for r in results if r.label == label and r.seconds is not None]
        if not rows:
            continue
        color = cmap(i % 20)
        style = "--" if rows[0].kind == "peer" else "-"  # peers dashed, regrad and autograd solid
        width = 2.5 if rows[0].kind == "reference" else 1.4
        ax_time.plot([r.n for r in rows], [r.seconds for r in rows], style, color=color, lw=width, label=label)
        for r in rows:
            ax_time.plot(r.n, r.seconds, "o", color=color, mfc="none" if r.status == "est" else color, ms=5)
        err_rows = [r for r in rows if r.max_rel_error is not None]
        if err_rows:
            floor = 1e-17  # exact zeros drawn at the floor of the log axis
            ys = [max(r.max_rel_error or 0.0, floor) for r in err_rows]
            ax_err.plot([r.n for r in err_rows], ys, style, color=color, lw=width, label=label)
            for r, y in zip(err_rows, ys):
                ax_err.plot(r.n, y, "o", color=color, mfc="none" if r.status == "est" else color, ms=5)
    for ax, ylabel in ((ax_time, "median time (s)"), (ax_err, "max relative error vs float64 autograd")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (log-probs)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    ax_time.set_title("time (hollow: est. from a prefix; dashed: peers)")
    ax_err.set_title("accuracy (hollow: on the timed prefix)")
    handles, names = ax_time.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
