"""Base losses for `regrad.compose`: `cross_entropy` (weighted mean token NLL, metric `perplexity`)."""

from __future__ import annotations

import math
from operator import attrgetter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._arrays import as_array_batch, reusable
from .data import loss_input
from .errors import InputError
from .grad import analytic

__all__ = ["cross_entropy"]

_SHAPE = attrgetter("shape")


def _token_weights(data: Sequence[Any], shapes: Sequence[Tuple[int, ...]]) -> List[np.ndarray]:
    """Each datum's `weights` ([T_i], all ones if absent) as 1-D arrays (not copied), checked against its log-probs."""
    plain = _plain_weights(data, shapes)
    if plain is not None:
        return plain
    out = []
    for i, (datum, shape) in enumerate(zip(data, shapes)):
        if len(shape) != 1:
            raise InputError(f"cross_entropy takes [T_i] log-probs of the target tokens; datum {i} has shape {shape}")
        w = loss_input(datum, "weights", i, required=False)
        if w is None:
            out.append(np.ones(shape[0]))
            continue
        w = np.asarray(w).reshape(-1)
        if w.shape != shape:
            raise InputError(f"datum {i} has weights of shape {w.shape} but log-probs of shape {shape}")
        out.append(w)
    return out


def _plain_weights(data: Sequence[Any], shapes: Sequence[Tuple[int, ...]]) -> Optional[List[np.ndarray]]:
    """The usual case in a few C-level passes: every `weights` a numpy array shaped like its [T_i] log-probs; else None."""
    try:
        weights = [datum.loss_fn_inputs["weights"] for datum in data]
    except Exception:  # noqa: BLE001 - not a Datum, no weights...: the checking loop handles or names it
        return None
    plain = set(map(type, weights)) == {np.ndarray} and set(map(len, shapes)) == {1}
    if not plain or any(w.dtype.kind not in "biuf" for w in weights):  # strings, complex...: loss_input names them
        return None
    return weights if list(map(_SHAPE, weights)) == list(shapes) else None


def _value_and_grad(data: Sequence[Any], arrays: List[np.ndarray]) -> Tuple[float, np.ndarray, Dict[str, float]]:
    """-Σ w·lp / Σ w and its gradient -w / Σ w (packed), in one pass; zero total weight gives 0 and 0."""
    _check_lengths(data, arrays)
    weights = _token_weights(data, list(map(_SHAPE, arrays)))
    if not arrays:
        return 0.0, np.zeros(0), {"perplexity": 1.0}
    packed = np.concatenate(weights).astype(np.float64, copy=False)
    _check_weights(packed, weights)
    # w / Σw in float64, then the batch dtype (the dot runs in it): weights past float32's range, or
    # tiny enough to round to 0 there, still give the weighted mean
    normalized = _normalized(packed).astype(arrays[0].dtype, copy=False)
    if not normalized.any():  # every token masked: 0 and 0 (+0.0, not the -0.0 that scaling by 0 gives)
        return 0.0, np.zeros(packed.size, arrays[0].dtype), {"perplexity": 1.0}
    logprobs = np.concatenate(arrays)
    # einsum, not np.dot: BLAS's dot splits its sum over OpenBLAS's threads, so the loss's last bits
    # changed with OMP_NUM_THREADS
    with np.errstate(invalid="ignore"):
        nll = -float(np.einsum("i,i->", normalized, logprobs))
    if not math.isfinite(nll):  # a weight-0 token is masked out: its log-prob may be -inf (0 * -inf is NaN)
        nll = -float(np.einsum("i,i->", normalized, np.where(normalized != 0, logprobs, 0)))
    return nll, np.negative(normalized), {"perplexity": _perplexity(nll)}


def _normalized(weights: np.ndarray) -> np.ndarray:
    """float64 weights / their sum (checked finite and >= 0; all zeros stay zeros); a sum past float64's
    range is taken after dividing by the largest weight."""
    with np.errstate(over="ignore"):  # an overflowing sum is handled below, not warned about
        total = float(weights.sum())
    if total == 0:
        return np.zeros_like(weights)
    if math.isinf(total):
        weights = weights / weights.max()
        total = float(weights.sum())
    return weights / total


def weighted_sum(weights: Any, logprobs: Any) -> Any:
    """Σ w·lp of torch tensors with weight-0 tokens masked out: their log-prob may be -inf (padding,
    a model that forbids that id), and 0·(-inf) would make the loss NaN. Shared with the local client."""
    return (weights * logprobs.masked_fill(weights == 0, 0.0)).sum()


def _check_lengths(data: Sequence[Any], arrays: Sequence[Any]) -> None:
    if not hasattr(data, "__len__") or isinstance(data, (str, bytes, dict)):
        raise InputError(f"data must be a list of Datum, one per datum, got {type(data).__name__}")
    if len(data) != len(arrays):
        raise InputError(f"data has {len(data)} entries but logprobs_list has {len(arrays)}; one per datum")


def _check_weights(packed: np.ndarray, weights: List[np.ndarray]) -> None:
    """Weights are a token mask or weighting: finite and >= 0 (a weighted mean with signed weights can
    flip the gradient's sign). Names the first bad datum and token."""
    if packed.size and not (packed.min() >= 0 and np.isfinite(packed.max())):
        for i, w in enumerate(weights):
            bad = np.flatnonzero(~(np.isfinite(w) & (w >= 0)))
            if bad.size:
                raise InputError(
                    f"cross_entropy needs finite weights >= 0; datum {i} has weight {w[bad[0]]} at token {bad[0]} "
                    "(for signed per-token weights such as advantages, write the base loss yourself)"
                )


def _perplexity(nll: float) -> float:
    if math.isnan(nll):  # exp(NaN) is NaN, not inf
        return nll
    return math.exp(nll) if nll < 709.0 else math.inf  # (math.exp raises OverflowError past ~709.78)


@analytic(_value_and_grad)
def cross_entropy(data: Sequence[Any], logprobs_list: List[Any]) -> Tuple[Any, Dict[str, float]]:
    """Mean negative log-likelihood over tokens, weighted by each datum's `weights`; metric perplexity = exp(value).

    With torch log-probs the loss is a 0-d tensor carrying the autograd graph (usable directly as a
    Tinker custom loss); inside `compose` the analytic gradient above is used instead.
    """
    data, logprobs_list = reusable(data), reusable(logprobs_list)
    batch = as_array_batch(logprobs_list)
    if not batch.is_torch:
        value, _, metrics = _value_and_grad(data, batch.arrays)
        return value, metrics
    import torch

    _check_lengths(data, batch.arrays)
    weights = _token_weights(data, batch.shapes)
    if not weights:
        return torch.zeros(()), {"perplexity": 1.0}
    packed = np.concatenate(weights).astype(np.float64, copy=False)
    _check_weights(packed, weights)
    normalized = np.split(_normalized(packed), np.cumsum([w.size for w in weights])[:-1])
    weighted = [weighted_sum(torch.tensor(w, dtype=lp.dtype), lp) for w, lp in zip(normalized, logprobs_list)]
    loss = 0.0 - torch.stack(weighted).sum()  # (not -sum: all-zero weights give +0.0, as the numpy path does)
    return loss, {"perplexity": _perplexity(float(loss.detach()))}
