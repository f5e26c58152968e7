"""What f0 saves in compose: numerical terms with method="forward" (8 x 256 float32 log-probs,
sparsity forms of bench_numerical), side by side in one process, interleaved medians of
`loss_fn.evaluate`: the value call's loss handed on as f0 (now) vs the engine evaluating fn at x
again (regrad.grad.reads_f0 patched to False: the behaviour before f0). Not a test."""

import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import regrad  # noqa: E402
from bench_numerical import make_sparsity_forms  # noqa: E402
from regrad import RegularizerSpec  # noqa: E402

GRAD = sys.modules["regrad.grad"]


def main(rounds: int = 25, per_round: int = 20) -> None:
    _, _, per_datum_vec, per_token = make_sparsity_forms(8)
    rng = np.random.default_rng(0)
    lps = [torch.from_numpy(-(0.01 + rng.exponential(2, 256))).float() for _ in range(8)]
    data = [None] * 8
    cases = {
        "token": RegularizerSpec.sync("t", 1.0, per_token, grad="numerical", method="forward", structure="token"),
        "datum vectorized": RegularizerSpec.sync("d", 1.0, per_datum_vec, grad="numerical", method="forward",
                                                 structure="datum", vectorized=True),
    }
    real = GRAD.reads_f0
    for name, spec in cases.items():
        loss_fn = regrad.compose(None, [spec], parallel=False)
        times = {True: [], False: []}
        for _ in range(50):
            loss_fn.evaluate(data, lps)
        for _ in range(rounds):
            for handed_on in (True, False):
                GRAD.reads_f0 = real if handed_on else (lambda *args, **kwargs: False)
                t0 = time.perf_counter()
                for _ in range(per_round):
                    loss_fn.evaluate(data, lps)
                times[handed_on].append((time.perf_counter() - t0) / per_round)
        GRAD.reads_f0 = real
        now, before = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name}: f0 handed on {now * 1e6:.0f} us, engine re-evaluates x {before * 1e6:.0f} us, "
              f"ratio {before / now:.2f}")


if __name__ == "__main__":
    main()
