"""`regrad check TARGET`: a regularizer's numerical gradient against a reference, from the shell.

TARGET is `module:name` or `path/to/file.py:name` (a fn, a RegularizerSpec or the seed's dict
`{"fn", "weight", "name"}`), or a built-in: l1, l2, entropy, cross_entropy. The reference is
--grad-fn, else the spec's grad_fn, else the fn's analytic gradient (built-ins), else torch autograd. The batch is
generated: windows of the demo text as Datums, random log-probs. Exit 0 pass, 1 fail, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ._demo_corpus import TEXT
from .data import Datum, datum_from_text
from .errors import InputError, NonFiniteError, NumericalError
from .numerical import RANDOMIZED, STRUCTURES

__all__ = ["add_arguments", "run_from_args", "load_target", "sample_batch"]

BUILTINS = ("l1", "l2", "entropy", "cross_entropy")
MAX_ELEMENTS = 100_000  # log-probs in the generated batch: central differences call fn twice per element
MAX_WORK = 2_000_000  # log-probs x data: each of those calls also costs O(number of data) (4,000 data of 1 token: 3.5 min)
_RANDOMIZED_OPTIONS = ("method", "num_samples", "sigma", "antithetic", "seed")
_STRUCTURES = tuple(STRUCTURES)  # DESIGN.md's names (dense, per_sequence, per_token) too
_METHODS = ("central", "forward", "richardson")


class UsageError(Exception):
    """A target or option `regrad check` cannot use; exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `regrad check`."""
    parser.add_argument("target", help="module:name, path/to/file.py:name, or a built-in (l1, l2, entropy, cross_entropy)")
    parser.add_argument("--grad-fn", metavar="TARGET", help="compare with this gradient function (module:name) instead")
    parser.add_argument("--structure", choices=_STRUCTURES, help="fn's structure (default: the spec's, else batch)")
    parser.add_argument("--method", choices=_METHODS, help="finite differences (default: the spec's, else central)")
    parser.add_argument("--vectorized", action="store_true", default=None, help="fn takes stacked perturbed copies")
    parser.add_argument("--lengths", default="16,9,24", help="tokens per datum, comma-separated (default 16,9,24)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="[T, K] log-prob rows instead of [T]")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="log-prob dtype (default float64)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the generated batch (default 0)")
    parser.add_argument("--atol", type=float, help="absolute tolerance (default 1e-5 float64, 1e-3 float32)")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default 1e-3 float64, 1e-2 float32)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the check; prints a report (or JSON) and returns 0 pass, 1 fail, 2 usage error."""
    # with --json, stdout carries the report alone: what the user's code prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        outcome = _run(args)
    if isinstance(outcome, int):
        return outcome
    result, report = outcome
    print(json.dumps(_json_safe(report), allow_nan=False) if args.json else _text(report))
    return 0 if result.passed else 1


