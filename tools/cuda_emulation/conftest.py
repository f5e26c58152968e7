"""Runs tests/test_cuda.py's gpu tests against a host emulation of regrad._cuda: the real .cu sources
and bind_cuda.cpp built by g++ against include/cuda_runtime.h, each block's threads as std::threads,
torch CPU tensors standing in for CUDA tensors. Loaded only by run.sh (never by the normal suite)."""

import contextlib
import glob
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.environ["REGRAD_TESTS"])
from conftest_tests import *  # noqa: E402,F401,F403 - the suite's fixtures (rng, ...)

import regrad  # noqa: E402
from regrad import _arrays, _gpu  # noqa: E402

_spec = importlib.util.spec_from_file_location("_cuda", glob.glob(os.path.join(os.environ["REGRAD_EMU_LIB"], "_cuda*.so"))[0])
regrad._cuda = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regrad._cuda)

torch.cuda.is_available = lambda: True
torch.Tensor.cuda = lambda self, *a, **k: self.clone()


class _Stream:
    cuda_stream = 0

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


torch.cuda.Stream = lambda *a, **k: _Stream()
torch.cuda.current_stream = lambda *a, **k: _Stream()
torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
torch.cuda.device = lambda *a, **k: contextlib.nullcontext()


def _on_cpu(make):
    def made(*a, **k):
        if str(k.get("device", "")).startswith("cuda"):
            k["device"] = "cpu"
        return make(*a, **k)
    return made


for _name in ("empty", "ones", "zeros", "tensor", "as_tensor", "full"):
    setattr(torch, _name, _on_cpu(getattr(torch, _name)))
_gpu.on_cuda = lambda items: isinstance(items, (list, tuple)) and bool(items) and _arrays.is_torch_tensor(items[0])
