"""`regrad demo` / `regrad check` edge cases (from an audit; each test failed before its fix): a closed
stdout or stderr, Ctrl-C, sys.exit in the user's code, unwritable output files, option bounds, and
checks whose cost grows as data x log-probs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
import regrad  # noqa: E402
import regrad._check  # noqa: E402
from regrad import cli, demo  # noqa: E402


# ---- `regrad ... | head`: a closed stdout and Ctrl-C end the command quietly, without a traceback (and check never
# reports exit 1, which means FAIL, for a check that did not fail).


def _with_closed_stdout(*argv: str, cwd: Path) -> "tuple[int, str]":
    proc = subprocess.Popen([sys.executable, "-m", "regrad", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=cwd)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader went away before the first line, as `| head -0` or `| true`
    with proc.stderr:
        err = proc.stderr.read().decode()
    return proc.wait(timeout=120), err


@pytest.mark.parametrize("argv", [("check", "l1", "--lengths", "3,2"),
                                  ("demo", "--steps", "1", "--batch-size", "1", "--seq-len", "4", "--no-progress")])
def test_a_closed_stdout_is_no_traceback(tmp_path: Path, argv: Any) -> None:
    if argv[0] == "demo":
        argv = (*argv, "--out", str(tmp_path / "out"))
    code, err = _with_closed_stdout(*argv, cwd=tmp_path)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert code not in (0, 1)  # neither "passed" nor, for check, "failed"


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    def interrupted(**kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", interrupted)
    try:
        code = cli.main(["demo", "--steps", "1", "--out", str(tmp_path)])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped cli.main: the user sees a traceback")
    assert code == 130
    assert "interrupted" in capsys.readouterr().err


# ---- `regrad check` of a fn (or module) that calls sys.exit(0) must not exit 0, which means PASS.


@pytest.mark.parametrize("body", ["def fn(data, lps):\n    sys.exit(0)\n",
                                  "sys.exit(0)\ndef fn(data, lps):\n    return 0.0\n"])
def test_sys_exit_in_the_users_code_is_not_a_pass(tmp_path: Path, capsys: Any, body: str) -> None:
    path = tmp_path / "exits.py"
    path.write_text("import sys\n" + body)
    try:
        code = cli.main(["check", f"{path}:fn", "--json"])
    except SystemExit as exit_:
        pytest.fail(f"SystemExit({exit_.code!r}) escaped `regrad check`: the process exits {exit_.code!r} with no report")
    assert code == 2
    assert "sys.exit(0)" in capsys.readouterr().err


# ---- `regrad demo --out DIR` where DIR's output files cannot be written: one line and exit 2, before training.


@pytest.mark.parametrize("name", ["telemetry.jsonl", "curves.png"])
def test_an_output_file_that_is_a_folder_is_a_usage_error(tmp_path: Path, capsys: Any, monkeypatch: Any,
                                                           name: str) -> None:
    (tmp_path / name).mkdir()
    ran = []
    real_run = demo.run
    monkeypatch.setattr(demo, "run", lambda **kw: ran.append(1) or real_run(**kw))
    try:
        code = cli.main(["demo", "--steps", "1", "--batch-size", "1", "--seq-len", "4", "--no-progress", "--quiet",
                         "--out", str(tmp_path)])
    except OSError as err:
        pytest.fail(f"{type(err).__name__} traceback (exit 1) instead of a usage error: {err}")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("regrad demo: cannot write to --out") and name in err
    assert not ran  # refused before the training run, not after it


# ---- `regrad demo` bounds: each option named with its value; huge --steps / --batch-size are usage errors, not a
# numpy MemoryError traceback; batches are drawn per step (the same numbers as demo_batches).


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--steps", str(10**12)), ("--batch-size", "0"),
                                           ("--batch-size", str(10**11)), ("--seq-len", "0")])
def test_out_of_range_options_are_named_with_their_value(tmp_path: Path, capsys: Any, option: str, value: str) -> None:
    try:
        code = cli.main(["demo", option, value, "--no-progress", "--quiet", "--out", str(tmp_path)])
    except MemoryError as err:
        pytest.fail(f"MemoryError traceback: {err}")
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"regrad demo: {option} must be in") and f"got {value}" in err, err


def test_run_draws_the_batches_of_demo_batches_one_step_at_a_time(tmp_path: Path, monkeypatch: Any) -> None:
    expected = demo.demo_batches(3, 5, 16, 11)
    monkeypatch.setattr(demo, "demo_batches", lambda *a: pytest.fail("run() built every batch up front"))
    seen = []
    real = regrad.forward_backward_custom
    monkeypatch.setattr(regrad, "forward_backward_custom", lambda client, batch, **kw: seen.append(batch) or real(client, batch, **kw))
    with open(tmp_path / "log.txt", "w") as log:
        demo.run(steps=3, seed=11, out=tmp_path, batch_size=5, seq_len=16, progress=False, table=False, stream=log)
    assert [[d.loss_fn_inputs["target_tokens"].tolist() for d in b] for b in seen] == \
           [[d.loss_fn_inputs["target_tokens"].tolist() for d in b] for b in expected]


# ---- `regrad check --lengths` with thousands of short data: refused up front (the run grows as data x log-probs:
# 4,000 data of 1 token took 3.5 minutes, the 100,000 allowed would take about a day and a half).


def test_many_short_data_are_a_usage_error(capsys: Any, monkeypatch: Any) -> None:
    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the check ran")

    monkeypatch.setattr(regrad._check, "check", must_not_run)
    assert cli.main(["check", "l1", "--lengths", ",".join(["1"] * 4000)]) == 2
    err = capsys.readouterr().err
    assert "--lengths lists 4,000 data" in err and "the check ran" not in err, err


# ---- `regrad demo 2>&-` (stderr closed: sys.stderr is None): the progress bar is skipped, the demo runs.


def test_demo_runs_with_stderr_closed(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    pytest.importorskip("tqdm")  # the bar is what wrote to the closed stream
    monkeypatch.setattr(sys, "stderr", None)
    code = cli.main(["demo", "--steps", "1", "--batch-size", "1", "--seq-len", "4", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "telemetry.jsonl").read_text().count("\n") == 1