def _run(args: argparse.Namespace) -> Any:
    """(result, report), or the exit code of a usage error (its message printed)."""
    from ._check import check

    loop = asyncio.new_event_loop()  # for `async def` fns and grad_fns
    try:
        lengths = _lengths(args.lengths, args.top_k)
        if args.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {args.seed}")
        fn, grad_fn, options = resolve(load_target(args.target), loop)
        against = f"the analytic gradient of {args.target}" if _is_analytic(grad_fn) else None
        if args.grad_fn is not None:
            grad_fn = _reference_fn(load_target(args.grad_fn), args.grad_fn, loop)
            against = f"the analytic gradient of {args.grad_fn}" if _is_analytic(grad_fn) else None
        for key in ("structure", "method", "vectorized"):  # given on the command line: overrides the spec's
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        data, logprobs = sample_batch(lengths, args.top_k, args.dtype, args.seed)
        result = check(fn, data, logprobs, grad_fn=grad_fn, atol=args.atol, rtol=args.rtol, **options)
    except (UsageError, InputError, NumericalError, NonFiniteError) as err:
        print(f"regrad check: {err}", file=sys.stderr)
        return 2
    except SystemExit as err:  # the user's module or fn called sys.exit(): not a verdict (0 would read as PASS)
        traceback.print_exc()
        print(f"regrad check: {args.target} could not be checked: it called sys.exit({err.code!r})", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the user's code failed: its traceback, then one line, exit 2
        traceback.print_exc()
        print(f"regrad check: {args.target} could not be checked: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    finally:
        loop.close()
    report = _report(args.target, result, logprobs, options)
    report["against"] = against or report["against"]
    return result, report


def load_target(text: str) -> Any:
    """The object TARGET names: a built-in, `module:name` (cwd first on the path) or `file.py:name`."""
    if text in BUILTINS:
        return _builtin(text)
    module_name, sep, attr = text.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"target {text!r} is neither module:name, file.py:name nor a built-in {BUILTINS}")
    if module_name.endswith(".py") or os.sep in module_name:
        module = _module_from_file(module_name)
    else:
        if os.getcwd() not in sys.path:  # as `python -m` does: the user's own modules are found
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            missing = err.name is not None and (module_name == err.name or module_name.startswith(err.name + "."))
            if not missing:  # the module exists but its own imports fail: its traceback helps
                raise
            raise UsageError(f"cannot import module {module_name!r}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _module_from_file(path: str) -> Any:
    """The file run once as a module (named after its absolute path, so target and --grad-fn share it)."""
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path!r}")
    full = os.path.abspath(path)
    name = "_regrad_check_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.machinery.SourceFileLoader(name, full)  # any suffix: the file is Python source
    spec = importlib.util.spec_from_loader(name, loader)
    if spec is None:
        raise UsageError(f"cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _builtin(name: str) -> Any:
    import regrad

    if name == "cross_entropy":
        return regrad.losses.cross_entropy
    return getattr(regrad, name)(1.0)


def resolve(obj: Any, loop: asyncio.AbstractEventLoop) -> Tuple[Callable[..., Any], Optional[Callable[..., Any]], Dict[str, Any]]:
    """fn, reference gradient function (None: autograd) and numerical options for a fn, spec or dict;
    `async def` ones run on `loop`."""
    from .grad import has_analytic
    from .specs import RegularizerSpec

    if isinstance(obj, dict):
        try:
            obj = RegularizerSpec.from_dict(obj)
        except (TypeError, ValueError, KeyError) as err:
            raise UsageError(f"the target's dict is not a regularizer spec: {err}") from None
    if isinstance(obj, RegularizerSpec):
        fn, grad_fn, options = obj.fn, obj.grad_fn, dict(obj.numerical_options)
        if obj.grad in RANDOMIZED or options.get("method") in RANDOMIZED:
            print(f"regrad check: note: {obj.name!r} takes a randomized gradient ({options.get('method', obj.grad)}); "
                  "the check uses central differences, whose error is small enough to compare", file=sys.stderr)
            options = {k: v for k, v in options.items() if k not in _RANDOMIZED_OPTIONS}
    else:
        fn, grad_fn, options = _callable(obj, "the target"), None, {}
    options = {k: v for k, v in options.items() if k not in ("executor", "progress")}  # the check runs in-process
    if grad_fn is None and has_analytic(fn):
        grad_fn = _analytic_grad(fn)
    return _sync(fn, loop), (_sync(grad_fn, loop) if grad_fn is not None else None), options


def _reference_fn(obj: Any, label: str, loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """What --grad-fn names: a gradient function, or a spec's grad_fn or analytic gradient."""
    from .grad import has_analytic
    from .specs import RegularizerSpec

    if isinstance(obj, RegularizerSpec):
        if obj.grad_fn is not None:
            return _sync(obj.grad_fn, loop)
        if has_analytic(obj.fn):
            return _analytic_grad(obj.fn)
        raise UsageError(f"--grad-fn {label}: the spec {obj.name!r} has no grad_fn and no analytic gradient")
    if not callable(obj):
        raise UsageError(f"--grad-fn {label} is a {type(obj).__name__}, not a gradient function")
    return _sync(obj, loop)


def _callable(obj: Any, label: str) -> Callable[..., Any]:
    if not callable(obj):
        raise UsageError(f"{label} is a {type(obj).__name__}, not a function or a regularizer spec")
    return obj


def _analytic_grad(fn: Any) -> Callable[..., Any]:
    """The built-in's C++ gradient as a grad_fn (numpy views of the log-probs in, gradients out)."""

    def analytic_grad(data: Any, logprobs_list: List[Any]) -> Any:
        arrays = [np.asarray(lp.detach().numpy() if hasattr(lp, "detach") else lp) for lp in logprobs_list]
        return fn.value_and_grad(data, arrays)[1]

    analytic_grad.is_analytic = True  # type: ignore[attr-defined]
    return analytic_grad


def _is_analytic(grad_fn: Any) -> bool:
    return bool(getattr(grad_fn, "is_analytic", False))


def _sync(fn: Callable[..., Any], loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """An `async def` fn run to completion on `loop` at each call, so the check can call it like a def."""
    from .specs import is_async_fn

    if not is_async_fn(fn):
        return fn

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        return loop.run_until_complete(fn(*args))

    if not hasattr(fn, "__qualname__"):  # an object with `async def __call__`: named by its class
        run.__qualname__ = run.__name__ = type(fn).__qualname__
    return run


def _lengths(text: str, top_k: int) -> List[int]:
    """--lengths as integers, checked with --top-k against MAX_ELEMENTS (each log-prob costs 2+ calls of fn)."""
    if top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {top_k}")
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or not all(1 <= n <= 4096 for n in lengths):
        raise UsageError(f"--lengths must list 1 to 4096 tokens per datum, got {text!r}")
    elements = sum(lengths) * max(top_k, 1)
    if elements > MAX_ELEMENTS:
        raise UsageError(f"the batch would hold {elements:,} log-probs (--lengths x --top-k); the check perturbs each "
                         f"one, so keep it <= {MAX_ELEMENTS:,}")
    if elements * len(lengths) > MAX_WORK:
        raise UsageError(f"--lengths lists {len(lengths):,} data holding {elements:,} log-probs; each of the 2 x "
                         f"{elements:,} calls of fn handles every datum, so keep data x log-probs <= {MAX_WORK:,}")
    return lengths


def sample_batch(lengths: List[int], top_k: int, dtype: str, seed: int) -> Tuple[List[Datum], List[Any]]:
    """Datums from windows of the demo text, and log-probs: log-softmax over 256 bytes at the targets
    ([T]), or K log-softmax columns ([T, K]); torch tensors when torch is installed."""
    rng = np.random.default_rng(seed)
    text = TEXT * (max(lengths) // len(TEXT) + 2)
    starts = rng.integers(0, len(text) - max(lengths) - 1, size=len(lengths))
    data = [datum_from_text(text[s : s + n + 1]) for s, n in zip(starts, lengths)]
    logprobs = []
    for datum, n in zip(data, lengths):
        logits = rng.normal(0.0, 2.0, size=(n, top_k or 256))
        shifted = logits - logits.max(-1, keepdims=True)
        full = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        lp = full if top_k else full[np.arange(n), datum.loss_fn_inputs["target_tokens"]]
        logprobs.append(np.ascontiguousarray(lp, dtype=dtype))
    try:
        import torch
    except ImportError:
        return data, logprobs
    return data, [torch.from_numpy(lp) for lp in logprobs]


def _report(target: str, result: Any, logprobs: List[Any], options: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON-ready result: verdict, tolerances, per-datum errors, the worst element and the run's cost."""
    worst = None
    if result.worst is not None:
        j, i = result.worst
        shape = tuple(logprobs[j].shape)
        where = {"datum": j, "token": i // shape[1], "column": i % shape[1]} if len(shape) == 2 else {"datum": j, "token": i}
        numerical = float(np.asarray(result.numerical.grads[j]).reshape(-1)[i])
        worst = {**where, "numerical": numerical, "reference": float(result.reference[j].reshape(-1)[i])}
    error = result.numerical.error
    estimate = max((float(np.max(np.abs(np.asarray(e)))) for e in error if np.size(e)), default=0.0) if error is not None else None
    return {
        "target": target,
        "passed": result.passed,
        "against": result.against,
        "structure": STRUCTURES.get(options.get("structure", "batch"), options.get("structure")),
        "method": result.numerical.method,
        "dtype": str(np.asarray(logprobs[0]).dtype) if logprobs else None,
        "shapes": [list(lp.shape) for lp in logprobs],
        "atol": result.atol,
        "rtol": result.rtol,
        "max_abs_error": result.max_abs_error,
        "max_rel_error": result.max_rel_error,
        "worst": worst,
        "error_estimate": estimate,
        "nfev": result.numerical.nfev,
    }


def _json_safe(value: Any) -> Any:
    """The report with non-finite floats as null: NaN and Infinity are not JSON (the table shows them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _text(report: Dict[str, Any]) -> str:
    """The report as a few lines and a per-datum table."""
    lines = [
        f"regrad check {report['target']}: numerical ({report['method']}, structure {report['structure']}, "
        f"{report['dtype']}, {report['nfev']} evaluations) vs {report['against']}",
        f"{'datum':>5}  {'shape':<12} {'max abs error':>13}  {'max rel error':>13}",
    ]
    for j, (shape, a, r) in enumerate(zip(report["shapes"], report["max_abs_error"], report["max_rel_error"])):
        lines.append(f"{j:>5}  {str(tuple(shape)):<12} {a:>13.3e}  {r:>13.3e}")
    worst = report["worst"]
    if worst is not None:
        where = ", ".join(f"{k} {worst[k]}" for k in ("datum", "token", "column") if k in worst)
        lines.append(f"largest difference at {where}: numerical {worst['numerical']:.9g}, reference {worst['reference']:.9g}")
    if report["error_estimate"] is not None:
        lines.append(f"numerical error estimate (max): {report['error_estimate']:.3e}")
    verdict = "PASS" if report["passed"] else "FAIL"
    lines.append(f"{verdict}: |numerical - reference| <= {report['atol']:g} + {report['rtol']:g}·|reference| "
                 f"{'everywhere' if report['passed'] else 'does not hold everywhere'}")
    return "\n".join(lines)
