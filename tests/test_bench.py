"""`regrad bench`: a reduced quick profile through the CLI (JSON fields, sane values, PNG plot) and bad input.

No timing assertions: only that the command runs and reports what it should.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

pytest.importorskip("torch")

from regrad.cli import main  # noqa: E402

RESULT_FIELDS = {"route", "label", "kind", "n", "dtype", "status", "seconds", "repeats", "ratio_to_autograd",
                 "max_abs_error", "max_rel_error", "error_coordinates", "peak_rss_extra_bytes", "peak_traced_bytes",
                 "nfev", "note"}
EXACT_ROUTES = {"autograd": 1e-5, "kernels": 1e-5, "token": 1e-3, "token-richardson": 1e-3}


def _run(tmp_path: Path, *extra: str) -> Dict[str, Any]:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--profile", "quick", "--sizes", "100", "1000", "--budget", "0.2", "--repeats", "2",
               "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_quick_profile_json_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    record = _run(tmp_path, "--plot", str(png))
    printed = capsys.readouterr().out
    assert "torch autograd" in printed and "vs autograd" in printed and "max rel err" in printed

    assert record["profile"] == "quick" and record["dtype"] == "float32" and record["sizes"] == [100, 1000]
    assert {"date", "machine", "loss", "memory_note", "budget_s", "repeats", "routes", "peers", "crossovers"} <= set(record)
    assert "cpu" in record["machine"] and "torch" in record["machine"]
    results: List[Dict[str, Any]] = record["results"]
    names = {r["route"] for r in results}
    assert {"autograd", "kernels", "token", "token-richardson", "datum", "batch", "spsa", "gaussian"} <= names
    assert set(record["peers"]) <= names
    for r in results:
        assert set(r) == RESULT_FIELDS
        assert r["status"] in ("ok", "est", "skipped", "failed"), r
        assert r["status"] != "failed", r["note"]
        if r["status"] in ("ok", "est"):
            assert r["seconds"] > 0 and r["ratio_to_autograd"] > 0
            assert math.isfinite(r["max_abs_error"]) and math.isfinite(r["max_rel_error"])
            assert r["error_coordinates"] > 0 and r["nfev"] >= 1
        if r["status"] == "est":
            assert r["note"].startswith("est.")
        if r["route"] == "autograd":
            assert r["ratio_to_autograd"] == pytest.approx(1.0)
        if r["route"] in EXACT_ROUTES:
            assert r["status"] == "ok" and r["error_coordinates"] == r["n"]
            assert r["max_rel_error"] < EXACT_ROUTES[r["route"]], r
        if r["route"] == "token":
            assert r["nfev"] == 2
    assert {"kernels", "token", "batch"} <= set(record["crossovers"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_float64_is_more_accurate(tmp_path: Path) -> None:
    record = _run(tmp_path, "--dtype", "float64", "--routes", "kernels", "token", "batch", "--peers", "none",
                  "--no-memory")
    by_route = {(r["route"], r["n"]): r for r in record["results"]}
    assert by_route[("autograd", 1000)]["max_rel_error"] < 1e-12
    assert by_route[("kernels", 1000)]["max_rel_error"] < 1e-12
    assert by_route[("token", 1000)]["max_rel_error"] < 1e-8
    assert by_route[("batch", 100)]["max_rel_error"] < 1e-5
    assert {r["route"] for r in record["results"]} == {"autograd", "kernels", "token", "batch"}


def test_python_dash_m_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "regrad.bench", "--sizes", "50", "--routes", "kernels", "--peers",
                           "none", "--repeats", "1", "--no-memory"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "regrad kernels" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--routes", "nope"], "unknown route 'nope'"),
        (["--routes", "token,bogus"], "unknown route 'bogus'"),
        (["--peers", "matlab"], "unknown peer 'matlab'"),
        (["--sizes", "0"], "must be positive"),
        (["--sizes", "-5"], "must be positive"),
        (["--sizes", "1.5"], "not an integer"),
        (["--sizes", "abc"], "not a number"),
        (["--sizes", "1e9"], "larger than the limit"),
        (["--sizes", "nan"], "not an integer"),
        (["--dtype", "float16"], "invalid choice"),
        (["--profile", "slow"], "invalid choice"),
        (["--repeats", "0"], "--repeats"),
        (["--repeats", "two"], "invalid int value"),
        (["--budget", "-1"], "--budget"),
        (["--json", "/no/such/folder/out.json"], "does not exist"),
        (["--json", "/"], "is a folder"),
        (["--json", ""], "needs a file path"),
        (["--plot", "curves.xyz"], "must end in one of .png, .svg, .pdf"),
        (["--plot", "curves"], "must end in one of"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_bad_input_exits_2_with_a_message(args: List[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert "regrad bench: error:" in err and message in err
    assert "Traceback" not in err


def test_missing_optional_peer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "numdifftools", None)  # find_spec then reports it missing
    assert main(["bench", "--peers", "numdifftools"]) == 2
    err = capsys.readouterr().err
    assert "numdifftools" in err and "not installed" in err and "Traceback" not in err
    # by default a missing peer is left out, and said so
    assert main(["bench", "--sizes", "20", "--routes", "kernels", "--repeats", "1", "--budget", "0.05", "--no-memory"]) == 0
    captured = capsys.readouterr()
    assert "peer 'numdifftools' skipped: numdifftools is not installed" in captured.err
    assert "numdifftools Gradient" not in captured.out


def test_missing_matplotlib_for_plot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_predicted_skips_count_a_fixed_cost_and_never_skip_the_reference() -> None:
    from regrad.bench import suite

    assert suite._predict([(100, 1e-3)], 10**6) is None  # one size: measure rather than guess
    # 0.1 ms fixed + 1 ns per log-prob, read from two sizes
    assert suite._predict([(100, 1e-4 + 1e-7), (10_000, 1e-4 + 1e-5)], 10**6) == pytest.approx(1e-4 + 1e-3)
    assert suite._predict([(100, 2e-3), (1000, 1e-3)], 10**6) == pytest.approx(1e-3)  # noisy: no negative slope


def test_far_apart_sizes_measure_autograd_and_estimated_ratios_say_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--sizes", "10", "3e4", "--routes", "kernels,batch", "--peers", "none", "--repeats", "1",
                 "--budget", "0.05", "--no-memory"]) == 0
    out = capsys.readouterr().out
    autograd_big = [line for line in out.splitlines() if line.startswith("torch autograd") and "30,000" in line]
    assert autograd_big and "skipped" not in autograd_big[0]
    batch_big = [line for line in out.splitlines() if line.startswith("regrad batch") and "30,000" in line]
    assert batch_big and batch_big[0].count("est.") >= 2  # time and ratio (and nfev) are estimates
    assert "30,000: est. " in out  # the crossover sentence marks the estimated ratio


def test_an_output_that_cannot_be_written_or_a_failed_route_exits_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from regrad.bench import report, suite

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_json", disk_full)
    args = ["bench", "--sizes", "20", "--routes", "kernels", "--peers", "none", "--repeats", "1", "--no-memory"]
    assert main([*args, "--json", str(tmp_path / "b.json")]) == 1
    captured = capsys.readouterr()
    assert "could not write" in captured.err and "No space left" in captured.err and "regrad kernels" in captured.out
    monkeypatch.undo()

    def broken(problem: Any) -> Any:
        def run(k: Any) -> Any:
            raise RuntimeError("route broke")
        return run

    monkeypatch.setattr(suite, "_kernels_run", broken)
    assert main(args) == 1
    assert "1 cell(s) failed: regrad kernels" in capsys.readouterr().err
