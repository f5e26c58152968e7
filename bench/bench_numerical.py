"""Numerical gradients: regrad's engine against the per-element loop (the seed's Option A), scipy,
numdifftools, torch gradcheck's numerical Jacobian and torch autograd, in one run.

    python bench/bench_numerical.py [--budget SECONDS] [--markdown]

Cases: (a) the seed's `sparsity_penalty` over 8x256 and 64x(512..4096) float32 log-probs, (b) a
non-differentiable top-k penalty (numpy) on a dense 4096-vector, (c) the datum and batch
structures side by side across B x T (where "datum >= B x batch" starts to hold). Every row of
(a) and (b) reports the median time, the ratio to one loss evaluation, the speed-up over the
per-element loop, the max error vs the reference gradient (autograd, or the exact indicator for
top-k), and the tracemalloc peak (Python and numpy allocations; torch's allocator is not traced).
A method whose single run would exceed --budget seconds is timed on a prefix of the coordinates
and extrapolated ("est.").
glibc's mmap/trim thresholds are pinned for the whole run (both sides of every ratio) unless
--default-malloc: see regrad.bench.timing.pin_malloc.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

import regrad
from regrad.bench.peers import (  # the peers live in the package, shared with `regrad bench`
    flat,
    gradcheck_runner,
    numdifftools_runner,
    per_element_loop,
    scipy_runner,
    timed_or_estimated,
)
from regrad.bench.timing import fmt_bytes, fmt_time, median_seconds, pin_malloc
from regrad.bench.timing import peak_traced_bytes as peak_bytes

torch.set_num_threads(2)
NUMERICAL = sys.modules["regrad.numerical"]  # the module (regrad.numerical is also the wrapper function's name)


def sparsity_penalty(data: Any, logprobs_list: List[torch.Tensor]):
    """The seed's regularizer, verbatim."""
    l1_norms = [torch.norm(lp, p=1) for lp in logprobs_list]
    total_l1 = torch.sum(torch.stack(l1_norms))
    mean_l1 = total_l1 / len(logprobs_list)
    return mean_l1, {"l1_total": total_l1.item(), "l1_mean": mean_l1.item()}


def make_sparsity_forms(batch: int):
    def vectorized(data, lps):  # each lp is [P, T]: one loss per perturbed copy
        return torch.stack([lp.abs().sum(-1) for lp in lps]).sum(0) / batch

    def per_datum(datum, lp):  # the same total as a sum of per-datum terms
        return lp.abs().sum() / batch

    def per_datum_vectorized(datum, lp):
        return lp.abs().sum(-1) / batch

    def per_token(data, lps):  # also the vectorized per-token form: abs is elementwise, so [R, T] works as is
        return [lp.abs() / batch for lp in lps]

    return vectorized, per_datum, per_datum_vectorized, per_token


def topk_penalty(data: Any, logprobs_list: List[Any], k: int = 64):
    """Sum of the k largest log-probs, in numpy: torch cannot differentiate it."""
    x = np.asarray(logprobs_list[0])
    return float(np.partition(x, -k)[-k:].sum()), {}


def topk_penalty_vectorized(data: Any, logprobs_list: List[Any], k: int = 64):
    x = np.asarray(logprobs_list[0])
    return np.partition(x, -k, axis=-1)[..., -k:].sum(-1)


# ---- timing -------------------------------------------------------------------------------------


def median_time(run: Callable[[], Any], budget: float, min_repeats: int = 3, max_repeats: int = 7) -> float:
    """Median of at least min_repeats, at most max_repeats runs, stopping once past the budget."""
    return median_seconds(run, repeats=max_repeats, warmup=0, budget_s=budget, min_repeats=min_repeats)


