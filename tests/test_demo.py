"""`regrad demo` and the console script: runs end to end, writes its files, lowers loss_total."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
import regrad  # noqa: E402
from regrad import cli, demo  # noqa: E402

needs_compose = pytest.mark.skipif(
    not (hasattr(regrad, "compose") and hasattr(regrad, "numerical_grad")),
    reason="the demo needs regrad.compose and regrad.numerical_grad",
)


@needs_compose
def test_demo_runs_end_to_end_and_writes_its_files(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "demo"
    code = cli.main(["demo", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "loss_total" in printed and "repeats" in printed and "remote_check" in printed
    lines = (out / "telemetry.jsonl").read_text().splitlines()
    assert len(lines) == 4
    row = json.loads(lines[-1])
    assert row["step"] == 3
    for r in map(json.loads, lines):  # the step includes the loss call, whose telemetry duration_ms is kept
        assert r["step_ms"] >= r["duration_ms"] > 0
    assert set(row["regularizers"]) == {"l1", "entropy", "repeats", "remote_check"}
    reg = row["regularizers"]
    assert row["loss_total"] == pytest.approx(row["base_loss"]["value"] + sum(r["contribution"] for r in reg.values()))
    assert reg["repeats"]["grad_method"].startswith("numerical")
    if _has("matplotlib"):
        assert (out / "curves.png").stat().st_size > 1000
        assert "plot:" in printed
    else:
        assert "plot skipped" in printed


@needs_compose
def test_training_with_the_demo_regularizers_lowers_loss_total(tmp_path: Path) -> None:
    with open(tmp_path / "log.txt", "w") as log:
        rows = demo.run(steps=12, seed=3, out=tmp_path, batch_size=4, seq_len=32, progress=False, table=False, stream=log)
    totals = [r["loss_total"] for r in rows]
    assert sum(totals[-3:]) / 3 < sum(totals[:3]) / 3
    assert totals[-1] < totals[0]


def test_cli_usage_and_bench_without_module(capsys: Any, monkeypatch: Any) -> None:
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--steps" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "regrad.bench", None)  # as if regrad.bench were not installed
    assert cli.main(["bench"]) == 2
    assert "not available" in capsys.readouterr().err


def test_demo_rejects_bad_options(tmp_path: Path, capsys: Any) -> None:
    assert cli.main(["demo", "--seq-len", "500", "--out", str(tmp_path)]) == 2
    assert "--seq-len" in capsys.readouterr().err
    for lr in ("-1", "nan", "1e30"):
        assert cli.main(["demo", "--lr", lr, "--out", str(tmp_path)]) == 2
        assert "--lr must be in (0, 1]" in capsys.readouterr().err


def test_demo_rejects_an_unusable_out_folder_and_seed(tmp_path: Path, capsys: Any) -> None:
    # these raised FileExistsError / NotADirectoryError / numpy's ValueError with a traceback (exit 1)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        assert cli.main(["demo", "--steps", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("regrad demo: cannot write to --out") and "Traceback" not in err
    assert afile.read_text() == "x"
    for seed in ("-1", str(2**64)):
        assert cli.main(["demo", "--steps", "1", "--seed", seed, "--out", str(tmp_path / "d")]) == 2
        assert "--seed must be in [0, 2**64)" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_python_dash_m_regrad_runs_the_console_script() -> None:
    proc = subprocess.run([sys.executable, "-m", "regrad", "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--steps" in proc.stdout and "--out" in proc.stdout


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # an install without the torch extra
import regrad
from regrad import *  # noqa: F401,F403 - names that need torch are left out of __all__
from regrad import cli
assert "LocalTrainingClient" not in regrad.__all__
try:
    regrad.LocalTrainingClient
except ImportError as err:
    assert "needs torch" in str(err), err
else:
    raise AssertionError("no ImportError")
import numpy as np
assert regrad.kernels.l1([np.array([-1.0, 2.0])], reduction="sum").value == 3.0
datum = regrad.Datum([0, 1], {"target_tokens": np.array([0, 1])})
value = regrad.compose(regrad.losses.cross_entropy, [regrad.l1(0.1)]).evaluate([datum], [np.array([-1.0, -2.0])])[0]
assert abs(value - (1.5 + 0.1 * 3.0)) < 1e-12, value
sys.exit(cli.main(["demo", "--steps", "1"]))
"""


def test_without_torch_the_numpy_api_works_and_torch_names_say_so() -> None:
    result = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "regrad demo needs torch" in result.stderr
