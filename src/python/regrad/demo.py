"""`regrad demo`: trains the local byte-level model with a composed loss and shows what each term did.

The loss is cross-entropy + L1 + entropy (C++ kernels) + a numpy regularizer with numerical
gradients + an async "remote" check. Output: a progress bar, a per-step table, telemetry as JSON
lines and a PNG of the curves (the plot is skipped with a note when matplotlib is missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from ._demo_corpus import TEXT
from .data import Datum, datum_from_text, input_tokens, loss_input

__all__ = ["add_arguments", "run_from_args", "run", "demo_regularizers", "demo_batches"]

# Log-prob below which a repeated byte counts as "missed" (p < 0.2), and the softness of that count.
_REPEAT_THRESHOLD = math.log(0.2)
_REPEAT_SOFTNESS = 0.5
# The simulated remote checker flags bytes the model gives p < e^-3 (about 0.05).
_FLAG_LOGPROB = -3.0
_REMOTE_LATENCY_S = 0.002
# Upper bounds of --steps and --batch-size: the demo is a < 1 minute run; beyond these it would take days or exhaust memory.
MAX_STEPS = 100_000
MAX_BATCH = 256  # 256 x 128 bytes: ~45 s per step on 2 cores (the numerical term grows ~quadratically)


def repeat_penalty(data: Sequence[Any], logprobs_list: Sequence[Any]) -> np.ndarray:
    """Soft count of missed repeats: Σ over positions whose next byte repeats the current one of σ((log 0.2 - lp)/0.5).

    Mean over data. Plain numpy, so torch cannot differentiate it and regrad takes its gradient
    numerically. Vectorized: each log-prob array comes as [C, T_i] (C perturbed copies) and the
    result is one loss per copy, [C], so the C++ engine evaluates whole blocks of copies per call.
    """
    total: Any = 0.0
    for i, (datum, lp) in enumerate(zip(data, logprobs_list)):
        lp = np.asarray(lp.detach().numpy() if hasattr(lp, "detach") else lp)
        repeats = loss_input(datum, "target_tokens", i) == np.asarray(input_tokens(datum, i))
        soft_miss = 1.0 / (1.0 + np.exp((lp[..., repeats] - _REPEAT_THRESHOLD) / _REPEAT_SOFTNESS))
        total = total + soft_miss.sum(axis=-1)
    return np.asarray(total, dtype=np.float64) / max(len(logprobs_list), 1)


async def remote_check(data: Sequence[Any], logprobs_list: Sequence[Any]) -> Tuple[Any, Dict[str, float]]:
    """A simulated remote verifier: awaits a round trip, then charges relu(-3 - lp) on the bytes it flags.

    Returns a torch loss with a graph, so its gradient comes from autograd.
    """
    import torch

    await asyncio.sleep(_REMOTE_LATENCY_S)  # the network round trip
    per_datum = [torch.relu(_FLAG_LOGPROB - lp).mean() for lp in logprobs_list]
    flagged = sum(int((lp.detach() < _FLAG_LOGPROB).sum()) for lp in logprobs_list)
    total = sum(int(lp.numel()) for lp in logprobs_list)
    return torch.stack(per_datum).mean(), {"flagged_fraction": flagged / max(total, 1)}


def demo_regularizers() -> List[Any]:
    """The demo's regularizers: L1 and entropy (C++ kernels), the numpy repeat penalty, the async check."""
    import regrad

    spec = regrad.RegularizerSpec
    return [
        regrad.l1(1e-3),
        regrad.entropy(0.05),
        spec.sync("repeats", 0.5, repeat_penalty, grad="numerical", vectorized=True),
        spec.async_("remote_check", 0.5, remote_check, timeout=10.0),
    ]


def demo_batches(steps: int, batch_size: int, seq_len: int, seed: int) -> List[List[Datum]]:
    """`steps` batches of random windows of the bundled text (seq_len input bytes each), from `seed`."""
    return list(_iter_batches(steps, batch_size, seq_len, seed))


