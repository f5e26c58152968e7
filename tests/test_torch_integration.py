"""regrad beside torch features a training loop combines it with: tensor hooks on the log-probs,
torch.autocast, torch.utils.checkpoint (from an audit; each test failed before its fix)."""

import pytest

torch = pytest.importorskip("torch")
from torch.utils.checkpoint import checkpoint  # noqa: E402

import regrad  # noqa: E402


def _cube(d, lps):
    return sum((lp ** 3).sum() for lp in lps)


def _square(d, lps):
    return sum((lp ** 2).sum() for lp in lps)


@pytest.mark.parametrize("parallel", [False, True])
def test_compose_runs_hooks_on_the_callers_log_probs_once(parallel: bool) -> None:
    """The autograd route differentiated fn w.r.t. the caller's own leaf tensors, so their register_hook
    hooks ran inside compose too and a hook that scales (or clips) the gradient was applied twice."""
    loss = regrad.compose(None, [regrad.RegularizerSpec.sync("cube", 1.0, _cube),
                                 regrad.RegularizerSpec.sync("square", 1.0, _square)], parallel=parallel)
    x0 = [torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64), torch.tensor([-0.25, -3.0], dtype=torch.float64)]
    xs = [x.clone().requires_grad_(True) for x in x0]
    seen = []
    for x in xs:
        x.register_hook(lambda g: (seen.append(g.clone()), g * 0.5)[1])
    loss([None, None], xs)[0].backward()
    for x, x_ in zip(xs, x0):
        torch.testing.assert_close(x.grad, 0.5 * (3 * x_ ** 2 + 2 * x_))
    assert len(seen) == 2  # once per tensor, in the caller's backward
    for g, x_ in zip(seen, x0):
        torch.testing.assert_close(g, 3 * x_ ** 2 + 2 * x_)
    loss.close()


_W = torch.linspace(-1.0, 1.0, 64).reshape(8, 8)


def _matmul_loss(data, lps):
    """torch code regrad.numerical differentiates numerically; its matmul runs in bfloat16 under autocast."""
    x = torch.cat([lp.reshape(-1) for lp in lps])
    return float((_W @ x).square().sum()) * 0.01


