"""Training data in Tinker's shape: `Datum(model_input, loss_fn_inputs)`, and readers of either kind.

A `tinker.types.Datum` is accepted wherever a `regrad.Datum` is: the readers below only use what
both have (`model_input.to_ints()` or a token list, and `loss_fn_inputs[...]` as arrays).
"""

from __future__ import annotations

import numbers

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, overload

import numpy as np

from .errors import InputError

__all__ = ["Datum", "ModelInput", "loss_input", "input_tokens", "datum_from_text", "data_from_texts"]


@dataclass
class ModelInput:
    """Input token ids of one datum (Tinker's `ModelInput` with a single chunk of ints)."""

    tokens: List[int]

    def __post_init__(self) -> None:
        # Checked when built, as tinker's (pydantic) ModelInput is: a float id fails here, not in the model.
        if type(self.tokens) is not list or not all(type(t) is int for t in self.tokens):
            self.tokens = _token_ids(self.tokens, "ModelInput")

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> "ModelInput":
        """Tinker's constructor: integer ids from a list, numpy array or torch tensor (a float id is refused)."""
        return cls(_token_ids(tokens, "ModelInput.from_ints"))

    def to_ints(self) -> List[int]:
        """The token ids, as a new list."""
        return list(self.tokens)

    @property
    def length(self) -> int:
        """The number of input tokens."""
        return len(self.tokens)

    @property
    def chunks(self) -> List["EncodedTextChunk"]:
        """Tinker's view of the tokens: one text chunk (a copy; edit `tokens` to change the input)."""
        return [EncodedTextChunk(list(self.tokens))]


@dataclass(frozen=True)
class EncodedTextChunk:
    """A chunk of token ids, as in Tinker's `ModelInput.chunks`."""

    tokens: List[int]
    type: str = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(eq=False)
class Datum:
    """One training example: `model_input` token ids and `loss_fn_inputs` (`target_tokens`, `weights`, ...)."""

    model_input: Any
    loss_fn_inputs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.model_input, (list, tuple, np.ndarray)) or hasattr(self.model_input, "detach"):
            self.model_input = ModelInput.from_ints(self.model_input)

    def __eq__(self, other: Any) -> bool:
        """Equal model inputs and loss_fn_inputs with the same keys and equal array values (the
        generated dataclass `==` compared arrays with `==`, whose truth value is ambiguous)."""
        if not isinstance(other, Datum):
            return NotImplemented
        if self is other:
            return True
        a, b = self.loss_fn_inputs, other.loss_fn_inputs
        return (self.model_input == other.model_input and a.keys() == b.keys()
                and all(np.array_equal(_to_numpy(a[k]), _to_numpy(b[k])) for k in a))

    __hash__ = None  # type: ignore[assignment]  # mutable, as before

    def to_tinker(self) -> Any:
        """This datum as a `tinker.types.Datum` (needs the tinker SDK): a real Tinker client sends only its
        own types (its request serializer refuses regrad's ModelInput and numpy arrays). Integer and
        boolean inputs become int64, floats float32 (`TensorData`), as tinker stores them; an input that is not
        a rectangular array of numbers (which tinker cannot hold) is an InputError naming its key."""
        return tinker_datum(self)


def tinker_datum(datum: Datum, index: int = 0, *, extras: bool = True) -> Any:
    """`datum.to_tinker()`, an error naming data item `index`. extras=False leaves out an extra input tinker cannot
    hold (text, a dict, a ragged list): Tinker's client sends only target_tokens and weights to the server, and
    regrad.forward_backward_custom hands the loss the caller's own Datum (tinker's ValueError before)."""
    from tinker import types

    inputs: Dict[str, Any] = {}
    for key in datum.loss_fn_inputs:
        try:
            array = loss_input(datum, key, index)
        except InputError:
            if extras or key in ("target_tokens", "weights"):
                raise
            continue
        if key == "weights" and array.dtype.kind in "biu":  # typed by key, as tinker types lists: float32 weights,
            array = array.astype(np.float32)  # int64 targets (an empty or integer list read as float / int64 before)
        elif key == "target_tokens" and array.size == 0:
            array = array.astype(np.int64)
        inputs[key] = array.astype(np.int64) if array.dtype.kind in "bu" else array  # (tinker takes i and f only)
    return types.Datum(model_input=types.ModelInput.from_ints(input_tokens(datum, index)), loss_fn_inputs=inputs)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "to_numpy"):  # tinker.types.TensorData
        return np.asarray(value.to_numpy())
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if value.is_floating_point() and str(value.dtype) not in ("torch.float16", "torch.float32", "torch.float64"):
            value = value.float()  # bfloat16 / float8: numpy has no such dtype (tinker's TensorData widens them too)
        return value.numpy()
    return np.asarray(value)