def _iter_batches(steps: int, batch_size: int, seq_len: int, seed: int) -> Iterator[List[Datum]]:
    """demo_batches one step at a time (the same numbers: numpy draws rows in order), so memory does not grow with steps."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(TEXT) - seq_len - 1, size=batch_size)
        yield [datum_from_text(TEXT[s : s + seq_len + 1]) for s in starts]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model and the batches (default 0)")
    parser.add_argument("--out", default="regrad-out", help="output folder (default ./regrad-out)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="bytes per sequence, <= 128 (default 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--quiet", action="store_true", help="no per-step table")


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the demo from parsed options; returns the exit code."""
    for option, value, low, high in (("--steps", args.steps, 1, MAX_STEPS), ("--batch-size", args.batch_size, 1, MAX_BATCH),
                                     ("--seq-len", args.seq_len, 1, 128)):
        if not low <= value <= high:
            print(f"regrad demo: {option} must be in [{low}, {high}], got {value}", file=sys.stderr)
            return 2
    if not 0 < args.lr <= 1:  # (NaN fails this too) larger rates make the tiny model diverge
        print(f"regrad demo: --lr must be in (0, 1], got {args.lr}", file=sys.stderr)
        return 2
    if not 0 <= args.seed < 2**64:  # numpy's generators take no negative seed, torch none from 2**64
        print(f"regrad demo: --seed must be in [0, 2**64), got {args.seed}", file=sys.stderr)
        return 2
    problem = _unwritable(args.out)
    if problem:
        print(f"regrad demo: cannot write to --out {args.out!r}: {problem}", file=sys.stderr)
        return 2
    run(
        steps=args.steps,
        seed=args.seed,
        out=args.out,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        learning_rate=args.lr,
        progress=not args.no_progress,
        table=not args.quiet,
    )
    return 0


def _unwritable(out: str) -> Optional[str]:
    """Why files cannot be written in folder `out` (created if missing), or None when they can."""
    if os.path.exists(out) and not os.path.isdir(out):
        return "it is a file, not a folder"
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        return err.strerror or str(err)
    for name in ("telemetry.jsonl", "curves.png"):  # the files the run writes, checked before it starts
        path = os.path.join(out, name)
        if os.path.isdir(path):
            return f"{name} there is a folder"
        if os.path.exists(path) and not os.access(path, os.W_OK):
            return f"{name} there exists and is read-only"
    return None


def run(
    *,
    steps: int = 40,
    seed: int = 0,
    out: "str | os.PathLike[str]" = "regrad-out",
    batch_size: int = 8,
    seq_len: int = 64,
    learning_rate: float = 3e-3,
    progress: bool = True,
    table: bool = True,
    stream: Optional[TextIO] = None,
) -> List[Dict[str, Any]]:
    """Trains for `steps` steps; writes telemetry.jsonl and curves.png under `out`; returns the telemetry rows."""
    import regrad

    stream = sys.stdout if stream is None else stream
    os.makedirs(out, exist_ok=True)
    jsonl_path = os.path.join(out, "telemetry.jsonl")
    client = regrad.LocalTrainingClient(seed=seed)
    regularizers = demo_regularizers()
    batches = _iter_batches(steps, batch_size, seq_len, seed)
    names = [_spec_name(r) for r in regularizers]
    write = _writer(stream)
    write(
        f"regrad demo: {steps} steps, {batch_size}x{seq_len} bytes per step, seed {seed}; "
        f"loss = cross_entropy + {' + '.join(names)}"
    )
    if table:
        write(_table_header(names))
    rows: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    with open(jsonl_path, "w", encoding="utf-8") as jsonl, client:
        for step, batch in zip(_progress(range(steps), progress), batches):
            t_step = time.perf_counter()
            future = regrad.forward_backward_custom(client, batch, regularizers=regularizers)
            client.optim_step(regrad.AdamParams(learning_rate=learning_rate))  # queued behind the backward
            result = future.result()
            # the telemetry's own duration_ms is the loss call's; the step (forward, loss, backward, Adam) is longer
            row = {"step": step, **result.telemetry.to_dict(), "step_ms": 1e3 * (time.perf_counter() - t_step)}
            rows.append(row)
            jsonl.write(json.dumps(row) + "\n")
            if table:
                write(_table_row(row, names))
    elapsed = time.perf_counter() - t0
    first, last = rows[0]["loss_total"], rows[-1]["loss_total"]
    write(f"loss_total {first:.4f} -> {last:.4f} in {elapsed:.1f} s; telemetry: {jsonl_path}")
    if table:
        for line in _summary(rows[-1], names):
            write(line)
    plot = _plot(rows, names, os.path.join(out, "curves.png"))
    write(plot)
    return rows


