"""Training clients: `LocalTrainingClient` (the embedded default) and `forward_backward_custom`.

The local client has Tinker's TrainingClient methods (and their `*_async` twins) and semantics, so a
training loop written against it runs on the Tinker service (differences: docs/clients.md). Requests run one at a time, in
submission order, on one worker thread; each returns a future (`.result()` or `await`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import numbers
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ._futures import MappedFuture, RequestFuture
from .data import Datum, input_tokens, loss_input, tinker_datum
from .errors import InputError, NonFiniteError
from .grad import metric_number
from .losses import weighted_sum
from .model import ByteLM, default_model

__all__ = [
    "AdamParams",
    "ForwardBackwardOutput",
    "StatePath",
    "OptimStepResult",
    "LocalTrainingClient",
    "CustomLossResult",
    "forward_backward_custom",
]

# data is Any: loss_fn gets `data` as given, so one typed as Tinker's CustomLossFnV1 (List[Datum]) is accepted
LossFn = Callable[[Any, List[torch.Tensor]], Tuple[Any, Dict[str, float]]]
_STATE_FORMAT = "regrad.LocalTrainingClient/1"


@dataclass
class AdamParams:
    """Per-step Adam hyperparameters; the fields and defaults of `tinker.types.AdamParams`."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0  # decoupled (AdamW)
    grad_clip_norm: float = 0.0  # 0 means no clipping


@dataclass
class ForwardBackwardOutput:
    """What forward / forward_backward(_custom) return: per-datum {"logprobs": [T] or [T, K]} and metrics."""

    loss_fn_output_type: str
    loss_fn_outputs: List[Dict[str, torch.Tensor]]
    metrics: Dict[str, float] = field(default_factory=dict)


@dataclass
class OptimStepResult:
    """What optim_step returns: `optim/grad_norm` (before clipping), `optim/step`, `optim/learning_rate`."""

    metrics: Dict[str, float] = field(default_factory=dict)


@dataclass
class _Batch:
    """Validated data, padded for one model call: ids [B, T_max] and per-datum targets/weights."""

    data: List[Any]
    ids: torch.Tensor
    lengths: List[int]
    targets: List[torch.Tensor]  # [T_i] or [T_i, K_i], int64
    weights: List[torch.Tensor]  # shaped like targets, model dtype