@overload
def loss_input(datum: Any, key: str, index: int = 0, *, required: Literal[True] = True) -> np.ndarray: ...
@overload
def loss_input(datum: Any, key: str, index: int = 0, *, required: bool) -> Optional[np.ndarray]: ...
def loss_input(datum: Any, key: str, index: int = 0, *, required: bool = True) -> Optional[np.ndarray]:
    """`datum.loss_fn_inputs[key]` as a numeric numpy array (bool, int or float), for a regrad or tinker
    Datum; a ragged or non-numeric value is an InputError naming the datum (index) and the key."""
    inputs = getattr(datum, "loss_fn_inputs", None)
    if inputs is None:
        raise InputError(f"datum {index} is a {type(datum).__name__}, not a Datum with loss_fn_inputs")
    if key not in inputs:
        if required:
            raise InputError(f"datum {index} has no loss_fn_inputs[{key!r}] (has {sorted(inputs)})")
        return None
    where = f"datum {index}: loss_fn_inputs[{key!r}]"
    try:
        array = _to_numpy(inputs[key])
    except (ValueError, TypeError) as err:  # numpy refuses ragged nesting: "inhomogeneous shape"
        raise InputError(f"{where} is not a rectangular array ({err})") from None
    if array.dtype.kind not in "biuf":  # bool, int, unsigned int, float
        sample = f" such as {array.flat[0]!r}" if array.size else ""
        raise InputError(f"{where} must hold numbers; got dtype {array.dtype}{sample}")
    return array


def input_tokens(datum: Any, index: int = 0) -> List[int]:
    """The input token ids of a regrad or tinker Datum."""
    mi = getattr(datum, "model_input", None)
    if mi is None:
        raise InputError(f"datum {index} has no model_input")
    return _token_ids(mi.to_ints() if hasattr(mi, "to_ints") else mi, f"datum {index}")


def _token_ids(tokens: Any, where: str) -> List[int]:
    """Token ids as Python ints; a float, string or bool is an InputError (int() would truncate 104.9
    to 104 or fail with a bare ValueError; tinker's from_ints refuses 104.9 but takes 104.0 and True)."""
    if hasattr(tokens, "tolist"):  # numpy array or torch tensor: elements as Python numbers
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise InputError(f"{where}: input tokens must be a sequence of integer ids, got {type(tokens).__name__}")
    ids = []
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise InputError(f"{where}: input token {t!r} is not an integer id")
        ids.append(int(t))
    return ids


def datum_from_text(text: str, *, weights: Optional[Sequence[float]] = None, index: Optional[int] = None) -> Datum:
    """A next-byte-prediction Datum from text: inputs are bytes[:-1], targets bytes[1:], weights 1."""
    where = "text" if index is None else f"text {index}"
    if not isinstance(text, str):
        raise InputError(f"{where} is a {type(text).__name__}, not a str")
    ids = list(text.encode("utf-8"))
    if len(ids) < 2:
        raise InputError(f"{where} {text!r} is too short: it needs at least 2 bytes to make one target")
    targets = np.asarray(ids[1:], dtype=np.int64)
    w = np.ones(len(targets), dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    if w.shape != targets.shape:
        raise InputError(f"weights have shape {w.shape} but the text gives {targets.shape[0]} targets")
    return Datum(ModelInput.from_ints(ids[:-1]), {"target_tokens": targets, "weights": w})


def data_from_texts(texts: Sequence[str]) -> List[Datum]:
    """One next-byte-prediction Datum per text (a list of str; a single str is refused, not split into characters)."""
    if isinstance(texts, (str, bytes)):
        raise InputError(f"data_from_texts takes a list of texts, got a single {type(texts).__name__}; wrap it: [text]")
    return [datum_from_text(t, index=i) for i, t in enumerate(texts)]
