"""`regrad.check` with a user's grad_fn, and the `regrad check` command against independent references."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from regrad import InputError, check, cli  # noqa: E402
from regrad._check_cli import sample_batch  # noqa: E402


def entropy_like(data: Any, lps: List[Any]) -> Any:
    """Σ p·log p over every log-prob: smooth, with the hand-derived gradient p·(log p + 1)."""
    return sum((lp.exp() * lp).sum() for lp in lps)


def entropy_like_grad(data: Any, lps: List[Any]) -> List[Any]:
    return [np.exp(np.asarray(lp)) * (np.asarray(lp) + 1) for lp in lps]


def batch(*lengths: int, k: int = 0) -> List[Any]:
    rng = np.random.default_rng(3)
    return [torch.from_numpy(-rng.exponential(1.0, size=(n, k) if k else n)) for n in lengths]


def test_check_against_a_correct_grad_fn_passes_and_a_wrong_one_fails() -> None:
    lps = batch(5, 8, 3, k=2)
    good = check(entropy_like, None, lps, grad_fn=entropy_like_grad, method="richardson")
    assert good.passed and good.against == "grad_fn 'entropy_like_grad'"
    assert max(good.max_rel_error) < 1e-8
    for ref, lp in zip(good.reference, lps):  # the reference is the grad_fn's, unchanged
        np.testing.assert_array_equal(ref, entropy_like_grad(None, [lp])[0])

    def off_by_one_element(data: Any, lps: List[Any]) -> List[Any]:
        grads = entropy_like_grad(data, lps)
        grads[1][6, 1] += 0.01
        return grads

    bad = check(entropy_like, None, lps, grad_fn=off_by_one_element)
    assert not bad.passed and bad.worst == (1, 6 * 2 + 1)
    assert bad.max_abs_error[1] == pytest.approx(0.01, rel=1e-6)
    assert bad.max_abs_error[0] < 1e-8 and bad.max_abs_error[2] < 1e-8


def test_check_grad_fn_may_return_one_packed_array_and_works_without_autograd() -> None:
    arrays = [lp.numpy() for lp in batch(4, 6)]

    def numpy_fn(data: Any, lps: List[Any]) -> float:  # no torch graph: only grad_fn can be the reference
        return float(sum(np.sum(np.asarray(lp) ** 3) for lp in lps))

    packed = check(numpy_fn, None, arrays, grad_fn=lambda d, lps: np.concatenate([3 * np.asarray(lp) ** 2 for lp in lps]))
    assert packed.passed
    np.testing.assert_allclose(packed.reference[1], 3 * arrays[1] ** 2)
    with pytest.raises(InputError, match="cannot take tensors that require grad.*grad_fn="):
        check(numpy_fn, None, arrays)


@pytest.mark.parametrize(
    "grad_fn, message",
    [
        (lambda d, lps: [np.zeros(4)], r"returned 1 gradients; expected one per datum \(2\)"),
        (lambda d, lps: [np.zeros(4), np.zeros(5)], r"gradient of datum 1 has shape \(5,\); its log-probs have \(6,\)"),
        (lambda d, lps: np.zeros(7), "packed gradient of 7 values; the batch has 10 log-probs"),
        (lambda d, lps: 3.0, "returned float; expected a list with one gradient per datum"),
    ],
)
def test_check_names_a_bad_grad_fn_and_the_datum(grad_fn: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        check(entropy_like, None, batch(4, 6), grad_fn=grad_fn)


def test_check_grad_fn_gets_copies_and_nan_differences_are_named() -> None:
    lps = batch(4, 3)
    before = [lp.clone() for lp in lps]

    def scribbling_grad(data: Any, lps: List[Any]) -> List[Any]:
        grads = entropy_like_grad(data, lps)
        for lp in lps:
            lp.mul_(0.5)  # in place, on what check() handed over
        return grads

    assert check(entropy_like, None, lps, grad_fn=scribbling_grad).passed  # fn was differenced at the given point
    assert all(torch.equal(a, b) for a, b in zip(lps, before))

    def nan_at_1_2(data: Any, lps: List[Any]) -> List[Any]:
        grads = entropy_like_grad(data, lps)
        grads[1][2] = np.nan
        return grads

    bad = check(entropy_like, None, lps, grad_fn=nan_at_1_2)
    assert not bad.passed and bad.worst == (1, 2) and np.isnan(bad.max_abs_error[1])
    # a datum fn ignores: both gradients are 0, so its relative error is 0 even with atol=0 (not 0/0)
    ignored = check(lambda d, l: entropy_like(d, l[:1]), None, lps, atol=0.0)
    assert ignored.passed and ignored.max_rel_error[1] == 0.0 and ignored.max_abs_error[1] == 0.0


def test_check_rejects_async_grad_fn_bad_tolerances_and_scalar_token_losses() -> None:
    async def later(data: Any, lps: List[Any]) -> List[Any]:
        return entropy_like_grad(data, lps)

    with pytest.raises(InputError, match="returned an awaitable"):
        check(entropy_like, None, batch(3), grad_fn=later)
    with pytest.raises(InputError, match="atol and rtol must be finite and >= 0"):
        check(entropy_like, None, batch(3), atol=-1.0)
    with pytest.raises(InputError, match="structure='token'.*must return per-token losses"):
        check(entropy_like, None, batch(3, 2), structure="token")
    with pytest.raises(InputError, match="atol and rtol must be numbers"):
        check(entropy_like, None, batch(3), atol="abc")
    with pytest.raises(InputError, match=r"returned a loss of shape \(3,\); structure='batch' needs a scalar"):
        check(lambda d, l: l[0] ** 2, None, batch(3))
    with pytest.raises(InputError, match=r"structure='datum' needs one datum per log-prob array \(a list\): got None"):
        check(lambda d, lp: lp.sum(), None, batch(3), structure="datum")

    async def later_loss(data: Any, lps: List[Any]) -> Any:
        return entropy_like(data, lps)

    with pytest.raises(InputError, match="returned an awaitable .*calls fn synchronously"):
        check(later_loss, None, batch(3))
    with pytest.raises(InputError, match="the gradient of datum 1 is None"):
        check(entropy_like, None, batch(3, 2), grad_fn=lambda d, l: [np.zeros(3), None])
    with pytest.raises(InputError, match="returned dict; expected a list"):
        check(entropy_like, None, batch(3), grad_fn=lambda d, l: {"g": l})

    def inplace(data: Any, lps: List[Any]) -> Any:  # torch code with an in-place op on a leaf: its own error
        lps[0].mul_(1.0)
        return entropy_like(data, lps)

    with pytest.raises(RuntimeError, match="leaf Variable that requires grad .* in-place"):
        check(inplace, None, batch(3))


# ---- the `regrad check` command -----------------------------------------------------------------

MODULE = '''
import asyncio
import numpy as np
import regrad

def entropy_like(data, lps):
    return sum((lp.exp() * lp).sum() for lp in lps), {"note": 1.0}

def entropy_like_grad(data, lps):
    return [np.exp(np.asarray(lp)) * (np.asarray(lp) + 1) for lp in lps]

def half_grad(data, lps):
    return [0.5 * g for g in entropy_like_grad(data, lps)]

async def remote(data, lps):
    await asyncio.sleep(0)
    return sum((lp ** 2).sum() for lp in lps)

async def remote_grad(data, lps):
    return [2 * np.asarray(lp) for lp in lps]

def numpy_only(data, lps):
    return float(sum(np.sum(np.asarray(lp) ** 2) for lp in lps))

def raises(data, lps):
    raise ZeroDivisionError("my bug")

def nan_grad(data, lps):
    grads = entropy_like_grad(data, lps)
    grads[0][1] = float("nan")
    return grads

class AsyncPenalty:
    async def __call__(self, data, lps):
        return float("nan")

async_object = AsyncPenalty()
spsa_spec = regrad.RegularizerSpec.sync("noisy", 0.1, entropy_like, grad="spsa", num_samples=4)
per_token_spec = regrad.RegularizerSpec.sync("tok", 0.1, lambda d, lps: [lp.exp() * lp for lp in lps],
                                             grad="numerical", structure="per_token")
print("printed at import")

spec = regrad.RegularizerSpec.with_grad("entropy_like", 0.1, entropy_like, entropy_like_grad)
seed_dict = {"fn": entropy_like, "weight": 0.1, "name": "entropy_like"}
async_spec = regrad.RegularizerSpec.async_("remote", 0.5, remote, grad_fn=remote_grad)
'''


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: Any) -> Path:
    path = tmp_path / "my_regs.py"
    path.write_text(MODULE)
    monkeypatch.chdir(tmp_path)  # `regrad check my_regs:fn` finds the user's module in the working directory
    monkeypatch.delitem(sys.modules, "my_regs", raising=False)
    return path


def run_json(capsys: Any, *argv: str) -> Any:
    code = cli.main(["check", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_check_command_finds_the_reference_and_reports_true_errors(user_module: Path, capsys: Any) -> None:
    code, out = run_json(capsys, "my_regs:entropy_like", "--lengths", "6,3", "--method", "richardson")
    assert code == 0 and out["passed"] and out["against"] == "autograd" and out["shapes"] == [[6], [3]]
    # the reported errors are the distance from the hand-derived gradient, recomputed here
    data, lps = sample_batch([6, 3], 0, "float64", 0)
    grads = regrad.numerical_grad(lambda d, l: entropy_like(d, l), data, lps, method="richardson").grads
    exact = entropy_like_grad(data, lps)
    for j in range(2):
        assert out["max_abs_error"][j] == pytest.approx(float(np.max(np.abs(grads[j].numpy() - exact[j]))), abs=1e-14)
    code, out = run_json(capsys, "my_regs:spec")
    assert code == 0 and out["against"] == "grad_fn 'entropy_like_grad'"
    code, out = run_json(capsys, str(user_module) + ":seed_dict", "--dtype", "float32", "--top-k", "4")
    assert code == 0 and out["against"] == "autograd" and out["dtype"] == "float32" and out["shapes"][0][1] == 4
    code, out = run_json(capsys, "my_regs:async_spec")  # async fn and async grad_fn are awaited
    assert code == 0 and out["against"] == "grad_fn 'remote_grad'"


def test_check_command_json_is_strict_and_alone_on_stdout(user_module: Path, capsys: Any) -> None:
    code = cli.main(["check", "my_regs:entropy_like", "--grad-fn", "my_regs:nan_grad", "--json", "--lengths", "4,3"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # the module's print went to stderr; NaN is null, not a bare NaN token
    assert "printed at import" in captured.err and "NaN" not in captured.out
    assert code == 1 and out["max_abs_error"][0] is None and out["worst"]["datum"] == 0 and out["worst"]["token"] == 1
    assert out["worst"]["reference"] is None


def test_check_command_takes_specs_as_grad_fn_files_of_any_name_and_canonical_structures(
        user_module: Path, capsys: Any) -> None:
    code, out = run_json(capsys, "my_regs:entropy_like", "--grad-fn", "my_regs:spec")
    assert code == 0 and out["against"] == "grad_fn 'entropy_like_grad'"
    code, out = run_json(capsys, "my_regs:entropy_like", "--grad-fn", "l2")  # a built-in's analytic gradient: wrong here
    assert code == 1 and out["against"] == "the analytic gradient of l2"
    copy = user_module.with_name("regs_without_suffix")
    copy.write_text(MODULE)
    code, out = run_json(capsys, f"./{copy.name}:entropy_like")
    assert code == 0 and out["target"] == f"./{copy.name}:entropy_like"
    code, out = run_json(capsys, "my_regs:per_token_spec")  # the spec's alias "per_token", reported by its name
    assert code == 0 and out["structure"] == "token"
    code = cli.main(["check", "my_regs:spsa_spec"])  # randomized route: checked by central differences, said so
    err = capsys.readouterr().err
    assert code == 0 and "takes a randomized gradient (spsa)" in err


def test_check_command_fails_a_wrong_gradient_and_names_the_element(user_module: Path, capsys: Any) -> None:
    code = cli.main(["check", "my_regs:entropy_like", "--grad-fn", "my_regs:half_grad", "--lengths", "5"])
    text = capsys.readouterr().out
    assert code == 1 and "FAIL" in text and "vs grad_fn 'half_grad'" in text
    data, lps = sample_batch([5], 0, "float64", 0)
    exact = entropy_like_grad(data, lps)[0]
    worst = int(np.argmax(np.abs(exact)))  # half the gradient is furthest off where the gradient is largest
    assert f"largest difference at datum 0, token {worst}:" in text


@pytest.mark.parametrize("name, top_k", [("l1", 0), ("l2", 0), ("entropy", 5), ("cross_entropy", 0)])
def test_check_command_checks_the_builtins_against_their_analytic_gradient(name: str, top_k: int, capsys: Any) -> None:
    code, out = run_json(capsys, name, "--top-k", str(top_k))
    assert code == 0 and out["against"] == f"the analytic gradient of {name}"
    assert max(out["max_rel_error"]) < 1e-5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nowhere_module_x:fn"], "cannot import module 'nowhere_module_x'"),
        (["my_regs:missing"], "'my_regs' has no attribute 'missing'"),
        (["my_regs"], "neither module:name, file.py:name nor a built-in"),
        (["missing_file.py:fn"], "no such file"),
        (["my_regs:MODULE_CONSTANT"], "has no attribute"),
        (["my_regs:np"], "is a module, not a function or a regularizer spec"),
        (["my_regs:numpy_only"], "cannot take tensors that require grad"),
        (["l1", "--lengths", "3,0"], "--lengths must list 1 to 4096"),
        (["l1", "--top-k", "-1"], "--top-k must be >= 0"),
        (["l1", "--atol", "-1"], "atol and rtol must be finite"),
        (["my_regs:raises"], "could not be checked: ZeroDivisionError: my bug"),
        (["my_regs:async_object"], "fn 'AsyncPenalty' does not return a torch loss"),  # named by its class
        (["l1", "--seed", "-1"], "--seed must be >= 0"),
        (["l1", "--top-k", "100000", "--lengths", "2"], "would hold 200,000 log-probs"),
        (["my_regs:entropy_like", "--grad-fn", "my_regs:np"], "--grad-fn my_regs:np is a module, not a gradient"),
        (["my_regs:entropy_like", "--grad-fn", "my_regs:seed_dict"], "is a dict, not a gradient function"),
    ],
)
def test_check_command_bad_targets_and_options_exit_2_with_a_message(user_module: Path, capsys: Any, argv: List[str],
                                                                      message: str) -> None:
    assert cli.main(["check", *argv]) == 2
    assert message in capsys.readouterr().err


def test_check_console_script_runs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "regrad", "check", "entropy", "--lengths", "4,2", "--top-k", "3"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "PASS" in done.stdout and "vs the analytic gradient of entropy" in done.stdout


_NO_TORCH = """
import json, sys
sys.modules["torch"] = None  # an install without the torch extra
import numpy as np
from regrad import check, cli
lps = [np.array([-0.5, -1.5]), np.array([-2.0])]
result = check(lambda d, l: float(sum(np.sum(a ** 3) for a in l)), None, lps,
               grad_fn=lambda d, l: [3 * a ** 2 for a in l])
assert result.passed and result.against.startswith("grad_fn"), result
assert cli.main(["check", "regrad.demo:repeat_penalty"]) == 2  # no reference without torch: a message, not a crash
sys.exit(cli.main(["check", "l2", "--top-k", "2", "--json"]))
"""


def test_without_torch_check_takes_a_grad_fn_and_the_command_checks_builtins() -> None:
    done = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch is not installed (pip install 'regrad[torch]')" in done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["against"] == "the analytic gradient of l2"
