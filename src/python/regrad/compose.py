"""The composition pipeline: `compose(base_loss, regularizers)` -> a Tinker-compatible `loss_fn`.

Each call runs every term once (sync ones on a thread pool, async ones together on one event loop),
takes each term's gradient by its route, sums `base + Σ weight·regularizer` and its gradient in the
same pass, and records telemetry. A failing term fails the whole call with `RegularizerError`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import numbers
import os
import threading
import time
import weakref
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import losses
from ._autograd import LazyFunction, autocast_block, refuse_forward_mode, scaled_first_order
from .errors import NonFiniteError, RegularizerError
from .grad import CallInputs, Cancelled, TermResult, compute_term, compute_term_async, resolve
from .specs import RegularizerSpec, SpecLike, as_specs, is_async_fn
from .telemetry import BaseLossTelemetry, CustomLossOutput, EventCallback, RegularizerTelemetry, emit

__all__ = ["compose", "ComposedLoss"]

BASE = "base_loss"
_DEFAULT = object()


def compose(
    base_loss: Union[Callable[..., Any], SpecLike, None] = losses.cross_entropy,
    regularizers: Iterable[SpecLike] = (),
    *,
    parallel: bool = True,
    max_workers: Optional[int] = None,
    track_grad_norms: bool = True,
    on_event: Optional[EventCallback] = None,
) -> "ComposedLoss":
    """`loss_fn(data, logprobs_list) -> (loss, metrics)` for base_loss + Σ weight·regularizer.

    Pass it to a Tinker `TrainingClient.forward_backward_custom(data, loss_fn)` unchanged;
    `loss_fn.last_output` then holds the full `CustomLossOutput`. base_loss may be None.
    """
    return ComposedLoss(
        base_loss,
        regularizers,
        parallel=parallel,
        max_workers=max_workers,
        track_grad_norms=track_grad_norms,
        on_event=on_event,
    )


def _base_spec(base_loss: Union[Callable[..., Any], SpecLike, None]) -> Optional[RegularizerSpec]:
    """The base loss as a spec of weight 1 (named "base_loss" unless given as a spec or a spec dict)."""
    if base_loss is None:
        return None
    if isinstance(base_loss, Mapping):  # the seed's dict form, accepted wherever a spec is
        base_loss = RegularizerSpec.from_dict(base_loss)
    if isinstance(base_loss, RegularizerSpec):
        if base_loss.weight != 1.0:
            raise ValueError(f"base loss {base_loss.name!r} has weight {base_loss.weight}; a base loss has weight 1")
        base_loss.validate()
        return base_loss
    if not callable(base_loss):
        raise TypeError(f"base_loss must be callable, a RegularizerSpec (or its dict) or None, got {type(base_loss).__name__}")
    if is_async_fn(base_loss):
        return RegularizerSpec.async_(BASE, 1.0, base_loss, timeout=None)
    return RegularizerSpec.sync(BASE, 1.0, base_loss)


class ComposedLoss:
    """The composed loss function (see `compose`); also `acall`, `evaluate`, `aevaluate` and `last_output`."""

    def __init__(
        self,
        base_loss: Union[Callable[..., Any], SpecLike, None],
        regularizers: Iterable[SpecLike],
        *,
        parallel: bool = True,
        max_workers: Optional[int] = None,
        track_grad_norms: bool = True,
        on_event: Optional[EventCallback] = None,
    ) -> None:
        if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, numbers.Integral)
                                        or max_workers < 1):  # ("3" or 2.5 would fail only at the first call)
            raise ValueError(f"max_workers must be a positive int or None, got {max_workers!r}")
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, got {type(on_event).__name__}")
        self.base_spec = _base_spec(base_loss)
        self.regularizers: Tuple[RegularizerSpec, ...] = as_specs(regularizers)
        self.parallel = bool(parallel)
        self.max_workers = max_workers
        self.track_grad_norms = bool(track_grad_norms)
        self.on_event = on_event
        self.last_output: Optional[CustomLossOutput] = None
        scoped = [("regularizer", s) for s in self.regularizers]
        self._terms: List[Tuple[str, RegularizerSpec]] = ([(BASE, self.base_spec)] if self.base_spec else []) + scoped
        self._has_async = any(spec.is_async for _, spec in self._terms)
        self._needs_detached: Dict[str, bool] = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_pid = 0  # the process that started the pool's threads (a forked child has none of them)
        self._pool_lock = threading.Lock()
        self._pool_finalizer: Optional[weakref.finalize] = None  # shuts the pool down if self is dropped unclosed
        self._calls = itertools.count(1)  # numbers the calls, for their events
        if self.base_spec is not None and self.base_spec.name in {spec.name for spec in self.regularizers}:
            raise ValueError(f"the base loss and a regularizer are both named {self.base_spec.name!r}; "
                             "names key the telemetry and the errors")

    def __getstate__(self) -> Dict[str, Any]:
        """The configuration, without the thread pool, its lock and the call counter: a pickled loss
        (shipped to a process worker) or a copy gets a pool of its own on its first call (a copy
        shared the pool, so closing it broke the original; pickling failed on the lock)."""
        state = dict(self.__dict__)
        for name in ("_pool", "_pool_pid", "_pool_lock", "_pool_finalizer", "_calls"):
            del state[name]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool, self._pool_pid, self._pool_finalizer = None, 0, None
        self._pool_lock = threading.Lock()
        self._calls = itertools.count(1)

    def __repr__(self) -> str:
        names = [spec.name for _, spec in self._terms]
        return f"ComposedLoss({names}, parallel={self.parallel})"

    # -- public entry points -------------------------------------------------------------------

    def __call__(self, data: Sequence[Any], logprobs_list: Sequence[Any]) -> Tuple[Any, Dict[str, float]]:
        """(loss, metrics): loss a 0-d tensor whose backward() gives d(total)/d(logprobs); metrics flat floats."""
        _require_torch()
        inputs, value, flat, output = self._evaluate(data, logprobs_list)
        return self._loss_tensor(inputs, value, flat), output.flat()

    async def acall(self, data: Sequence[Any], logprobs_list: Sequence[Any]) -> Tuple[Any, Dict[str, float]]:
        """`__call__` for callers already inside an event loop: async terms run on that loop."""
        _require_torch()
        inputs, value, flat, output = await self._aevaluate(data, logprobs_list)
        return self._loss_tensor(inputs, value, flat), output.flat()

    def evaluate(self, data: Sequence[Any], logprobs_list: Sequence[Any]) -> Tuple[float, List[Any], CustomLossOutput]:
        """(total value, d(total)/d(logprobs) per datum like the inputs, telemetry), without autograd."""
        inputs, value, flat, output = self._evaluate(data, logprobs_list)
        return value, self._split(inputs, flat), output

    async def aevaluate(
        self, data: Sequence[Any], logprobs_list: Sequence[Any]
    ) -> Tuple[float, List[Any], CustomLossOutput]:
        """`evaluate` for callers already inside an event loop."""
        inputs, value, flat, output = await self._aevaluate(data, logprobs_list)
        return value, self._split(inputs, flat), output

    def close(self) -> None:
        """Stops the worker threads once their queued terms ran (a later call starts new ones), so a call
        in flight in another thread finishes normally: cancelling its queued terms hung it (a future
        cancelled by shutdown never wakes `concurrent.futures.wait`, CPython gh-109934)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
            finalizer, self._pool_finalizer = self._pool_finalizer, None
        if finalizer is not None:
            finalizer.detach()  # (else each close() + reuse left one finalizer, holding its dead pool, until self died)
        if pool is not None:
            pool.shutdown(wait=False)

    def __enter__(self) -> "ComposedLoss":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- one call --------------------------------------------------------------------------------

    def _evaluate(self, data: Sequence[Any], logprobs_list: Sequence[Any]) -> Tuple[CallInputs, float, np.ndarray, CustomLossOutput]:
        start, call = time.perf_counter(), next(self._calls)
        emit(self.on_event, "start", "loss", "loss", call=call)
        inputs: Optional[CallInputs] = None
        try:
            inputs = CallInputs.build(data, logprobs_list, self._needs_detached, call)
            results = self._run_async_from_sync(inputs) if self._has_async else self._run_threads(inputs)
            return self._finish(inputs, results, start)
        except BaseException as err:
            self._fail(err, start, call, inputs)
            raise

    async def _aevaluate(self, data: Sequence[Any], logprobs_list: Sequence[Any]) -> Tuple[CallInputs, float, np.ndarray, CustomLossOutput]:
        start, call = time.perf_counter(), next(self._calls)
        emit(self.on_event, "start", "loss", "loss", call=call)
        inputs: Optional[CallInputs] = None
        try:
            inputs = CallInputs.build(data, logprobs_list, self._needs_detached, call)
            results = await self._run_on_loop(inputs)
            return self._finish(inputs, results, start)
        except BaseException as err:
            self._fail(err, start, call, inputs)
            raise

    def _fail(self, err: BaseException, start: float, call: int, inputs: Optional[CallInputs]) -> None:
        """A failed call: no last output, the "exception" event, and terms still running in the
        background (a thread cannot be stopped) leave the caller's memory alone from now on."""
        if inputs is not None:
            inputs.abandon()
        self.last_output = None
        if not _stops_recomputation(err):  # (checkpoint's control flow, not a failure: see _term_error)
            emit(self.on_event, "exception", "loss", "loss", duration_ms=_ms_since(start), error=err, call=call)

    # -- running the terms -----------------------------------------------------------------------

    def _submit(self, fn: Callable[..., TermResult], *args: Any) -> "Future[TermResult]":
        """fn(*args) on the pool, submitted under the pool's lock: a close() in another thread cannot shut
        the pool down between getting it and submitting ("cannot schedule new futures after shutdown")."""
        with self._pool_lock:
            return self._executor_locked().submit(fn, *args)

    def _executor_locked(self) -> ThreadPoolExecutor:
        """The pool, started if needed (called with _pool_lock held)."""
        if self._pool is None or self._pool_pid != os.getpid():
            # (in a forked child the parent's pool has no threads: its idle count would take the
            # work and no thread would ever run it; a fresh pool starts its own)
            workers = self.max_workers or min(32, max(1, len(self._terms)))
            if self._pool_finalizer is not None:  # a forked child's copy of the parent's pool
                self._pool_finalizer.detach()
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="regrad")
            self._pool_pid = os.getpid()
            self._pool_finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def _run_threads(self, inputs: CallInputs) -> List[TermResult]:
        """Sync terms only; fail fast, first failure in spec order.

        Analytic terms (one C++ pass, already OpenMP-parallel) run in this thread; the others go to
        the pool when there are two or more of them, and this thread runs the analytic ones meanwhile.
        """
        cancel = threading.Event()
        count = len(self._terms)
        pooled = [i for i, (_, spec) in enumerate(self._terms) if resolve(spec) != "analytic"]
        if not self.parallel or len(pooled) < 2:
            return [self._run_sync_term(i, inputs, cancel) for i in range(count)]
        futures: Dict[int, Future] = {i: self._submit(self._run_sync_term, i, inputs, cancel) for i in pooled}
        results: Dict[int, TermResult] = {}
        try:
            for i in range(count):
                if i not in futures:
                    results[i] = self._run_sync_term(i, inputs, cancel)
            wait(futures.values(), return_when=FIRST_EXCEPTION)
        except BaseException:
            _cancel_futures(cancel, futures.values())
            raise
        failed = [f for _, f in sorted(futures.items()) if f.done() and not f.cancelled() and f.exception() is not None]
        if failed:
            _cancel_futures(cancel, futures.values())
            error = failed[0].exception()  # the first failure in spec order
            try:
                raise error  # type: ignore[misc]
            finally:  # its traceback holds this frame: no cycle error -> frame -> futures -> error (see _raised)
                del error, failed, futures
        results.update({i: f.result() for i, f in futures.items()})
        return [results[i] for i in range(count)]

    def _run_async_from_sync(self, inputs: CallInputs) -> List[TermResult]:
        """Runs the terms on a fresh event loop; on a helper thread if this thread already runs one."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return _raised(asyncio.run(_outcome(self._run_on_loop(inputs))))
        # e.g. Tinker calls a custom loss from inside its own event loop (a Jupyter cell too)
        cancel = threading.Event()  # set by stop() too: sync terms the helper's loop runs inline (parallel=False)
        run = _Stoppable(lambda: _outcome(self._run_on_loop(inputs, cancel)), cancel.set)  # see no task.cancel()
        with ThreadPoolExecutor(1, thread_name_prefix="regrad-loop") as helper:
            try:
                return _raised(helper.submit(run.run).result())  # (no local holding the outcome: see _raised)
            except BaseException:  # Ctrl-C in this thread: cancel the terms, or leaving the pool waits for all of them
                run.stop()  # (a no-op once the helper's loop has ended)
                raise

    async def _run_on_loop(self, inputs: CallInputs, cancel: Optional[threading.Event] = None) -> List[TermResult]:
        """All terms concurrently: async ones as tasks on this loop, sync ones on the pool (inline if not parallel)."""
        loop = asyncio.get_running_loop()
        cancel = threading.Event() if cancel is None else cancel
        tasks: Dict[int, "asyncio.Future[TermResult]"] = {}
        results: Dict[int, TermResult] = {}
        try:
            for i, (_, spec) in enumerate(self._terms):
                if spec.is_async:
                    tasks[i] = asyncio.ensure_future(self._run_async_term(i, inputs, cancel))
                elif self.parallel:
                    tasks[i] = asyncio.wrap_future(self._submit(self._run_sync_term, i, inputs, cancel), loop=loop)
            for i, (_, spec) in enumerate(self._terms):
                if not spec.is_async and not self.parallel:
                    results[i] = self._run_sync_term(i, inputs, cancel)
            if tasks:
                await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:
            await _cancel_tasks(cancel, tasks.values())
            raise
        failed = [i for i, t in sorted(tasks.items()) if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            await _cancel_tasks(cancel, tasks.values())
            error = tasks[failed[0]].exception()
            try:
                raise error  # type: ignore[misc]
            finally:  # (as in _run_threads: no cycle through this frame's tasks)
                del error, failed, tasks
        results.update({i: t.result() for i, t in tasks.items()})
        return [results[i] for i in range(len(self._terms))]

    def _run_sync_term(self, index: int, inputs: CallInputs, cancel: threading.Event) -> TermResult:
        scope, spec = self._terms[index]
        start = time.perf_counter()
        emit(self.on_event, "start", scope, spec.name, call=inputs.call)
        try:
            if cancel.is_set():
                raise Cancelled("a sibling term failed before this one started")
            with autocast_block(inputs.autocast):  # (autocast is per thread: a pooled term ran in float32)
                computed = compute_term(spec, inputs, cancel)
            result = self._checked(computed, inputs)
        except asyncio.CancelledError as err:  # fn's own (no await here receives a cancellation): a failure, as
            # for async terms; passed on, it read as the cancellation of the caller's task (acall, await fut)
            own = RuntimeError("fn raised CancelledError (it called code that awaited a cancelled task or future)")
            own.__cause__ = err
            raise self._term_error(scope, spec, own, start, inputs.call)
        except Exception as err:
            raise self._term_error(scope, spec, err, start, inputs.call)
        return self._term_done(scope, spec, result, start, inputs.call)

    async def _run_async_term(self, index: int, inputs: CallInputs, cancel: threading.Event) -> TermResult:
        scope, spec = self._terms[index]
        start = time.perf_counter()
        emit(self.on_event, "start", scope, spec.name, call=inputs.call)
        task: Optional[asyncio.Task[TermResult]]  # (both cleared in finally)
        done: Optional[set]
        task = asyncio.ensure_future(compute_term_async(spec, inputs, cancel))
        try:
            done, _ = await asyncio.wait({task}, timeout=spec.timeout)
            if not done:
                raise TimeoutError(f"no result within the timeout of {spec.timeout} s")
            if task.cancelled():  # fn's own CancelledError (it awaited something cancelled), not this call's
                raise RuntimeError("fn raised CancelledError (it awaited a task or future that was cancelled)")
            result = self._checked(task.result(), inputs)
        except asyncio.CancelledError as err:
            emit(self.on_event, "exception", scope, spec.name, duration_ms=_ms_since(start), error=err, call=inputs.call)
            raise
        except Exception as err:
            raise self._term_error(scope, spec, err, start, inputs.call)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            elif not task.cancelled():
                task.exception()  # read: a Ctrl-C fn raised left the loop before this frame could, and asyncio
                # logged "Task exception was never retrieved" with its traceback when the task was collected
            task = done = None  # task.result()'s error holds this frame: no cycle through the task
        return self._term_done(scope, spec, result, start, inputs.call)

    def _term_error(self, scope: str, spec: RegularizerSpec, err: Exception, start: float, call: int) -> Exception:
        """The event, and the error to raise: err itself if a nested composed loss raised it (its cause
        stays its own) or if it is torch.utils.checkpoint's signal to stop a recomputation (checkpoint
        catches it; wrapped, it failed the checkpointed call), else a RegularizerError whose __cause__ is
        err, as `raise ... from err` sets it. No "exception" event for checkpoint's signal: it is control flow
        (log_events logged it as a WARNING on every checkpointed step)."""
        if _stops_recomputation(err):
            return err
        emit(self.on_event, "exception", scope, spec.name, duration_ms=_ms_since(start), error=err, call=call)
        if isinstance(err, RegularizerError):
            return err
        wrapped = RegularizerError(spec.name, err)
        wrapped.__cause__ = err
        return wrapped

    def _term_done(self, scope: str, spec: RegularizerSpec, result: TermResult, start: float, call: int) -> TermResult:
        result.duration_ms = _ms_since(start)
        emit(self.on_event, "stop", scope, spec.name, duration_ms=result.duration_ms, value=result.value, call=call)
        return result

    def _checked(self, result: TermResult, inputs: CallInputs) -> TermResult:
        """Grad norm (same pass, no re-run) and the finiteness check of one term's gradient (an error
        names the first non-finite element)."""
        flat = result.flat_grad
        assert flat is not None
        if self.track_grad_norms:
            norm = _norm(flat)
            result.grad_norm = norm
            finite = math.isfinite(norm)
        else:
            finite = bool(np.isfinite(flat).all())
        bad: Union[np.ndarray, Tuple[int, ...]] = np.flatnonzero(~np.isfinite(flat)) if not finite else ()
        if len(bad):
            raise NonFiniteError(
                f"the {result.grad_method} gradient has non-finite entries ({len(bad)} of {flat.size}); the first, "
                f"{flat[bad[0]]}, at {inputs.describe(int(bad[0]))}"
            )
        if result.grad_error is not None and not math.isfinite(result.grad_error):
            # (a randomized route's variance overflows float64 long before its gradient does)
            raise NonFiniteError(
                f"the {result.grad_method} gradient's error estimate is {result.grad_error} (beyond float64) although "
                "the gradient is finite; telemetry (JSON) cannot report it: scale the loss down"
            )
        return result

    # -- the result ------------------------------------------------------------------------------

    def _finish(self, inputs: CallInputs, results: List[TermResult], start: float) -> Tuple[CallInputs, float, np.ndarray, CustomLossOutput]:
        total: Optional[np.ndarray] = None
        scratch: Optional[np.ndarray] = None  # one buffer for every weight·gradient, not a temporary per term
        with np.errstate(over="ignore"):  # an overflow is named by the non-finite checks below, not warned about
            for (_, spec), result in zip(self._terms, results):
                if spec.weight == 0.0:
                    continue
                g = result.flat_grad
                assert g is not None  # (every result passed _checked)
                if total is None:
                    total = g.copy() if spec.weight == 1.0 else g * g.dtype.type(spec.weight)
                elif spec.weight == 1.0:
                    total += g
                else:
                    scratch = np.empty_like(total) if scratch is None else scratch
                    total += np.multiply(g, g.dtype.type(spec.weight), out=scratch)
        if total is None:
            total = np.zeros(inputs.size, inputs.batch.dtype)
        output = self._telemetry(results, total, start)
        self._check_total(output, total)
        if inputs.original_dtypes:  # float16 / bfloat16 log-probs: the float32 total must fit their dtype
            inputs.given = inputs.as_given(total)
        self.last_output = output
        emit(self.on_event, "stop", "loss", "loss", duration_ms=output.duration_ms, value=output.loss_total,
             call=inputs.call)
        return inputs, output.loss_total, total, output

    @staticmethod
    def _check_total(output: CustomLossOutput, total: np.ndarray) -> None:
        """Finite terms can still sum, once weighted, to a non-finite loss or gradient (an overflowing weight)."""
        norm = output.total_grad_norm
        finite_grad = (norm is not None and math.isfinite(norm)) or bool(np.isfinite(total).all())
        if not (math.isfinite(output.loss_total) and finite_grad):
            what = "loss" if not math.isfinite(output.loss_total) else "gradient"
            raise NonFiniteError(
                f"the weighted sum of the terms has a non-finite {what} (loss_total={output.loss_total}); "
                "check the weights: every term alone was finite"
            )
        for name, reg in output.regularizers.items():  # weight · grad_norm may overflow where the sum does not
            weighted = reg.grad_norm_weighted
            if weighted is not None and not math.isfinite(weighted):
                raise NonFiniteError(f"regularizer {name!r}: weight {reg.weight} times its grad norm {reg.grad_norm} "
                                     "overflows float64; check the weight")

    def _telemetry(self, results: List[TermResult], total: np.ndarray, start: float) -> CustomLossOutput:
        base: Optional[BaseLossTelemetry] = None
        regularizers: Dict[str, RegularizerTelemetry] = {}
        for (scope, spec), r in zip(self._terms, results):
            common = dict(
                value=r.value, grad_norm=r.grad_norm, grad_method=r.grad_method, duration_ms=r.duration_ms,
                custom=r.custom, nfev=r.nfev, grad_error=r.grad_error,
            )
            if scope == BASE:
                base = BaseLossTelemetry(**common)  # type: ignore[arg-type]
            else:
                regularizers[spec.name] = RegularizerTelemetry(weight=spec.weight, **common)  # type: ignore[arg-type]
        regularizer_total = sum((reg.contribution for reg in regularizers.values()), 0.0)  # a float with none, too
        loss_total = (base.value if base is not None else 0.0) + regularizer_total
        total_norm = _norm(total) if self.track_grad_norms else None
        return CustomLossOutput(loss_total, base, regularizers, regularizer_total, total_norm, _ms_since(start))

    @staticmethod
    def _split(inputs: CallInputs, flat: np.ndarray) -> List[Any]:
        """The packed gradient as one array (or CPU tensor) per datum, shaped and dtyped like the inputs."""
        if inputs.given is not None:  # float16 / bfloat16 inputs: cast back (and checked) by _finish
            return inputs.given
        bounds = np.cumsum(inputs.sizes)[:-1]
        parts = [p.reshape(s) for p, s in zip(np.split(flat, bounds), inputs.batch.shapes)]
        if inputs.batch.is_torch:
            import torch

            return [torch.from_numpy(p) for p in parts]
        return parts

    def _loss_tensor(self, inputs: CallInputs, value: float, flat: np.ndarray) -> Any:
        """0-d tensor of the total; backward() hands each log-prob tensor grad_output × its gradient. float32
        for float16 / bfloat16 log-probs (the working dtype, as autocast's losses): autograd casts the
        float32 product to each tensor's dtype, one rounding."""
        import torch

        dtype = torch.float32 if inputs.batch.dtype == np.float32 else torch.float64
        value_t = torch.tensor(value, dtype=dtype)
        tensors = inputs.logprobs if inputs.batch.is_torch else []
        refuse_forward_mode(tensors)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _TotalGrad.apply(value_t, torch.from_numpy(flat), inputs.sizes, inputs.batch.shapes, *tensors)
        return value_t


def _require_torch() -> None:
    """Calling a composed loss returns a torch tensor (Tinker's loss_fn contract): without torch, say so
    (and what to call instead) before any term runs."""
    try:
        import torch  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "calling a composed loss returns a torch tensor and torch is not installed; use "
            "loss_fn.evaluate(data, logprobs_list) for (value, grads, telemetry) with numpy arrays"
        ) from err