class Table:
    def __init__(self, title: str, eval_time: float, reference: np.ndarray) -> None:
        self.title = title
        self.eval_time = eval_time
        self.reference = reference
        self.rows: List[Dict[str, Any]] = []
        self.loop_time: Optional[float] = None

    def add(self, name: str, seconds: float, grad: Optional[np.ndarray], memory: Optional[int], note: str = "") -> None:
        err = None if grad is None else float(np.max(np.abs(grad - self.reference)))
        if name.startswith("per-element loop"):
            self.loop_time = seconds
        self.rows.append(dict(name=name, seconds=seconds, err=err, memory=memory, note=note))
        print(f"  {name:<42} {fmt_time(seconds):>10}  {note}", file=sys.stderr, flush=True)

    def markdown(self) -> str:
        lines = [f"**{self.title}** (one loss evaluation: {fmt_time(self.eval_time)})", "",
                 "| method | time | x one eval | speed-up vs loop | max error | peak traced memory | note |",
                 "|---|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            speedup = "" if self.loop_time is None else f"{self.loop_time / r['seconds']:,.0f}x"
            err = "" if r["err"] is None else f"{r['err']:.1e}"
            memory = "" if r["memory"] is None else fmt_bytes(r["memory"])
            if r["seconds"] != r["seconds"]:  # NaN: not applicable
                lines.append(f"| {r['name']} | – | | | | | {r['note']} |")
                continue
            lines.append(
                f"| {r['name']} | {fmt_time(r['seconds'])} | {r['seconds'] / self.eval_time:,.1f} | {speedup} | "
                f"{err} | {memory} | {r['note']} |"
            )
        return "\n".join(lines)


# ---- cases --------------------------------------------------------------------------------------


def sparsity_case(lengths: List[int], budget: float, with_batch: bool) -> Table:
    rng = np.random.default_rng(0)
    # Log-probs of tokens with p <= 0.99: |x| >= 0.01 keeps the L1 kink at 0 farther than one float32 step.
    lps = [torch.from_numpy(-(0.01 + rng.exponential(2.0, size=t)).astype(np.float32)) for t in lengths]
    shapes = [tuple(lp.shape) for lp in lps]
    n = sum(lengths)
    batch = len(lengths)
    vec, per_datum, per_datum_vec, per_token = make_sparsity_forms(batch)
    leaves = [lp.clone().requires_grad_(True) for lp in lps]

    def autograd():
        for leaf in leaves:
            leaf.grad = None
        sparsity_penalty(None, leaves)[0].backward()
        return [leaf.grad for leaf in leaves]

    reference = flat(autograd())
    with torch.no_grad():
        eval_time = median_time(lambda: sparsity_penalty(None, lps), 0.5, 20, 200)
    title = f"(a) sparsity_penalty, {batch} x {lengths[0]}" if len(set(lengths)) == 1 else (
        f"(a) sparsity_penalty, {batch} x ({min(lengths)}..{max(lengths)}), {n:,} log-probs")
    table = Table(title, eval_time, reference)
    print(title, file=sys.stderr)

    table.add("torch autograd", median_time(autograd, 0.5, 5, 50), reference, peak_bytes(autograd))
    x0 = flat(lps)
    est = max(16, min(256, n // 8))
    seconds, grad, note = timed_or_estimated(lambda lim: per_element_loop(sparsity_penalty, lps, lim), n, budget, est)
    table.add("per-element loop (seed Option A)", seconds, grad, None, note)
    seconds, grad, note = timed_or_estimated(scipy_runner(sparsity_penalty, x0, shapes, True), n, budget, est)
    table.add("scipy approx_derivative 3-point", seconds, grad, None, note)
    seconds, grad, note = timed_or_estimated(numdifftools_runner(sparsity_penalty, x0, shapes, True), n, budget, est // 4)
    table.add("numdifftools Gradient", seconds, grad, None, note)
    seconds, grad, note = timed_or_estimated(gradcheck_runner(sparsity_penalty, lps, dtype=torch.float64), n, budget, est)
    table.add("torch gradcheck numerical Jacobian", seconds, grad, None, note)

    def rg(fn, **kw):
        return lambda: regrad.numerical_grad(fn, [None] * batch, lps, progress=False, **kw)

    runs = [("regrad token", rg(per_token, structure="token"))]
    runs.append(("regrad token, vectorized", rg(per_token, structure="token", vectorized=True)))
    runs.append(("regrad token, richardson", rg(per_token, structure="token", method="richardson")))
    runs.append(("regrad datum, vectorized", rg(per_datum_vec, structure="datum", vectorized=True)))
    if with_batch:
        runs.append(("regrad datum", rg(per_datum, structure="datum")))
        runs.append(("regrad batch, vectorized", rg(vec, vectorized=True)))
        runs.append(("regrad batch", rg(sparsity_penalty)))
    for name, run in runs:
        t0 = time.perf_counter()
        result = run()
        first = time.perf_counter() - t0
        seconds = median_time(run, budget, 3, 200) if first < budget else first  # fast rows: as many repeats as the eval
        memory = peak_bytes(run) if first < budget / 4 else None
        table.add(name, seconds, flat(result.grads), memory, f"{result.ncalls:,} calls")
    if not with_batch:
        # The batch structure is O(n^2) work here: time a slice and extrapolate.
        probe = [lp[:32] for lp in lps]
        t0 = time.perf_counter()
        regrad.numerical_grad(sparsity_penalty, None, probe, progress=False)
        per_call = (time.perf_counter() - t0) / (2 * sum(lp.numel() for lp in probe))
        table.add("regrad batch", per_call * 2 * n, None, None, "est. from a 32-token slice")
    if with_batch:
        table.rows.append(vectorized_overhead(lps, vec, budget))
        print(f"  {table.rows[-1]['name']:<42} {table.rows[-1]['note']}", file=sys.stderr)
        table.rows.append(datum_floor(lps, vec, per_datum_vec))
        print(f"  {table.rows[-1]['name']:<42} {table.rows[-1]['note']}", file=sys.stderr)
    return table


def vectorized_overhead(lps: List[torch.Tensor], vec: Callable, budget: float) -> Dict[str, Any]:
    """fn alone on the same blocks regrad hands it (built beforehand) vs regrad's whole vectorized run."""
    result = regrad.numerical_grad(vec, None, lps, vectorized=True, progress=False)
    rows, n = result.block_rows, sum(lp.numel() for lp in lps)
    total = 2 * n
    blocks = []
    for q in range(0, total, rows):
        count = min(rows, total - q)
        block = [lp.unsqueeze(0).repeat(count, *([1] * lp.dim())) for lp in lps]
        blocks.append(block)

    def fn_only():
        with torch.no_grad():
            for block in blocks:
                vec(None, block)

    # Interleaved pairs: both see the same machine load (the host is shared).
    fn_times, engine_times = [], []
    for _ in range(15):
        t0 = time.perf_counter()
        fn_only()
        fn_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        regrad.numerical_grad(vec, None, lps, vectorized=True, progress=False)
        engine_times.append(time.perf_counter() - t0)
    fn_time, engine_time = statistics.median(fn_times), statistics.median(engine_times)
    return dict(name="fn alone on the stacked perturbations", seconds=fn_time, err=None, memory=None,
                note=f"interleaved with regrad batch vectorized ({fmt_time(engine_time)}): ratio {engine_time / fn_time:.2f}")


def datum_vs_batch(lps: List[torch.Tensor], vec: Callable, per_datum_vec: Callable, rounds: int = 15,
                   with_floor: bool = True) -> Dict[str, float]:
    """Medians of the datum floor, regrad's datum route and regrad's batch route (all vectorized),
    interleaved so all three see the same machine load. The floor is the least any datum-structure
    engine must do while each datum's copies fit one block: per datum, x into the 2 T rows of one
    reused block (torch's copy) and one call of fn, with no perturbation and no bookkeeping;
    batch / floor is then the most the "datum >= B x batch" figure can reach on this host."""
    rows = max(2 * lp.numel() for lp in lps)
    block = torch.empty(rows * max(lp.numel() for lp in lps), dtype=lps[0].dtype)
    views = [block[: 2 * lp.numel() * lp.numel()].view(2 * lp.numel(), *lp.shape) for lp in lps]

    def floor():
        with torch.no_grad():
            for lp, view in zip(lps, views):
                view.copy_(lp)
                per_datum_vec(None, view)

    runs = {
        **({"floor": floor} if with_floor else {}),
        "datum": lambda: regrad.numerical_grad(per_datum_vec, [None] * len(lps), lps, structure="datum",
                                               vectorized=True, progress=False),
        "batch": lambda: regrad.numerical_grad(vec, None, lps, vectorized=True, progress=False),
    }
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm: buffers, caches
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def datum_floor(lps: List[torch.Tensor], vec: Callable, per_datum_vec: Callable) -> Dict[str, Any]:
    """The datum floor as a row of case (a), with batch / floor and batch / datum in its note."""
    t = datum_vs_batch(lps, vec, per_datum_vec)
    return dict(name="datum floor: x copies + fn alone, no engine", seconds=t["floor"], err=None, memory=None,
                note=f"interleaved: batch vectorized {fmt_time(t['batch'])} is {t['batch'] / t['floor']:.1f}x this floor "
                     f"and {t['batch'] / t['datum']:.1f}x regrad datum vectorized ({fmt_time(t['datum'])})")


SWEEP = [(4, 256), (8, 256), (16, 256), (24, 256), (32, 256), (8, 512), (16, 512), (4, 1024), (8, 1024)]


def sweep_case() -> str:
    """Datum vs batch structure (vectorized, sparsity_penalty, B data of T float32 log-probs) across
    sizes: how batch / datum compares with B as the per-call costs of fn stop dominating. The floor
    is timed only where a datum's 2 T copies fit one preferred block (beyond, regrad splits them and
    a one-block "floor" is slower than the engine)."""
    title = "(c) datum vs batch structure across B x T (sparsity_penalty, vectorized, interleaved medians)"
    print(title, file=sys.stderr)
    lines = [f"**{title}**", "",
             "| B x T | batch | datum | batch / datum | / B | floor (copies + fn) | batch / floor |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for batch, length in SWEEP:
        rng = np.random.default_rng(0)
        lps = [torch.from_numpy(-(0.01 + rng.exponential(2.0, size=length)).astype(np.float32)) for _ in range(batch)]
        vec, _, per_datum_vec, _ = make_sparsity_forms(batch)
        one_block = 2 * length * length * lps[0].element_size() <= NUMERICAL.PREFERRED_BLOCK_BYTES
        t = datum_vs_batch(lps, vec, per_datum_vec, rounds=9, with_floor=one_block)
        ratio = t["batch"] / t["datum"]
        print(f"  {batch} x {length}: batch / datum {ratio:.1f} ({ratio / batch:.2f} B)", file=sys.stderr, flush=True)
        floor = f"{fmt_time(t['floor'])} | {t['batch'] / t['floor']:.1f}x" if one_block else "– | –"
        lines.append(f"| {batch} x {length} | {fmt_time(t['batch'])} | {fmt_time(t['datum'])} | {ratio:.1f}x | "
                     f"{ratio / batch:.2f} | {floor} |")
    return "\n".join(lines)


def topk_case(budget: float) -> Table:
    rng = np.random.default_rng(1)
    x = rng.normal(size=4096)
    lps = [x]
    reference = np.zeros(4096)
    reference[np.argsort(x)[-64:]] = 1.0
    eval_time = median_time(lambda: topk_penalty(None, lps), 0.5, 20, 500)
    title = "(b) top-k penalty (numpy, k = 64) on a dense 4,096-vector"
    table = Table(title, eval_time, reference)
    print(title, file=sys.stderr)
    torch_lps = [torch.from_numpy(x)]
    wrapped = lambda d, lps: (torch.tensor(topk_penalty(d, [np.asarray(lp) for lp in lps])[0], dtype=torch.float64), {})  # noqa: E731
    seconds, grad, note = timed_or_estimated(lambda lim: per_element_loop(wrapped, torch_lps, lim), 4096, budget, 256)
    table.add("per-element loop (seed Option A)", seconds, grad, None, note)
    seconds, grad, note = timed_or_estimated(scipy_runner(topk_penalty, x, [(4096,)], False), 4096, budget, 256)
    table.add("scipy approx_derivative 3-point", seconds, grad, None, note)
    seconds, grad, note = timed_or_estimated(numdifftools_runner(topk_penalty, x, [(4096,)], False), 4096, budget, 64)
    table.add("numdifftools Gradient", seconds, grad, None, note)
    gradcheck = gradcheck_runner(
        lambda d, lps: (torch.tensor(topk_penalty(d, [lp.detach().numpy() for lp in lps])[0], dtype=torch.float64), {}),
        torch_lps,
        dtype=torch.float64,
    )
    seconds, grad, note = timed_or_estimated(gradcheck, 4096, budget, 256)
    table.add("torch gradcheck numerical Jacobian", seconds, grad, None, note)
    table.rows.append(dict(name="torch autograd", seconds=float("nan"), err=None, memory=None, note="not defined (numpy)"))
    for name, kw, fn in [
        ("regrad batch", {}, topk_penalty),
        ("regrad batch, vectorized", {"vectorized": True}, topk_penalty_vectorized),
        ("regrad batch, spsa (64 samples)", {"method": "spsa", "num_samples": 64}, topk_penalty),
        ("regrad batch, spsa vectorized (64 samples)", {"method": "spsa", "num_samples": 64, "vectorized": True},
         topk_penalty_vectorized),
    ]:
        run = lambda fn=fn, kw=kw: regrad.numerical_grad(fn, None, lps, progress=False, **kw)  # noqa: E731
        result = run()
        table.add(name, median_time(run, budget), flat(result.grads), peak_bytes(run), f"{result.ncalls:,} calls")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per method before extrapolating")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's moving mmap/trim thresholds (fn's own time then swings with page faults)")
    parser.add_argument("--case", action="append", choices=("small", "large", "topk", "sweep"),
                        help="run only these cases: (a) 8 x 256, (a) 64 x (512..4096), (b) top-k, "
                             "(c) datum vs batch across sizes (default: all)")
    args = parser.parse_args()
    pinned = False if args.default_malloc else pin_malloc()
    lengths = sorted(np.random.default_rng(2).integers(512, 4097, size=64).tolist())
    cases = {
        "small": lambda: sparsity_case([256] * 8, args.budget, with_batch=True),
        "large": lambda: sparsity_case(lengths, args.budget, with_batch=False),
        "topk": lambda: topk_case(args.budget),
        "sweep": sweep_case,
    }
    tables = [cases[name]() for name in (args.case or cases)]
    info = regrad.build_info()
    header = (
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · python {platform.python_version()} · "
        f"regrad {info['version']} (openmp={info['openmp']}, threads={info['max_threads']}) · torch {torch.__version__} · "
        f"numpy {np.__version__} · malloc thresholds {'pinned at 64 MiB' if pinned else 'glibc default'}"
    )
    print(header)
    for t in tables:
        print()
        text = t if isinstance(t, str) else t.markdown()
        print(text if args.markdown else text.replace("|", " "))


if __name__ == "__main__":
    main()
