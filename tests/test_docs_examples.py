"""Every ```python example in README.md and docs/*.md runs as written and does what its comments say.

Examples are found by parsing the Markdown, so a new or edited example is picked up here: each one
is either run (with the names it assumes, such as `data`, given by a prelude) and its result checked
against an independent reference, or listed in SKIPPED with the reason it cannot run.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch

import regrad

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
if not DOCS[0].is_file():  # an installed wheel tested from a copy of tests/: the docs are not beside it
    pytest.skip("not run from a checkout (no README.md / docs/ next to tests/)", allow_module_level=True)


def _examples() -> List[Tuple[str, int, str]]:
    """(file, line, code) of every ```python block."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i + 1
                end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
                found.append((path.relative_to(ROOT).as_posix(), start + 1, "\n".join(lines[start:end])))
                i = end
            i += 1
    return found


def _name(file: str, code: str) -> Tuple[str, str]:
    """An example's name: its file and first line past the imports, without its comment (stable
    when other examples move)."""
    lines = [line.split("#")[0].strip() for line in code.splitlines()]
    return file, next(line for line in lines if line and not line.startswith(("import ", "from ")))


def _nothing(ns: Dict[str, Any]) -> None:
    """A self-contained example: it imports what it uses."""


def _data_and_logprobs(ns: Dict[str, Any]) -> None:
    """What the snippets assume: regrad, torch and numpy imported, `data` (two texts) and
    `logprobs_list` (one [T] float64 log-prob leaf per datum)."""
    ns.update(regrad=regrad, torch=torch, np=np)
    ns["data"] = regrad.data_from_texts(["the cat sat on the mat", "gradients flow back"])
    gen = torch.Generator().manual_seed(0)
    ns["logprobs_list"] = [(-torch.rand(len(d.loss_fn_inputs["target_tokens"]), generator=gen, dtype=torch.float64)
                            - 0.05).requires_grad_() for d in ns["data"]]


def _kernels_check(ns: Dict[str, Any]) -> None:
    # value = mean over the 2 data of sum|x|: gradient sign(x) / 2
    for lp in ns["logprobs"]:
        np.testing.assert_allclose(lp.grad.numpy(), np.sign(lp.detach().numpy()) / 2)
    probs = np.full((5, 4), 0.25)
    assert ns["res"].value.item() == pytest.approx(np.abs(np.concatenate([lp.detach().numpy()
                                                                          for lp in ns["logprobs"]])).sum() / 2)
    entropy = regrad.kernels.entropy([np.log(probs)], reduction="sum", mask=[[1, 1, 0, 1, 1]])
    assert float(entropy.value) == pytest.approx(4 * np.log(4))  # 4 unmasked rows of a uniform 4-way distribution


def _compose_check(ns: Dict[str, Any]) -> None:
    # the composed total's gradient is autograd's of the hand-written total
    leaves = [lp.detach().clone().requires_grad_() for lp in ns["logprobs_list"]]
    weights = [torch.as_tensor(d.loss_fn_inputs["weights"], dtype=torch.float64) for d in ns["data"]]
    nll = -sum((w * lp).sum() for w, lp in zip(weights, leaves)) / sum(w.sum() for w in weights)
    topology = sum(lp.exp().sum() for lp in leaves) / len(leaves)
    l1 = sum(lp.abs().sum() for lp in leaves) / len(leaves)
    total = nll + 0.1 * topology + 0.01 * l1
    total.backward()
    assert ns["loss"].item() == pytest.approx(total.item(), rel=1e-12)
    for ours, reference in zip(ns["logprobs_list"], leaves):
        np.testing.assert_allclose(ours.grad.numpy(), reference.grad.numpy(), rtol=1e-10, atol=1e-14)
    telemetry = ns["loss_fn"].last_output.to_dict()
    assert set(telemetry["regularizers"]) == {"topology", "sparsity"}
    assert ns["printed"].strip().startswith("{")


def _repeats_gradient(lps: List[torch.Tensor]) -> List[np.ndarray]:
    """d/dx of sum(max(x[i+1] - x[i], 0)^2) over the concatenation, by hand."""
    x = np.concatenate([lp.detach().numpy() for lp in lps])
    d = np.maximum(x[1:] - x[:-1], 0.0)
    g = np.zeros_like(x)
    g[1:] += 2 * d
    g[:-1] -= 2 * d
    return np.split(g, np.cumsum([lp.numel() for lp in lps])[:-1])


def _numerical_readme_check(ns: Dict[str, Any]) -> None:
    result, lps = ns["result"], ns["lps"]
    for got, want, lp in zip(result.grads, _repeats_gradient(lps), lps):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(lp.grad.numpy(), want, rtol=1e-6, atol=1e-7)  # loss.backward()
    assert result.nfev == 4 * sum(lp.numel() for lp in lps)  # richardson: 4 calls per log-prob


def _client_check(ns: Dict[str, Any]) -> None:
    res = ns["res"]
    telemetry = res.telemetry.to_dict()
    assert np.isfinite(res.loss) and res.loss == pytest.approx(telemetry["loss_total"])
    assert set(telemetry["regularizers"]) == {"l1", "entropy"}
    assert [g.shape[0] for g in res.grads] == [len(d.loss_fn_inputs["target_tokens"]) for d in ns["data"]]


def _clients_loop_check(ns: Dict[str, Any]) -> None:
    lines = ns["printed"].strip().splitlines()
    assert len(lines) == 40
    first, last = (float(line.split(" ", 1)[0]) for line in (lines[0], lines[-1]))
    assert last < first  # training lowers the loss
    assert "verifier" in ns["res"].telemetry.to_dict()["regularizers"]


def _numerical_doc_check(ns: Dict[str, Any]) -> None:
    result, lps = ns["result"], ns["lps"]
    assert result.nfev == 2 * sum(lp.numel() for lp in lps)  # "2 calls per log-prob"
    for got, want, lp in zip(result.grads, _repeats_gradient(lps), lps):
        assert got.dtype == lp.dtype and got.shape == lp.shape
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-2, atol=2e-2)  # float32 central differences


def _wrapper_prelude(ns: Dict[str, Any]) -> None:
    _data_and_logprobs(ns)

    def repeats(data: Any, logprobs_list: List[torch.Tensor]) -> Tuple[float, Dict[str, Any]]:
        x = np.concatenate([lp.detach().numpy() for lp in logprobs_list])
        return float(np.sum(np.maximum(x[1:] - x[:-1], 0.0) ** 2)), {"n": x.size}

    ns["repeats"] = repeats


def _wrapper_check(ns: Dict[str, Any]) -> None:
    for lp, want in zip(ns["logprobs_list"], _repeats_gradient(ns["logprobs_list"])):
        np.testing.assert_allclose(lp.grad.numpy(), want, rtol=1e-6, atol=1e-8)
    assert ns["loss"].dim() == 0


def _check_prelude(ns: Dict[str, Any]) -> None:
    _data_and_logprobs(ns)
    ns["torch_fn"] = lambda data, lps: (sum((lp.exp() * lp).sum() for lp in lps), {})
    ns["fn"] = lambda data, lps: (float(sum(np.sum(lp.detach().numpy() ** 3) for lp in lps)), {})
    ns["my_grad"] = lambda data, lps: [3 * lp.detach() ** 2 for lp in lps]


def _check_check(ns: Dict[str, Any]) -> None:
    result = ns["result"]  # the second call: numerical gradient of sum x^3 against the hand-written 3x^2
    assert result.passed and max(result.max_rel_error) < 1e-6 and result.against.startswith("grad_fn ")
    wrong = regrad.check(ns["fn"], ns["data"], ns["logprobs_list"], grad_fn=lambda d, lps: [2 * lp.detach() for lp in lps])
    assert not wrong.passed  # and a wrong hand-written gradient fails


SIGNATURE = ("docs/numerical.md", "numerical_grad(fn, data, logprobs_list, *, method=\"central\", structure=\"batch\", vectorized=False,")

# name -> (prelude, check); an example listed nowhere fails test_every_example_is_covered
RUN: Dict[Tuple[str, str], Tuple[Callable[[Dict[str, Any]], None], Callable[[Dict[str, Any]], None]]] = {
    ("README.md", "logprobs = [torch.randn(300, requires_grad=True), torch.randn(120, requires_grad=True)]"): (_nothing, _kernels_check),
    ("README.md", "def topology(data, logprobs_list):"): (_data_and_logprobs, _compose_check),
    ("README.md", "def repeats(data, logprobs_list):"): (_nothing, _numerical_readme_check),
    ("README.md", "client = regrad.LocalTrainingClient(seed=0)"): (_nothing, _client_check),
    ("docs/clients.md", "async def my_async_check(data, logprobs_list):"): (_nothing, _clients_loop_check),
    ("docs/numerical.md", "def repeats(data, logprobs_list):"): (_nothing, _numerical_doc_check),
    ("docs/numerical.md", "loss_fn = regrad.numerical(repeats, method=\"central\")"): (_wrapper_prelude, _wrapper_check),
    ("docs/numerical.md", "result = regrad.check(torch_fn, data, logprobs_list, method=\"richardson\")"): (_check_prelude, _check_check),
}
SKIPPED = {
    ("README.md", "res = regrad.kernels.entropy([lp.cuda() for lp in lps])"):
        "needs a CUDA GPU (tests/test_cuda.py covers the GPU kernels)",
    ("docs/compose.md", "def topological_consistency(data, logprobs_list):"): "a sketch: its regularizers' bodies are `...` and it needs a tinker TrainingClient",
    SIGNATURE: "a signature, not code: test_numerical_grad_signature_is_documented compares it with the function",
}


EXAMPLES = _examples()


def test_every_example_is_covered():
    names = [_name(file, code) for file, _, code in EXAMPLES]
    unknown = [f"{file}: {first}" for file, first in names if (file, first) not in RUN and (file, first) not in SKIPPED]
    assert not unknown, f"new or edited docs examples: add them to RUN or SKIPPED: {unknown}"
    assert len(set(names)) == len(names), "two examples share a name"
    assert set(RUN) | set(SKIPPED) <= set(names), f"listed examples that no longer exist: {set(RUN) | set(SKIPPED) - set(names)}"


@pytest.mark.parametrize("file, line, code", [e for e in EXAMPLES if _name(e[0], e[2]) in RUN],
                         ids=lambda v: v if isinstance(v, (str, int)) and not str(v).count("\n") else "")
def test_example_runs_and_does_what_it_says(file, line, code, capsys):
    prelude, check = RUN[_name(file, code)]
    ns: Dict[str, Any] = {"__name__": f"docs_example_{line}"}
    prelude(ns)
    exec(compile(code, f"{file}:{line}", "exec"), ns)  # noqa: S102 - the docs' own examples
    ns["printed"] = capsys.readouterr().out
    check(ns)


def test_numerical_grad_signature_is_documented():
    code = next(code for file, _, code in EXAMPLES if _name(file, code) == SIGNATURE)
    documented = dict(re.findall(r"(\w+)=([^,)\s]+(?: << \d+)?)", code))
    params = inspect.signature(regrad.numerical_grad).parameters
    keyword_only = {name: p.default for name, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert set(documented) == set(keyword_only)
    for name, text in documented.items():
        assert eval(text) == keyword_only[name], name  # noqa: S307 - literals from the docs
    positional = [name for name, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert code.startswith(f"numerical_grad({', '.join(positional)}, *,")