def _stops_recomputation(err: BaseException) -> bool:
    """torch.utils.checkpoint's _StopRecomputationError (non-reentrant checkpoint, early stop): raised by its
    saved-tensor hook inside a term's autograd graph when a checkpointed region calling this loss is re-run,
    to stop that re-run once it has what it needs; control flow of checkpoint's, not a failure of the term."""
    return type(err).__name__ == "_StopRecomputationError" and type(err).__module__ == "torch.utils.checkpoint"


def _norm(flat: np.ndarray) -> float:
    """The L2 norm, rescaled when the squares overflowed (inf only for a non-finite entry). BLAS's (threaded)
    dot, unlike cross_entropy's value: telemetry only, and a deterministic sum (einsum) cost 4-8x as much,
    six norms a call (2026-11-25: +0.14 ms a step at 64 x 2048 tokens)."""
    with np.errstate(over="ignore"):
        norm = float(np.linalg.norm(flat))
    if not math.isfinite(norm) and np.isfinite(flat).all():
        wide = flat.astype(np.float64)
        peak = float(np.abs(wide).max())
        norm = peak * float(np.linalg.norm(wide / peak))
        if not math.isfinite(norm):  # finite entries, a norm beyond float64: telemetry cannot hold it
            raise NonFiniteError(
                f"the gradient's L2 norm overflows float64 (largest entry {peak:g}, {flat.size} entries); "
                "telemetry (JSON) cannot report it"
            )
    return norm