class LocalTrainingClient:
    """Tinker-shaped training client over a local torch model (default: a seeded byte-level `ByteLM`).

    `model` is any `nn.Module` mapping input ids [B, T] (int64) to logits [B, T, V]; if it has
    `context` / `vocab_size` attributes (or `config.context` / `config.vocab_size`), data are
    checked against them before the request is queued.
    """

    def __init__(self, model: Optional[nn.Module] = None, *, seed: int = 0) -> None:
        self.model: nn.Module = default_model(seed) if model is None else model
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        self.seed = seed
        self.context: Optional[int] = _model_attr(self.model, "context")
        self.vocab_size: Optional[int] = _model_attr(self.model, "vocab_size")
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        if not self._params:
            raise ValueError("model has no trainable parameters")
        # what AdamW updates: float32 master copies of float16 / bfloat16 parameters (whose updates and
        # eps would round away or underflow), the parameters themselves otherwise
        self._masters = [_master_copy(p) for p in self._params]
        self._optimizer: Optional[torch.optim.AdamW] = None
        self._step = 0
        self._closed = False
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="regrad-client")
        self._worker_ident: Optional[int] = None  # the worker thread's id, once it ran a request

    # ----------------------------------------------------------------- requests

    def forward(
        self, data: Sequence[Any], loss_fn: str = "cross_entropy", loss_fn_config: Optional[Mapping[str, Any]] = None
    ) -> RequestFuture[ForwardBackwardOutput]:
        """Log-probs of `target_tokens` ([T], or [T, K] for [T, K] targets) and the loss, without gradients."""
        _check_builtin_loss(loss_fn, loss_fn_config)
        batch = self._prepare(data)
        return self._submit(lambda: self._run_forward(batch))

    def forward_backward(
        self, data: Sequence[Any], loss_fn: str = "cross_entropy", loss_fn_config: Optional[Mapping[str, Any]] = None
    ) -> RequestFuture[ForwardBackwardOutput]:
        """Cross-entropy `-Σ weights·logprobs` (a sum, as Tinker's); its gradient accumulates into `.grad`."""
        _check_builtin_loss(loss_fn, loss_fn_config)
        batch = self._prepare(data)
        return self._submit(lambda: self._run_forward_backward(batch))

    def forward_backward_custom(
        self, data: Sequence[Any], loss_fn: LossFn, *, loss_type_input: Optional[str] = None
    ) -> RequestFuture[ForwardBackwardOutput]:
        """Tinker's custom loss: `loss_fn(data, logprobs_list) -> (loss, metrics)`, differentiated w.r.t. the log-probs.

        The gradients g_i = d loss / d logprobs_i weight a linear surrogate Σ_i Σ g_i·logprobs_i whose
        backward reaches the parameters, so `.grad` gets exactly d loss / d parameters. Nothing is
        accumulated if the request fails. loss_type_input: Tinker's deprecated keyword, treated as
        Tinker treats it ("logprobs" warns, anything else is a ValueError).
        """
        _check_loss_type_input(loss_type_input)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (data, logprobs_list) -> (loss, metrics), got {loss_fn!r}")
        batch = self._prepare(data)
        return self._submit(lambda: self._run_forward_backward_custom(batch, loss_fn))

    def optim_step(self, optim_params: Any = None, *, adam_params: Any = None) -> RequestFuture[OptimStepResult]:
        """One AdamW step with the accumulated gradients (regrad or tinker AdamParams), then clears them.

        Tinker's signature: `optim_params` (positional or keyword), or the legacy keyword `adam_params`."""
        if optim_params is not None and adam_params is not None:
            raise ValueError("Specify optim_params or legacy adam_params, not both")
        params = _adam_params(optim_params if optim_params is not None else adam_params)
        return self._submit(lambda: self._run_optim_step(params))

    def save_state(self, path: "str | os.PathLike[str]") -> RequestFuture[StatePath]:
        """Saves weights, optimizer state and step count to `path` (a torch file); the future gives the path."""
        target = os.fspath(path)
        return self._submit(lambda: self._run_save_state(target))

    def load_state(self, path: "str | os.PathLike[str]") -> RequestFuture[StatePath]:
        """Restores what `save_state` wrote (exactly) and clears pending gradients."""
        source = os.fspath(path)
        return self._submit(lambda: self._run_load_state(source))

    # ------------------------------------------------------- Tinker's *_async twins
    # As on Tinker, awaiting one submits the request and gives its future (await that for the result).

    async def forward_async(
        self, data: Sequence[Any], loss_fn: str = "cross_entropy", loss_fn_config: Optional[Mapping[str, Any]] = None
    ) -> RequestFuture[ForwardBackwardOutput]:
        """`forward`, awaitable: gives the request's future."""
        return self.forward(data, loss_fn, loss_fn_config)

    async def forward_backward_async(
        self, data: Sequence[Any], loss_fn: str = "cross_entropy", loss_fn_config: Optional[Mapping[str, Any]] = None
    ) -> RequestFuture[ForwardBackwardOutput]:
        """`forward_backward`, awaitable: gives the request's future."""
        return self.forward_backward(data, loss_fn, loss_fn_config)

    async def forward_backward_custom_async(
        self, data: Sequence[Any], loss_fn: LossFn, *, loss_type_input: Optional[str] = None
    ) -> RequestFuture[ForwardBackwardOutput]:
        """`forward_backward_custom`, awaitable: gives the request's future."""
        return self.forward_backward_custom(data, loss_fn, loss_type_input=loss_type_input)

    async def optim_step_async(
        self, optim_params: Any = None, *, adam_params: Any = None
    ) -> RequestFuture[OptimStepResult]:
        """`optim_step`, awaitable: gives the request's future."""
        return self.optim_step(optim_params, adam_params=adam_params)

    async def save_state_async(self, path: "str | os.PathLike[str]") -> RequestFuture[StatePath]:
        """`save_state`, awaitable: gives the request's future."""
        return self.save_state(path)

    async def load_state_async(self, path: "str | os.PathLike[str]") -> RequestFuture[StatePath]:
        """`load_state`, awaitable: gives the request's future."""
        return self.load_state(path)

    # ---------------------------------------------------------------- lifecycle

    @property
    def step(self) -> int:
        """Number of optimizer steps applied so far."""
        return self._step

    def close(self) -> None:
        """Finishes queued requests and stops the worker thread; later requests raise (closing twice is fine)."""
        self._closed = True
        self._worker.shutdown(wait=not self._on_worker())  # (a request closing its own client cannot join itself)

    def __enter__(self) -> "LocalTrainingClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _submit(self, fn: Callable[[], Any]) -> RequestFuture[Any]:
        self._check_open()
        try:
            return RequestFuture(self._worker.submit(self._serve, fn), on_worker=self._on_worker)
        except RuntimeError:  # closed by another thread since the check
            self._check_open()
            raise

    def _serve(self, fn: Callable[[], Any]) -> Any:
        self._worker_ident = threading.get_ident()
        return fn()

    def _on_worker(self) -> bool:
        """True in the thread that runs this client's requests (inside a request: its loss_fn)."""
        return self._worker_ident == threading.get_ident()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this LocalTrainingClient is closed (close() was called, or its with-block ended): "
                "it takes no more requests; create a new client (load_state restores a saved one)"
            )

    @torch.inference_mode(False)
    def _prepare(self, data: Sequence[Any]) -> _Batch:
        """Checks every datum (tokens, targets, weights, context) and pads the inputs into one id tensor.
        Made outside inference mode: under a caller's torch.inference_mode() they were inference tensors, which
        the worker's autograd refused ("Inference tensors cannot be saved for backward") in forward_backward*."""
        self._check_open()
        if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
            raise InputError(f"data must be a list of Datum, got {type(data).__name__}")
        data = list(data)
        if not data:
            raise InputError("data is empty: a request needs at least one Datum")
        param = self._params[0]
        dtype = param.dtype if param.is_floating_point() else torch.get_default_dtype()
        rows: List[List[int]] = []
        targets: List[torch.Tensor] = []
        weights: List[torch.Tensor] = []
        for i, datum in enumerate(data):
            tokens = self._checked_tokens(datum, i)
            tgt = self._checked_targets(datum, i, len(tokens))
            w = _checked_weights(datum, i, tgt.shape)
            rows.append(tokens)
            targets.append(torch.as_tensor(np.asarray(tgt, dtype=np.int64), device=param.device))
            weights.append(torch.as_tensor(np.asarray(w, dtype=np.float64), device=param.device).to(dtype))
        width = max(len(r) for r in rows)
        # Right padding: the model is causal, so padding never changes earlier positions.
        ids = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.int64)
        return _Batch(data, ids.to(param.device), [len(r) for r in rows], targets, weights)

    def _checked_tokens(self, datum: Any, i: int) -> List[int]:
        """Input ids of datum i: at least one, within the model's context, valid token ids."""
        tokens = input_tokens(datum, i)
        n = len(tokens)
        if n == 0:
            raise InputError(f"datum {i} has no input tokens")
        if self.context is not None and n > self.context:
            raise InputError(f"datum {i} has {n} input tokens, longer than the model's context ({self.context})")
        _check_id_range(np.asarray(tokens), self.vocab_size, f"datum {i}: input tokens")
        return tokens

    def _checked_targets(self, datum: Any, i: int, n: int) -> np.ndarray:
        """`target_tokens` of datum i: [n] or [n, K] integer token ids (integral floats accepted)."""
        tgt = loss_input(datum, "target_tokens", i)
        if tgt.ndim not in (1, 2) or tgt.shape[0] != n:
            raise InputError(
                f"datum {i}: target_tokens has shape {tuple(tgt.shape)}; expected [{n}] or [{n}, K] "
                f"(one row per input token)"
            )
        if tgt.dtype == np.bool_:  # as ModelInput.from_ints refuses True for an id
            raise InputError(f"datum {i}: target_tokens holds booleans; expected integer token ids")
        if tgt.size and not np.issubdtype(tgt.dtype, np.integer):
            if not (np.all(np.isfinite(tgt)) and np.all(np.equal(np.mod(tgt, 1), 0))):  # (inf: mod warns, then NaN)
                raise InputError(f"datum {i}: target_tokens has non-integer values (dtype {tgt.dtype})")
        if tgt.ndim == 2 and tgt.shape[1] == 0:
            raise InputError(f"datum {i}: target_tokens has shape {tuple(tgt.shape)}; K must be at least 1")
        _check_id_range(tgt, self.vocab_size, f"datum {i}: target_tokens")
        return tgt

    def _logprobs(self, batch: _Batch) -> List[torch.Tensor]:
        """One model call; per-datum log-probs of the target tokens, [T_i] or [T_i, K_i] (graph kept if enabled)."""
        try:
            logits = self.model(batch.ids)
        except IndexError as err:  # an embedding lookup past its table: name the id, not torch's "in self"
            raise InputError(_index_error_message(batch, err)) from err
        b, t = batch.ids.shape
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (b, t):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InputError(f"the model returned {shape}; expected logits [{b}, {t}, vocab]")
        vocab = logits.shape[-1]
        logp = torch.log_softmax(logits, dim=-1)
        out = []
        for i, (n, tgt) in enumerate(zip(batch.lengths, batch.targets)):
            if tgt.numel() and int(tgt.max()) >= vocab:
                raise InputError(f"datum {i}: target_tokens has ids >= the model's vocabulary ({vocab})")
            rows = logp[i, :n]
            out.append(rows.gather(1, tgt.unsqueeze(1)).squeeze(1) if tgt.dim() == 1 else rows.gather(1, tgt))
        return out

    def _apply_grads(self, loss: torch.Tensor) -> None:
        """Backward of `loss` into `.grad`, all or nothing: the gradients and their sums with the accumulated
        ones are computed and checked first, then stored (a NaN or inf in .grad would refuse every later step)."""
        grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        name = _first_non_finite(self._names, grads)
        if name is not None:
            raise _non_finite(f"the gradient of parameter {name!r} has non-finite values; no gradient applied")
        totals = [
            None if g is None else g.detach().clone() if p.grad is None else p.grad + g
            for p, g in zip(self._params, grads)
        ]
        name = _first_non_finite(self._names, totals)
        if name is not None:
            raise _non_finite(
                f"adding this request's gradient to the accumulated gradient of parameter {name!r} overflows "
                f"to non-finite values; no gradient applied (the accumulated gradients are unchanged: "
                f"optim_step can use them)"
            )
        for p, total in zip(self._params, totals):
            if total is not None:
                p.grad = total

    def _run_forward(self, batch: _Batch) -> ForwardBackwardOutput:
        with torch.no_grad():
            logprobs = self._logprobs(batch)
            loss = sum(float(-weighted_sum(w, lp)) for w, lp in zip(batch.weights, logprobs))
        return _output(logprobs, {"loss:sum": loss})

    def _run_forward_backward(self, batch: _Batch) -> ForwardBackwardOutput:
        logprobs = self._logprobs(batch)
        loss = torch.stack([-weighted_sum(w, lp) for w, lp in zip(batch.weights, logprobs)]).sum()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise _non_finite(f"cross-entropy loss is {value}; no gradient applied")
        self._apply_grads(loss)
        return _output(logprobs, {"loss:sum": value})

    def _run_forward_backward_custom(self, batch: _Batch, loss_fn: LossFn) -> ForwardBackwardOutput:
        logprobs = self._logprobs(batch)
        # float16 / bfloat16 log-probs reach the loss as float32, as on Tinker (whose loss_fn always gets
        # float32): regrad's own losses and kernels take float32 / float64 only
        leaves = [lp.detach().to(_loss_dtype(lp.dtype), copy=True).requires_grad_(True) for lp in logprobs]
        grads, loss_value, metrics = _custom_loss_grads(loss_fn, batch.data, leaves)
        # masked like the built-in loss: a position with g = 0 may carry a -inf log-prob (padding, a
        # forbidden id), and 0 * -inf would make surrogate_loss:sum NaN
        surrogate = torch.stack([weighted_sum(g.to(lp.dtype), lp) for g, lp in zip(grads, logprobs)]).sum()
        self._apply_grads(surrogate)
        out_metrics = dict(metrics)
        out_metrics["loss:sum"] = loss_value
        out_metrics["surrogate_loss:sum"] = float(surrogate.detach())
        return _output(logprobs, out_metrics)

    def _run_optim_step(self, params: AdamParams) -> OptimStepResult:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self._masters, lr=params.learning_rate)
        for group in self._optimizer.param_groups:
            group.update(
                lr=params.learning_rate,
                betas=(params.beta1, params.beta2),
                eps=params.eps,
                weight_decay=params.weight_decay,
            )
        norm = _global_norm([p.grad for p in self._params if p.grad is not None])
        if not math.isfinite(norm):
            raise _non_finite(f"accumulated gradient norm is {norm}; optimizer step not applied")
        self._load_masters()
        grads = [m.grad for m in self._masters if m.grad is not None]
        if params.grad_clip_norm > 0:
            # torch's clip_grad_norm_ rule, with the float64 norm: it would recompute the norm in the
            # gradients' dtype, where large float32 gradients overflow to inf and are all scaled by 0
            scale = params.grad_clip_norm / (norm + 1e-6)
            if scale < 1.0:
                for g in grads:
                    g.mul_(scale)
        self._optimizer.step()
        with torch.no_grad():
            for p, master in zip(self._params, self._masters):
                if master is not p:
                    p.copy_(master)  # rounded to the parameter's dtype
                p.grad = master.grad = None
        self._step += 1
        return OptimStepResult(
            {"optim/grad_norm": norm, "optim/step": float(self._step), "optim/learning_rate": params.learning_rate}
        )

    def _run_save_state(self, path: str) -> StatePath:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        config = self.model.config.to_dict() if isinstance(self.model, ByteLM) else None
        state = {
            "format": _STATE_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
            "master_weights": [None if m is p else m.detach().clone() for p, m in zip(self._params, self._masters)],
            "step": self._step,
            "model_config": config,
        }
        torch.save(state, path)
        return StatePath(path)

    def _run_load_state(self, path: str) -> StatePath:
        device = self._params[0].device
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise InputError(f"{path} is not a state saved by LocalTrainingClient.save_state")
        if isinstance(self.model, ByteLM) and state.get("model_config") not in (None, self.model.config.to_dict()):
            raise InputError(
                f"{path} holds a model with config {state['model_config']}, this client has {self.model.config.to_dict()}"
            )
        _check_same_tensors(path, state["model"], self.model.state_dict())  # before anything is copied
        self.model.load_state_dict(state["model"])
        saved = state.get("master_weights") or [None] * len(self._params)
        with torch.no_grad():
            for p, master, kept in zip(self._params, self._masters, saved):
                if master is not p:  # the saved float32 copy if it is one of this parameter, else its weights
                    fits = isinstance(kept, torch.Tensor) and kept.shape == p.shape and torch.equal(kept.to(p.dtype), p)
                    master.copy_(kept if fits else p)
        if state["optimizer"] is None:
            self._optimizer = None
        else:
            self._optimizer = torch.optim.AdamW(self._masters)
            self._optimizer.load_state_dict(state["optimizer"])
        self._step = int(state["step"])
        for p, master in zip(self._params, self._masters):
            p.grad = master.grad = None
        return StatePath(path)

    def _load_masters(self) -> None:
        """Hands float16 / bfloat16 gradients to the float32 masters; a master whose parameter was changed
        outside the client (load_state_dict, an edit) is first reset to the parameter's weights."""
        with torch.no_grad():
            for p, master in zip(self._params, self._masters):
                if master is p:
                    continue
                if not torch.equal(master.to(p.dtype), p):
                    master.copy_(p)
                master.grad = None if p.grad is None else p.grad.to(torch.float32)


