"""Futures for client requests: `.result()` blocks, `await` suspends (Tinker's APIFuture shape)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Callable, Generator, Generic, Optional, TypeVar

__all__ = ["RequestFuture", "MappedFuture"]

T = TypeVar("T")
U = TypeVar("U")


class RequestFuture(Generic[T]):
    """A request's result: `.result(timeout)` in sync code, `await fut` or `fut.result_async()` in async code."""

    def __init__(
        self, future: "concurrent.futures.Future[T]", loop: Optional[asyncio.AbstractEventLoop] = None,
        on_worker: Optional[Callable[[], bool]] = None,
    ) -> None:
        self._future = future
        self._loop = loop  # the event loop the request runs on, if it runs on one
        self._on_worker = on_worker  # True in the one thread that runs the requests (a local client's)

    def result(self, timeout: Optional[float] = None) -> T:
        """Blocks until the request finished; re-raises its error. Refused (RuntimeError) inside the event
        loop the request itself runs on: blocking that loop would wait forever."""
        if self._loop is not None and not self._future.done() and _running_loop() is self._loop:
            raise RuntimeError(
                "result() called inside the event loop this request runs on: blocking the loop would never "
                "let the request finish; use `await fut` (or `await fut.result_async()`) instead"
            )
        if self._on_worker is not None and not self._future.done() and self._on_worker():
            raise RuntimeError(
                "result() called inside a request of the same client (its loss_fn): requests run one at a time "
                "on the client's one worker thread, so this request could never start; use the client's "
                "results outside the request"
            )
        try:
            return self._future.result(timeout)
        finally:  # the request's error holds this frame: no cycle error -> frame -> self -> future -> error
            self = None  # type: ignore[assignment]  # (as concurrent.futures.Future.result does)

    async def result_async(self, timeout: Optional[float] = None) -> T:
        """Waits without blocking the event loop; a timeout or a cancelled wait leaves the request running
        (as `.result(timeout)` does): shielded, since cancelling the wrapped future would cancel the
        request itself (a queued request of the local client, or an async client's coroutine)."""
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._future)), timeout)

    def future(self) -> "concurrent.futures.Future[T]":
        """The underlying `concurrent.futures.Future` (for `wait`, `as_completed`, callbacks)."""
        return self._future

    def done(self) -> bool:
        """True once the request finished (succeeded or failed); never blocks."""
        return self._future.done()

    async def coroutine(self) -> T:
        """A coroutine of the result, for `asyncio.create_task(fut.coroutine())` (Tinker's APIFuture)."""
        return await self

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()


class MappedFuture(Generic[U]):
    """`fn(inner.result())`, computed once, for any inner future with `.result()` (awaitable or not)."""

    def __init__(self, inner: Any, fn: Callable[[Any], U]) -> None:
        self._inner = inner
        self._fn = fn
        self._lock = threading.Lock()
        self._state: Optional[tuple] = None  # ("ok", value) or ("error", exception)
        self._concurrent: Optional["concurrent.futures.Future[U]"] = None  # made by future()

    def _finish(self, get_inner: Callable[[], Any]) -> U:
        with self._lock:
            if self._state is None:
                try:
                    self._state = ("ok", self._fn(get_inner()))
                except BaseException as err:  # noqa: BLE001 - stored and re-raised to every caller
                    self._state = ("error", err)
            kind, value = self._state
        if kind == "error":
            try:
                raise value
            finally:  # (no cycle error -> traceback -> this frame -> error / self, which holds the error)
                del value, self, get_inner
        return value

    def result(self, timeout: Optional[float] = None) -> U:
        """Blocks until the inner request finished, then returns the mapped value."""
        try:
            if self._state is None:
                try:
                    inner_value = self._inner.result(timeout)
                except concurrent.futures.TimeoutError:
                    raise
                except BaseException as err:  # noqa: BLE001 - the inner error becomes this future's error
                    if not self._request_failed(err):
                        raise  # the wait was interrupted (Ctrl-C, a cancelled task): ask again later
                    return self._finish(lambda: _raise(err))
                return self._finish(lambda: inner_value)
            return self._finish(lambda: None)
        finally:  # the stored error's traceback holds this frame: no cycle through self (see _finish)
            self = None  # type: ignore[assignment]

    async def result_async(self, timeout: Optional[float] = None) -> U:
        """Waits without blocking the event loop; a timeout or a cancelled wait leaves the request running."""
        if self._state is not None:
            return self.result()
        # shielded, and through future(): a cancelled wait (or its loop closing) would otherwise cancel
        # the inner future, and a Tinker future passes that on to the request itself
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.future())), timeout)

    def _request_failed(self, err: BaseException) -> bool:
        """True when err is the request's own outcome, to keep for every caller; False when only the
        wait was interrupted (KeyboardInterrupt, asyncio cancellation: BaseExceptions, or the request
        is still running), which must not become the result of a request that goes on and succeeds."""
        if not isinstance(err, Exception):
            return False
        done = _inner_done(self._inner)
        return True if done is None else done

    def done(self) -> bool:
        """True once the request finished. An inner future with neither done() nor future() is watched
        by the helper thread of future(), so this turns True shortly after that thread sees it finish."""
        if self._state is not None:
            return True
        done = _inner_done(self._inner)
        return self.future().done() if done is None else done

    async def coroutine(self) -> U:
        """A coroutine of the mapped value, for `asyncio.create_task(fut.coroutine())`."""
        return await self

    def future(self) -> "concurrent.futures.Future[U]":
        """A `concurrent.futures.Future` of the mapped value (for `wait`, `as_completed`, callbacks),
        settled when the inner request finishes (Tinker's APIFuture.future())."""
        with self._lock:
            if self._concurrent is not None:
                return self._concurrent
            out = self._concurrent = concurrent.futures.Future()

        def settle(*_: Any) -> None:
            try:
                out.set_result(self.result())
            except BaseException as err:  # noqa: BLE001 - the request's error, handed to the future
                out.set_exception(err)

        inner_future = getattr(self._inner, "future", None)
        if self._state is not None:
            settle()
        elif callable(inner_future):
            inner_future().add_done_callback(settle)
        else:  # an inner future without .future() (older Tinker's combined future): wait on a helper thread
            threading.Thread(target=settle, name="regrad-mapped-future", daemon=True).start()
        return out

    def __await__(self) -> Generator[Any, None, U]:
        return self.result_async().__await__()


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    """The event loop running in this thread, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _inner_done(inner: Any) -> Optional[bool]:
    """Whether a request's future finished: its done(), else its future().done() (Tinker's APIFutures
    have no done()); None when it has neither."""
    done = getattr(inner, "done", None)
    if callable(done):
        return bool(done())
    future = getattr(inner, "future", None)
    return bool(future().done()) if callable(future) else None


def _raise(err: BaseException) -> Any:
    try:
        raise err
    finally:  # (no cycle err -> traceback -> this frame -> err)
        del err