async def _outcome(coro: Any) -> Tuple[Any, Optional[Exception]]:
    """(result, None) or (None, error) of coro. An error raised out of asyncio.run is its main task's exception,
    and asyncio's frames holding that task enter the error's traceback: a reference cycle that kept the failed
    call (every frame of the failing term, fn's locals included, and the call's inputs) alive until the cyclic
    GC ran. BaseExceptions (Ctrl-C, cancellation) propagate as they are."""
    try:
        return await coro, None
    except Exception as err:  # noqa: BLE001 - handed to _raised, which raises it
        return None, err


class _Stoppable:
    """A coroutine run by asyncio.run on a helper thread, which the calling thread can cancel: a Ctrl-C
    there used to wait for every term to finish (numerical evaluations included; forever for an async
    term with timeout=None) before it reached the caller."""

    def __init__(self, make: Callable[[], Any], on_stop: Optional[Callable[[], None]] = None) -> None:
        self._make = make  # the coroutine, made on the helper's loop unless stopped before it started
        self._on_stop = on_stop  # thread-safe; tells running sync terms (the loop's cancel reaches only awaits)
        self._lock = threading.Lock()
        self._stopped = False
        self._task: Optional["asyncio.Task[Any]"] = None

    def run(self) -> Any:
        """asyncio.run of the coroutine (on the helper thread)."""
        try:
            return asyncio.run(self._main())
        finally:  # the task holds the outcome: no cycle error -> caller's frame -> self -> task -> error
            with self._lock:
                self._task = None

    async def _main(self) -> Any:
        with self._lock:
            if self._stopped:  # stopped before the helper's loop started
                raise asyncio.CancelledError
            self._task = asyncio.current_task()
        return await self._make()

    def stop(self) -> None:
        """Cancels the coroutine on its loop (its terms are cancelled as for any failure); asyncio.run then ends."""
        if self._on_stop is not None:  # (first: sync terms inline on the loop block the cancellation below)
            self._on_stop()
        with self._lock:
            self._stopped = True
            task = self._task
        if task is not None and not task.done():
            try:
                task.get_loop().call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed meanwhile: nothing left to cancel
                pass


