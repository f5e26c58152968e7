"""Shared by the tests that send regrad's objects through pickle, copies and process pools: the fork marks,
a user exception that cannot cross a process, and tblib's pickling switched off for given classes."""

import copyreg
import sys
import threading

import pytest

# Python 3.12+ warns about fork() in a process with threads; the tests fork on purpose.
FORK = [
    pytest.mark.skipif(sys.platform != "linux", reason="fork start method"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


class _CodedError(Exception):
    """A user exception that cannot cross a process: its __init__ takes other arguments than its args (it
    pickles but does not unpickle), and it holds a lock (which does not pickle: this keeps the tests
    independent of tblib, which dask.distributed installs and which makes the first kind round-trip)."""

    def __init__(self, code, detail):
        super().__init__(f"code {code}: {detail}")
        self.code = code
        self.handle = threading.Lock()


def without_tblib(monkeypatch, *classes):
    """Pickle these exception classes by their own rules: tblib's pickling support (which dask.distributed
    installs for every exception class that exists when it is imported) takes precedence and pickles the
    original exception chain instead, so an earlier test importing dask would decide the outcome
    (docs/compose.md)."""
    for cls in classes:
        monkeypatch.delitem(copyreg.dispatch_table, cls, raising=False)


def two_lps():
    """Two float64 log-prob leaves (a ragged batch of 3 and 2) for a loss's round trips."""
    import torch

    return [torch.tensor([-1.0, -2.0, -0.25], dtype=torch.float64, requires_grad=True),
            torch.tensor([-0.5, -3.0], dtype=torch.float64, requires_grad=True)]


def run_backward(loss_fn):
    """loss_fn on two_lps() and its backward: the loss and the gradients' bytes, to compare copies bit for bit."""
    lps = two_lps()
    loss, _ = loss_fn([None, None], lps)
    loss.backward()
    return float(loss.detach()), [lp.grad.numpy().tobytes() for lp in lps]
