"""`regrad bench` edge cases: peers that are installed but cannot be imported, "est." rows whose full
run fits the budget, peers' medians, --json and --plot on one path, unit formatting (from an audit;
each test failed before its fix)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pytest

pytest.importorskip("torch")

from regrad.bench import suite  # noqa: E402
from regrad.bench.peers import timed_or_estimated  # noqa: E402
from regrad.bench.timing import fmt_bytes, fmt_time  # noqa: E402
from regrad.cli import main  # noqa: E402


def _without_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in ("scipy", "numdifftools")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "scipy", None)  # numdifftools is still found, but imports scipy


def test_default_peers_skip_numdifftools_without_scipy(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("numdifftools")
    _without_scipy(monkeypatch)
    rc = main(["bench", "--sizes", "20", "--routes", "kernels", "--repeats", "1", "--budget", "0.05", "--no-memory"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "peer 'numdifftools' skipped: scipy is not installed" in captured.err
    assert "numdifftools Gradient" not in captured.out


def test_named_numdifftools_without_scipy_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("numdifftools")
    _without_scipy(monkeypatch)
    assert main(["bench", "--sizes", "20", "--peers", "numdifftools", "--routes", "none"]) == 2
    err = capsys.readouterr().err
    assert "regrad bench: error: peer 'numdifftools' needs scipy" in err and "Traceback" not in err


def test_a_peer_that_cannot_be_set_up_is_a_failed_cell(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from regrad.bench import peers

    def moved(*args: object, **kwargs: object) -> None:
        raise ImportError("cannot import name '_get_numerical_jacobian' from 'torch.autograd.gradcheck'")

    monkeypatch.setattr(peers, "gradcheck_runner", moved)
    rc = main(["bench", "--sizes", "20", "--routes", "kernels", "--peers", "gradcheck", "--repeats", "1",
               "--no-memory"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "1 cell(s) failed: torch gradcheck numerical Jacobian" in captured.err
    assert "regrad kernels" in captured.out  # the other routes still ran and were printed


N = 1000


def _problem() -> suite.Problem:
    return suite.Problem(N, "float32", [N], [], np.zeros(N, np.float32), np.ones(N))


def _route(fixed: float, per_coordinate: float) -> suite.Route:
    def run(limit: Optional[int]) -> Tuple[np.ndarray, Optional[int]]:
        k = N if limit is None else limit
        time.sleep(fixed + k * per_coordinate)
        return np.ones(k), 2 * k

    return suite.Route("fake", "fake route", "regrad", run, prefixable=True)


def test_a_full_run_that_fits_the_budget_is_measured_not_extrapolated() -> None:
    # 2 ms fixed + 10 µs per coordinate: the full run takes 12 ms, a 10th of budget / 2 = 100 ms
    res = suite.measure(_route(2e-3, 1e-5), _problem(), repeats=3, budget=0.2, memory=False)
    assert res.status == "ok", res.note
    assert res.error_coordinates == N and res.repeats >= 1
    assert res.seconds == pytest.approx(0.012, rel=0.5)


def test_a_full_run_that_does_not_fit_is_still_extrapolated() -> None:
    # 0.5 ms per coordinate: the full run would take 0.5 s > budget / 2
    res = suite.measure(_route(1e-3, 5e-4), _problem(), repeats=3, budget=0.2, memory=False)
    assert res.status == "est" and res.note.startswith("est.")
    assert res.seconds > 0.1


def test_a_full_run_is_timed_as_a_median_of_repeats() -> None:
    calls: List[Optional[int]] = []
    durations = iter([0.001, 0.060])  # the prefix probe, then one slow (cold) full run; later runs 10 ms

    def run(limit: Optional[int]) -> List[float]:
        calls.append(limit)
        time.sleep(next(durations, 0.010))
        return [0.0]

    seconds, grad, note = timed_or_estimated(run, n=100, budget=5.0, est_prefix=10)
    assert grad == [0.0] and note == ""
    assert calls.count(None) >= 3  # a median needs repeats
    assert seconds < 0.03  # the median, not the one slow run


def test_json_and_plot_on_the_same_path_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "out.png"
    rc = main(["bench", "--sizes", "10", "--routes", "kernels", "--peers", "none", "--repeats", "1", "--no-memory",
               "--json", str(path), "--plot", str(tmp_path / "." / "out.png")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "regrad bench: error:" in err and "same file" in err
    assert not path.exists()


@pytest.mark.parametrize("seconds, text", [
    (0.0009996, "1.00 ms"), (0.9999996, "1.00 s"), (0.000999, "999 µs"), (0.5, "500.00 ms"), (2.5, "2.50 s"),
    (1.234e-4, "123 µs"),
])
def test_fmt_time_units(seconds: float, text: str) -> None:
    assert fmt_time(seconds) == text


@pytest.mark.parametrize("nbytes, text", [
    (0, "0 B"), (500, "500 B"), (2**20 - 1, "1.0 MiB"), (3 * 2**10, "3 KiB"), (2**30 - 1, "1.00 GiB"),
    (5 * 2**20, "5.0 MiB"),
])
def test_fmt_bytes_units(nbytes: int, text: str) -> None:
    assert fmt_bytes(nbytes) == text