def _raised(outcome: Tuple[Any, Optional[Exception]]) -> Any:
    """The result of an _outcome, or its error raised without a reference cycle through this frame."""
    result, error = outcome
    if error is None:
        return result
    try:
        raise error
    finally:
        del error, outcome


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def _cancel_futures(cancel: threading.Event, futures: Iterable[Future]) -> None:
    cancel.set()  # numerical routes stop at their next evaluation
    for f in futures:
        f.cancel()


async def _cancel_tasks(cancel: threading.Event, tasks: Iterable["asyncio.Future[Any]"]) -> None:
    cancel.set()
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _total_grad_function() -> Any:
    import torch

    class TotalGrad(torch.autograd.Function):
        """The composed total; backward scales the packed gradient once and hands out per-datum views."""

        @staticmethod
        def forward(ctx: Any, value: Any, flat: Any, sizes: List[int], shapes: List[tuple], *inputs: Any) -> Any:
            ctx.flat, ctx.sizes, ctx.shapes = flat, sizes, shapes
            ctx.save_for_backward(*inputs)
            return value.clone()

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> Any:
            if torch.is_grad_enabled():  # create_graph=True: per datum, tied to its input (scaled_first_order)
                parts = _per_datum(ctx.flat, ctx.sizes, ctx.shapes)
                return (None, None, None, None, *scaled_first_order(grad_output, parts, ctx.saved_tensors))
            scaled = ctx.flat * grad_output.to(ctx.flat.dtype)  # a packed gradient of numbers, not a graph
            return (None, None, None, None, *_per_datum(scaled, ctx.sizes, ctx.shapes))

    def _per_datum(flat: Any, sizes: List[int], shapes: List[tuple]) -> List[Any]:
        parts = torch.split(flat, sizes)
        if len(shapes[0]) != 1:  # [T_i, K] data (one rank for all): a view per datum
            return [p.view(shape) for p, shape in zip(parts, shapes)]
        return list(parts)

    return TotalGrad


_TotalGrad = LazyFunction(_total_grad_function)