class StatePath(str):
    """What save_state / load_state give: the file's path, a str, that also has Tinker's
    SaveWeightsResponse / LoadWeightsResponse field `.path`, so `future.result().path` runs on both."""

    @property
    def path(self) -> str:
        """The file's path (Tinker's response field)."""
        return str(self)


def _check_loss_type_input(loss_type_input: Optional[str]) -> None:
    """Tinker's deprecated forward_backward_custom keyword: None is silent, "logprobs" (the only input a
    custom loss gets) warns as Tinker does, anything else is a ValueError."""
    if loss_type_input is None:
        return
    if loss_type_input != "logprobs":
        raise ValueError(f"Unsupported loss_type_input={loss_type_input!r}. Supported values are: logprobs")
    warnings.warn(
        "The 'loss_type_input' parameter of forward_backward_custom() is deprecated: the loss always receives "
        "logprobs (as on Tinker); remove it from your call.",
        DeprecationWarning,
        stacklevel=3,
    )


def _check_same_tensors(path: str, saved: Any, current: Mapping[str, torch.Tensor]) -> None:
    """A saved state_dict has this model's keys and shapes: torch's load_state_dict copies every
    matching tensor before it raises about the rest, which would leave the model half loaded."""
    if not isinstance(saved, Mapping):
        raise InputError(f"{path} is not a state saved by LocalTrainingClient.save_state")
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    mismatched = [
        f"{k}: saved {tuple(getattr(saved[k], 'shape', ()))}, model {tuple(v.shape)}"
        for k, v in current.items()
        if k in saved and (not isinstance(saved[k], torch.Tensor) or saved[k].shape != v.shape)
    ]
    if missing or unexpected or mismatched:
        raise InputError(
            f"{path} holds another model's weights (missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {mismatched}); nothing was loaded"
        )


