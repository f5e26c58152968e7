"""regrad through tinker's real TrainingClient.forward_backward_custom (only the /forward_backward network
calls replaced by a regrad.LocalTrainingClient acting as the server; see _fake_tinker.py): a regression
check of the Tinker integration. The fake builds on tinker's private client internals: if a tinker
release changes them, these tests skip saying so instead of failing on tinker's side."""
import asyncio

import numpy as np
import pytest
import torch

pytest.importorskip("tinker")
try:
    from _fake_tinker import SMALL, FakeTinkerTrainingClient, tinker_data, to_regrad  # noqa: E402
except ImportError as err:  # a private tinker module the fake builds on moved
    pytest.skip(f"tinker's client internals differ from the fake's: {err}", allow_module_level=True)

import regrad  # noqa: E402
from regrad.model import default_model  # noqa: E402


async def _verifier(d, lps):
    await asyncio.sleep(0)
    return sum(lp.exp().mean() for lp in lps), {"checked": 1.0}


def _regs():
    return [regrad.l1(1e-2), regrad.entropy(0.05),
            regrad.RegularizerSpec.sync("square", 0.3, lambda d, lps: (sum((lp ** 2).mean() for lp in lps), {"n": 1})),
            regrad.RegularizerSpec.sync("npy", 0.2, lambda d, lps: float(sum(np.tanh(np.asarray(lp)).sum() for lp in lps)),
                                        grad="numerical"),
            regrad.RegularizerSpec.async_("verifier", 0.5, _verifier, timeout=10.0)]


def _client(**kwargs) -> FakeTinkerTrainingClient:
    try:
        return FakeTinkerTrainingClient(**kwargs)
    except (TypeError, AttributeError) as err:  # tinker's private TrainingClient internals moved
        pytest.skip(f"tinker's TrainingClient internals differ from the fake's: {err}")


@pytest.mark.parametrize("chunk", [1024, 1])
@pytest.mark.parametrize("awaited", [False, True])
def test_real_tinker_client_matches_local_client(chunk: int, awaited: bool) -> None:
    tc = _client(max_chunk_len=chunk)
    data = tinker_data()
    if awaited:
        async def run():
            return await regrad.forward_backward_custom(tc, data, regularizers=_regs())
        res = asyncio.run(run())
    else:
        res = regrad.forward_backward_custom(tc, data, regularizers=_regs()).result()
    assert all(isinstance(k, str) and type(v) is float for k, v in res.output.metrics.items())
    assert res.output.metrics["loss:sum"] == pytest.approx(res.loss, rel=1e-6)
    assert "surrogate_loss:sum" in res.output.metrics and "reg/verifier/custom/checked" in res.output.metrics
    ref = regrad.LocalTrainingClient(default_model(0, SMALL), seed=0)
    local = regrad.forward_backward_custom(ref, [to_regrad(d) for d in data], regularizers=_regs()).result()
    assert res.loss == pytest.approx(local.loss, rel=1e-12)
    for a, b in zip(res.grads, local.grads):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    # tinker sent weights = -grad to the server's cross-entropy; the parameter gradients agree
    for p, q in zip(tc.server.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_regrad_numerical_as_tinker_loss_fn() -> None:
    tc = _client()
    data = tinker_data()
    wrapped = regrad.numerical(lambda d, lps: (float(sum((np.asarray(lp, np.float64) ** 2).sum() for lp in lps)), {"m": 2.0}))
    out = tc.forward_backward_custom(data, wrapped).result()
    assert out.metrics["m"] == 2.0
    sent = [d for fwd_only, batch in tc.requests if not fwd_only for d in batch]
    for datum, g in zip(sent, wrapped.last_result.grads):
        assert np.allclose(np.asarray(datum.loss_fn_inputs["weights"]), -g.numpy())