def _spec_name(spec: Any) -> str:
    return str(spec["name"]) if isinstance(spec, dict) else str(getattr(spec, "name", spec))


def _writer(stream: TextIO) -> Any:
    """Prints through tqdm when it is installed, so lines do not break the progress bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda line: print(line, file=stream, flush=True)
    return lambda line: tqdm.write(line, file=stream)


def _progress(steps: range, enabled: bool) -> Any:
    if not enabled or sys.stderr is None:  # `regrad demo 2>&-`: nowhere to draw the bar
        return steps
    try:
        from tqdm import tqdm
    except ImportError:
        return steps
    return tqdm(steps, desc="regrad demo", unit="step", file=sys.stderr, leave=False)


def _table_header(names: List[str]) -> str:
    cols = ["step", "loss_total", "cross_ent"] + [n[:12] for n in names] + ["|grad|", "step ms"]
    return " ".join(f"{c:>12}" if i else f"{c:>5}" for i, c in enumerate(cols))


def _table_row(row: Dict[str, Any], names: List[str]) -> str:
    regs = row["regularizers"]
    cells = [f"{row['step']:>5}", f"{row['loss_total']:>12.4f}", f"{row['base_loss']['value']:>12.4f}"]
    cells += [f"{regs[n]['contribution']:>12.4f}" for n in names]
    norm = row.get("total_grad_norm")
    cells += [f"{norm:>12.4f}" if norm is not None else f"{'-':>12}", f"{row['step_ms']:>12.1f}"]
    return " ".join(cells)


def _summary(row: Dict[str, Any], names: List[str]) -> List[str]:
    """The last step per term: value, weight, contribution, weighted gradient norm and gradient route."""
    lines = [f"{'term':>14} {'value':>12} {'weight':>8} {'contribution':>12} {'|grad|·w':>10}  route"]
    base = row["base_loss"]
    lines.append(f"{'cross_entropy':>14} {base['value']:>12.4f} {1.0:>8.3g} {base['value']:>12.4f} "
                 f"{base['grad_norm']:>10.4f}  {base['grad_method']}")
    for n in names:
        r = row["regularizers"][n]
        lines.append(f"{n[:14]:>14} {r['value']:>12.4f} {r['weight']:>8.3g} {r['contribution']:>12.4f} "
                     f"{r['grad_norm_weighted']:>10.4f}  {r['grad_method']}")
    return lines


def _plot(rows: List[Dict[str, Any]], names: List[str], path: str) -> str:
    """Loss terms and gradient norms per step, as a PNG; returns a line saying where, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'regrad[demo]')"
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [r["loss_total"] for r in rows], label="loss_total", linewidth=2)
    ax_loss.plot(steps, [r["base_loss"]["value"] for r in rows], label="cross_entropy")
    for n in names:
        ax_loss.plot(steps, [r["regularizers"][n]["contribution"] for r in rows], label=f"{n} (weighted)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss terms")
    ax_loss.legend(fontsize=8)
    if rows[0].get("total_grad_norm") is not None:
        ax_grad.plot(steps, [r["total_grad_norm"] for r in rows], label="total", linewidth=2)
    ax_grad.plot(steps, [r["base_loss"]["grad_norm"] for r in rows], label="cross_entropy")
    for n in names:
        ax_grad.plot(steps, [r["regularizers"][n].get("grad_norm_weighted") for r in rows], label=f"{n} (weighted)")
    ax_grad.set_xlabel("step")
    ax_grad.set_ylabel("L2 norm of d/d(logprobs)")
    ax_grad.set_yscale("log")
    ax_grad.set_title("gradient norms")
    ax_grad.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"