def _model_attr(model: nn.Module, name: str) -> Optional[int]:
    """`model.<name>` or `model.config.<name>` as an int, if the model declares it."""
    for owner in (model, getattr(model, "config", None)):
        value = getattr(owner, name, None) if owner is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 / bfloat16 (what a custom loss sees, what AdamW updates), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _master_copy(p: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a float16 / bfloat16 parameter for the optimizer to update; other parameters as is."""
    wide = _loss_dtype(p.dtype)
    return p if wide is p.dtype else p.detach().to(wide).clone()


def _index_error_message(batch: _Batch, err: IndexError) -> str:
    """What an IndexError inside the model most likely means: an input id outside its vocabulary."""
    largest = [int(row[:n].max()) for row, n in zip(batch.ids, batch.lengths)]
    i = int(np.argmax(largest))
    return (
        f"the model raised IndexError ({err}) on the input ids; the largest is {largest[i]} (datum {i}): "
        "is it outside the model's vocabulary? Give the model a `vocab_size` attribute to have ids "
        "checked when a request is submitted"
    )


def _check_builtin_loss(loss_fn: str, config: Optional[Mapping[str, Any]]) -> None:
    if loss_fn != "cross_entropy":
        raise ValueError(
            f"LocalTrainingClient supports loss_fn='cross_entropy' (got {loss_fn!r}); "
            "use forward_backward_custom for any other loss"
        )
    if config:
        raise ValueError(f"cross_entropy takes no loss_fn_config (got {dict(config)})")


def _check_id_range(ids: np.ndarray, vocab_size: Optional[int], where: str) -> None:
    """Token ids are >= 0, and < vocab_size when the model declares one; `where` names the datum and field."""
    if ids.size == 0:
        return
    low, high = ids.min(), ids.max()
    if low < 0:
        raise InputError(f"{where} has a negative id ({low:g}); token ids are >= 0")
    if vocab_size is not None and high >= vocab_size:
        raise InputError(f"{where} has ids outside [0, {vocab_size}) (largest {high:g})")
    if not high < 2**63:  # no int64 holds it (inf too): the cast would wrap to a garbage (negative) index
        raise InputError(f"{where} has an id too large for a token id ({high:g})")


def _checked_weights(datum: Any, i: int, shape: Tuple[int, ...]) -> np.ndarray:
    """`weights` of datum i (ones if absent), shaped like its target_tokens."""
    w = loss_input(datum, "weights", i, required=False)
    if w is None:
        return np.ones(shape)
    if w.shape != shape:
        raise InputError(f"datum {i}: weights have shape {tuple(w.shape)} but target_tokens has {tuple(shape)}")
    bad = np.flatnonzero(~np.isfinite(w.reshape(-1)))
    if bad.size:  # would give a NaN loss:sum (forward) or an unnamed NonFiniteError at run time
        at = np.unravel_index(bad[0], w.shape)
        raise InputError(
            f"datum {i}: loss_fn_inputs['weights'] has a non-finite value ({w[at]}) at {tuple(int(x) for x in at)}"
        )
    return w


def _first_non_finite(names: List[str], tensors: Sequence[Optional[torch.Tensor]]) -> Optional[str]:
    """The name of the first tensor holding a NaN or inf (None entries skipped), or None."""
    for name, t in zip(names, tensors):
        if t is not None and not bool(torch.isfinite(t).all()):
            return name
    return None


def _global_norm(grads: List[torch.Tensor]) -> float:
    """L2 norm over all gradients, in float64: float32 squares of large but finite gradients overflow."""
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])))


_ADAM_FIELDS = tuple(AdamParams.__dataclass_fields__)


def _adam_params(params: Any) -> AdamParams:
    """A new, validated AdamParams of floats from ours, tinker's (same field names), a dict, or None (defaults).

    A copy taken at the call, so changing the caller's object afterwards cannot change a queued step.
    """
    values = {**asdict(AdamParams()), **_adam_fields(params)}
    out = AdamParams(**{name: _adam_number(name, value) for name, value in values.items()})
    if not (out.beta1 < 1 and out.beta2 < 1):
        raise ValueError(f"AdamParams betas must be < 1, got ({out.beta1}, {out.beta2})")
    if not out.eps > 0:  # eps = 0 divides 0 by 0 for every parameter whose gradient is 0: NaN weights
        raise ValueError(f"AdamParams.eps must be > 0, got {out.eps!r}")
    return out


def _adam_fields(params: Any) -> Dict[str, Any]:
    """The AdamParams fields `params` sets: none for None, a dict's items, an AdamParams' attributes."""
    if params is None:
        return {}
    if isinstance(params, Mapping):
        unknown = sorted(set(map(str, params)) - set(_ADAM_FIELDS))
        if unknown:
            raise TypeError(f"AdamParams has no field(s) {unknown}; its fields are {list(_ADAM_FIELDS)}")
        return dict(params)
    if isinstance(params, AdamParams) or type(params).__name__ == "AdamParams":  # tinker.types: same names
        return {k: getattr(params, k) for k in _ADAM_FIELDS if hasattr(params, k)}
    # a float, another optimizer's params: silently running AdamW defaults would be wrong
    raise TypeError(
        f"optim_step takes AdamParams (regrad's or tinker.types'), a dict of its fields, or None; "
        f"got {type(params).__name__}"
    )


def _adam_number(name: str, value: Any) -> float:
    """value as a float if it is a finite real number >= 0 (Python, numpy or a 0-d tensor); a bool is refused."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    is_real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    try:
        finite = is_real and math.isfinite(value)
    except OverflowError:  # an int beyond float64 (10**400): math.isfinite raised it, not a ValueError
        raise ValueError(f"AdamParams.{name} must be a finite number >= 0, got an integer beyond float64's range") from None
    if not finite or value < 0:
        raise ValueError(f"AdamParams.{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _non_finite(message: str, datum: int = -1) -> Exception:
    """A NonFiniteError carrying `.datum` (-1: the whole batch), like the ones the C++ core raises."""
    err = NonFiniteError(message)
    err.datum = datum  # type: ignore[attr-defined]
    err.position = -1  # type: ignore[attr-defined]
    return err


def _output(logprobs: List[torch.Tensor], metrics: Dict[str, float]) -> ForwardBackwardOutput:
    return ForwardBackwardOutput("ArrayRecord", [{"logprobs": lp.detach()} for lp in logprobs], metrics)


def _custom_loss_grads(
    loss_fn: LossFn, data: List[Any], leaves: List[torch.Tensor]
) -> Tuple[List[torch.Tensor], float, Dict[str, float]]:
    """Runs loss_fn on leaf log-prob tensors as Tinker's client does; returns d loss/d leaves, loss, metrics."""
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    result = loss_fn(data, leaves)
    if not isinstance(result, tuple) or len(result) != 2:
        raise InputError(f"loss_fn {name!r} must return (loss, metrics), got {type(result).__name__}")
    loss, metrics = result
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise InputError(f"loss_fn {name!r} must return a 0-d torch tensor as its loss, got {got}")
    if not loss.requires_grad:
        raise InputError(
            f"loss_fn {name!r} returned a loss with no autograd graph: it must be computed from logprobs_list "
            "with torch operations (or wrapped with regrad.numerical)"
        )
    if not isinstance(metrics, Mapping):
        raise InputError(f"loss_fn {name!r} must return a dict of metrics, got {type(metrics).__name__}")
    try:  # compose's rule for a metric (a string is not parsed: "1.5" passed as 1.5; no complex, one number)
        clean_metrics = {str(k): metric_number(k, v) for k, v in metrics.items()}
    except (TypeError, NonFiniteError) as err:
        raise InputError(f"loss_fn {name!r} returned a metric that is not a number: {err}") from None
    loss_value = float(loss.detach().sum())
    if not math.isfinite(loss_value):
        raise _non_finite(f"loss_fn {name!r} returned a non-finite loss ({loss_value}); no gradient applied")
    # d loss / d log-probs only, as Tinker's client computes it: parameters the loss_fn may also touch
    # get no .grad here (a failed request must leave nothing behind)
    leaf_grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
    grads = []
    for i, grad in enumerate(leaf_grads):
        if grad is None:
            raise InputError(
                f"loss_fn {name!r}: the loss does not depend on logprobs_list[{i}] (datum {i}); "
                "Tinker's client rejects this too (add 0 * logprobs to include it)"
            )
        if not bool(torch.isfinite(grad).all()):
            raise _non_finite(f"loss_fn {name!r}: the gradient for datum {i} has non-finite values", i)
        grads.append(grad)
    for leaf, grad in zip(leaves, grads):  # as backward() would leave them (callers read leaf.grad)
        leaf.grad = grad
    return grads, loss_value, clean_metrics


# --------------------------------------------------------------- composition


@dataclass
class CustomLossResult:
    """Result of `regrad.forward_backward_custom`: total loss, its telemetry, d total/d logprobs, client output."""

    loss: float
    telemetry: Any  # regrad.CustomLossOutput
    grads: List[torch.Tensor]  # per datum, shaped like its log-probs
    output: Any  # what the client's forward_backward_custom returned (ForwardBackwardOutput)


class _Recorder:
    """Wraps a loss_fn to keep the log-prob tensors it was given, so their `.grad` can be read afterwards.

    `sent` / `given`: the data handed to the client and the caller's own; a call with `sent` gets `given`
    (the caller's regrad Datums, not the tinker copies a Tinker client was sent)."""

    def __init__(self, loss_fn: LossFn, sent: Any = None, given: Any = None) -> None:
        self.loss_fn = loss_fn
        self.__name__ = getattr(loss_fn, "__name__", "loss_fn")
        self.logprobs: Optional[List[torch.Tensor]] = None
        self._sent, self._given = sent, given

    def __call__(self, data: Sequence[Any], logprobs_list: List[torch.Tensor]) -> Tuple[Any, Dict[str, float]]:
        self.logprobs = list(logprobs_list)
        if self._sent is not None and data is self._sent:
            data = self._given
        try:
            return self.loss_fn(data, logprobs_list)
        finally:  # its worker threads serve this call only, whatever becomes of the request
            _close(self.loss_fn)

    def finish(self, output: Any) -> CustomLossResult:
        if self.logprobs is None:
            raise RuntimeError("the client finished forward_backward_custom without calling the loss function")
        grads = []
        for lp in self.logprobs:
            grads.append(torch.zeros_like(lp) if lp.grad is None else lp.grad.detach().clone())
        telemetry = getattr(self.loss_fn, "last_output", None)
        loss = float(getattr(telemetry, "loss_total", float("nan")))
        if not math.isfinite(loss):
            metrics = getattr(output, "metrics", None) or {}
            loss = float(metrics.get("loss:sum", loss))
        return CustomLossResult(loss=loss, telemetry=telemetry, grads=grads, output=output)


_DEFAULT_BASE_LOSS: Any = object()


def forward_backward_custom(
    client: Any,
    data: Sequence[Any],
    *,
    base_loss: Any = _DEFAULT_BASE_LOSS,
    regularizers: Sequence[Any] = (),
    **compose_options: Any,
) -> MappedFuture[CustomLossResult]:
    """Composes `base_loss + Σ weight·regularizer` and runs it through `client.forward_backward_custom`.

    `client` is a `LocalTrainingClient` or anything with Tinker's `forward_backward_custom(data, loss_fn)`
    (a `tinker` TrainingClient). Returns a future (`.result()` / `await`) of a `CustomLossResult`.
    """
    try:
        from .compose import compose
    except ImportError as err:  # pragma: no cover - only while compose is missing
        raise ImportError(f"regrad.compose is not available: {err}") from err
    method = _custom_loss_method(client)
    if base_loss is _DEFAULT_BASE_LOSS:
        from .losses import cross_entropy

        base_loss = cross_entropy
    sent = _client_data(client, data)
    recorder = _Recorder(compose(base_loss, regularizers, **compose_options), sent, data)  # (compose names a single spec or dict)
    returned = method(sent, recorder)
    name = f"{type(client).__name__}.{getattr(method, '__name__', 'forward_backward_custom')}"
    return MappedFuture(_request_future(returned, name), recorder.finish)


def _client_data(client: Any, data: Sequence[Any]) -> Sequence[Any]:
    """data as the client takes it: a list with each regrad.Datum as a tinker.types.Datum for any client but a
    LocalTrainingClient when tinker is installed (Tinker's client cannot send regrad's types); else data as is."""
    if isinstance(client, LocalTrainingClient) or not isinstance(data, (list, tuple)):
        return data
    if not any(isinstance(d, Datum) for d in data):
        return data
    try:
        import tinker  # noqa: F401
    except ImportError:  # another duck-typed client: it gets what it was given
        return data
    return [tinker_datum(d, i, extras=False) if isinstance(d, Datum) else d for i, d in enumerate(data)]


def _custom_loss_method(client: Any) -> Callable[..., Any]:
    """`client.forward_backward_custom`, or `forward_backward_custom_async` for a client that has only that."""
    for name in ("forward_backward_custom", "forward_backward_custom_async"):
        method = getattr(client, name, None)
        if callable(method):
            return method
    raise TypeError(
        f"client {type(client).__name__} has no forward_backward_custom(data, loss_fn); "
        "pass a regrad.LocalTrainingClient or a tinker TrainingClient"
    )


def _request_future(returned: Any, method: str) -> Any:
    """What the client's method returned, as a future with `.result()`: as is if it is one (Tinker's
    APIFuture); an awaitable (an async client) is scheduled on the running event loop."""
    if callable(getattr(returned, "result", None)):
        return returned
    if not inspect.isawaitable(returned):
        raise TypeError(
            f"{method} returned {type(returned).__name__}, not a future: regrad needs Tinker's shape, "
            "an object with .result() (or an awaitable, in async code)"
        )
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        if inspect.iscoroutine(returned):
            returned.close()  # never to be awaited
        raise TypeError(
            f"{method} is async (it returned a {type(returned).__name__}): call regrad.forward_backward_custom "
            "from async code, where the request runs on the event loop"
        ) from None
    return RequestFuture(asyncio.run_coroutine_threadsafe(_awaited_output(returned), loop), loop)


async def _awaited_output(awaitable: Any) -> Any:
    """An async client's output: awaited, and awaited again when that gives a future (as Tinker's *_async do)."""
    out = await awaitable
    return await out if inspect.isawaitable(out) else out


def _close(loss_fn: Any) -> None:
    """Stops a composed loss's worker threads (a no-op for plain functions)."""
    close = getattr(loss_fn, "close", None)
    if callable(close):
        close()