@pytest.mark.parametrize("options", [{"method": "forward"}, {"method": "spsa", "antithetic": False, "num_samples": 64}])
def test_numerical_does_not_reuse_an_autocast_loss_as_backwards_f0(options: dict) -> None:
    """Forward's loss was backward's f0 for one-sided differences even when fn ran under torch.autocast and
    backward (outside the block) evaluated fn in float32: the bfloat16 rounding of f0 over a small step came
    out in the gradient (forward differences: 10x off, without a warning). Now backward evaluates f0 itself:
    the same gradient as a forward pass without autocast."""
    x0 = [torch.linspace(-2.0, -0.1, 4), torch.linspace(-1.5, -0.2, 4)]
    ys = [x.clone().requires_grad_(True) for x in x0]
    ((_W @ torch.cat(ys)).square().sum() * 0.01).backward()  # the float32 reference
    grads = []
    for autocast in (False, True):
        xs = [x.clone().requires_grad_(True) for x in x0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = regrad.numerical(_matmul_loss, **options)([None, None], xs)
        loss.backward()
        grads.append([x.grad for x in xs])
    for plain, autocast in zip(*grads):
        assert torch.equal(plain, autocast)
    if options["method"] == "forward":
        scale = max(float(y.grad.abs().max()) for y in ys)
        for g, y in zip(grads[1], ys):
            assert float((g - y.grad).abs().max()) < 0.01 * scale


@pytest.mark.parametrize("parallel", [False, True])
def test_compose_inside_a_non_reentrant_checkpoint(parallel: bool) -> None:
    """A term differentiated by autograd in the calling thread (parallel=False, or a single such term) met
    checkpoint's saved-tensor hooks; checkpoint's control-flow signal raised in it came out as
    "RegularizerError: regularizer 'cube' failed: _StopRecomputationError"."""
    events = []
    loss = regrad.compose(regrad.losses.cross_entropy, [regrad.RegularizerSpec.sync("cube", 1.0, _cube),
                                                        regrad.RegularizerSpec.sync("square", 1.0, _square),
                                                        regrad.l2(0.5)], parallel=parallel, on_event=events.append)
    lin = torch.nn.Linear(4, 3).double()
    torch.manual_seed(0)
    inputs = torch.randn(2, 5, 4, dtype=torch.float64)
    data = [regrad.Datum(model_input=regrad.ModelInput.from_ints([1] * 5),
                         loss_fn_inputs={"target_tokens": [0] * 5, "weights": [1.0] * 5}) for _ in range(2)]

    def log_probs():
        lp = torch.log_softmax(lin(inputs), -1)
        return [lp[0, :, 0], lp[1, :, 0]]

    lps = log_probs()
    want = -sum(lp.sum() for lp in lps) / 10 + _cube(None, lps) + _square(None, lps) + 0.5 * _square(None, lps) / 2
    expected = torch.autograd.grad(want, list(lin.parameters()))
    value = checkpoint(lambda: loss(data, log_probs())[0], use_reentrant=False)
    got = torch.autograd.grad(value, list(lin.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    loss.close()
    # checkpoint's signal is control flow, not a failure: no "exception" events (with parallel=False each
    # checkpointed call emitted two, which log_events logs as WARNING lines)
    assert events and [e for e in events if e.phase == "exception"] == []


def test_compose_terms_on_its_pool_run_under_the_callers_autocast() -> None:
    """autocast is per thread: a term on compose's pool (two or more non-analytic terms, parallel=True) ran
    in float32 while the same term run in the calling thread (parallel=False) ran its matmuls in bfloat16,
    so value and gradient depended on `parallel`."""
    seen = {}

    def term(name):
        def fn(data, lps):
            y = _W @ torch.cat(lps)
            seen[name] = y.dtype
            return y.square().sum() * 0.01
        return fn

    x0 = [torch.linspace(-2.0, -0.1, 4), torch.linspace(-1.5, -0.2, 4)]
    results = []
    for parallel in (False, True):
        loss = regrad.compose(None, [regrad.RegularizerSpec.sync("a", 1.0, term("a")),
                                     regrad.RegularizerSpec.sync("b", 1.0, term("b"))], parallel=parallel)
        xs = [x.clone().requires_grad_(True) for x in x0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss([None, None], xs)[0]
        value.backward()
        assert seen == {"a": torch.bfloat16, "b": torch.bfloat16}, (parallel, seen)
        results.append((float(value.detach()), [x.grad for x in xs]))
        seen.clear()
        loss.close()
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)
    # outside autocast the pool computes in float32 as before
    loss = regrad.compose(None, [regrad.RegularizerSpec.sync("a", 1.0, term("a")),
                                 regrad.RegularizerSpec.sync("b", 1.0, term("b"))])
    loss([None, None], [x.clone().requires_grad_(True) for x in x0])
    assert seen == {"a": torch.float32, "b": torch.float32}
    assert not torch.is_autocast_enabled("cpu")
    loss.close()


class _LogProbs(torch.Tensor):
    """A user's own tensor subclass (defined outside the torch package)."""


@pytest.mark.parametrize("route", ["numerical", "kernel", "compose"])
def test_tensor_subclasses_defined_outside_torch_are_torch_tensors(route: str) -> None:
    """regrad told torch tensors apart by their class's module name: a subclass defined in user code was
    "logprobs_list[0] is a _LogProbs; expected a numpy array or a torch tensor" (kernels, compose), and
    regrad.numerical handed back fn's float with no autograd ('float' object has no attribute 'backward')."""
    x0 = [torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64), torch.tensor([-0.25, -3.0], dtype=torch.float64)]
    numerical = regrad.numerical(lambda d, lps: float(sum((lp.numpy() ** 3).sum() for lp in lps)))
    composed = regrad.compose(None, [regrad.RegularizerSpec.sync("cube", 1.0, _cube), regrad.l2(0.5)])
    loss, want = {
        "numerical": (lambda lps: numerical([None, None], lps), lambda x: 3 * x ** 2),
        "kernel": (lambda lps: regrad.kernels.l2(lps, reduction="sum").value, lambda x: 2 * x),
        "compose": (lambda lps: composed([None, None], lps)[0], lambda x: 3 * x ** 2 + 0.5 * x),
    }[route]
    leaves = [x.clone().requires_grad_(True) for x in x0]
    value = loss([(x * 1.0).as_subclass(_LogProbs) for x in leaves])
    assert isinstance(value, torch.Tensor)
    value.backward()
    for leaf, x in zip(leaves, x0):
        torch.testing.assert_close(leaf.grad, want(x), rtol=1e-6, atol=1e-8)
    composed.close()


@pytest.mark.parametrize("method", ["forward_backward", "forward_backward_custom"])
def test_local_client_requests_made_under_inference_mode(method: str) -> None:
    """The request's tensors (ids, targets, weights) were made in the calling thread, so under the caller's
    torch.inference_mode() they were inference tensors and the worker's backward failed ("Inference tensors
    cannot be saved for backward"); under torch.no_grad() the same request worked. Now both give the
    gradient of a request made outside."""
    data = regrad.data_from_texts(["the cat sat on the mat", "gradients flow back"])
    grads = []
    for mode in (None, torch.inference_mode):
        client = regrad.LocalTrainingClient(seed=0)
        with mode() if mode is not None else torch.enable_grad():
            if method == "forward_backward":
                future = client.forward_backward(data)
            else:
                future = regrad.forward_backward_custom(client, data, regularizers=[regrad.l1(0.1)])
        future.result()
        grads.append([p.grad.clone() for p in client.model.parameters()])
        client.close()
    for a, b in zip(*grads):
        assert torch.equal(a, b)
