"""A real tinker.TrainingClient whose only replaced part is the network: `_run_fwd_bwd` (the
/forward_backward requests) is answered by a regrad.LocalTrainingClient acting as the server.
Everything else (forward_backward_custom, _compute_custom_loss, _run_custom_backward, the custom-loss
event loop, chunking) is tinker's own code, and the replacement keeps what the real one does before
the network: each chunk waits for its turn (`_take_turn`, which also refuses every request once a
custom loss failed) and is serialized with tinker's own proto encoder (which refuses what tinker
cannot send, e.g. regrad's ModelInput)."""
import asyncio
import threading

import numpy as np
import torch
import tinker
from tinker import types
from tinker.lib.public_interfaces.training_client import TrainingClient
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture
from tinker.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results
from tinker.proto.request_conv import forward_backward_request_to_proto
import regrad
from regrad.model import ByteLMConfig, default_model

SMALL = ByteLMConfig(d_model=32, n_layers=1, n_heads=2, context=32)


class FakeHolder:
    def __init__(self, max_chunk_len=1024):
        self._client_config = types.ClientConfigResponse(fwdbwd_max_chunk_len=max_chunk_len) \
            if hasattr(types, "ClientConfigResponse") else None
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="fake-holder").start()

    def run_coroutine_threadsafe(self, coro):
        return AwaitableConcurrentFuture(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def get_session_id(self):
        return "fake-session"

    def get_telemetry(self):
        return None


def to_regrad(d):
    tt = np.asarray(d.loss_fn_inputs["target_tokens"].to_numpy())
    w = d.loss_fn_inputs.get("weights")
    inputs = {"target_tokens": tt}
    if w is not None:
        inputs["weights"] = np.asarray(w.to_numpy(), dtype=np.float64)
    return regrad.Datum(regrad.ModelInput.from_ints(d.model_input.to_ints()), inputs)


class FakeTinkerTrainingClient(TrainingClient):
    def __init__(self, server=None, max_chunk_len=1024, dtype=torch.float32):
        holder = FakeHolder(max_chunk_len)
        self.server = server or regrad.LocalTrainingClient(default_model(0, SMALL).to(dtype), seed=0)
        self.requests = []
        TrainingClient.__init__(self, holder, 0, "fake-model", info=None)

    def get_telemetry(self):
        return None

    # ---- the only replaced part: what the server does with /forward_backward
    def _run_fwd_bwd(self, requests, loss_fn, loss_fn_config, *, forward_only):
        assert loss_fn == "cross_entropy" and loss_fn_config is None
        async def run():
            outs = []
            for req in requests:
                async with self._take_turn(req.request_id):  # tinker's order; refused once poisoned
                    forward_backward_request_to_proto(types.ForwardBackwardRequest(  # what tinker sends
                        types.ForwardBackwardInput(req.data, loss_fn, loss_fn_config), self.model_id, req.request_id + 1))
                data = [to_regrad(d) for d in req.data]
                self.requests.append((forward_only, data))
                fut = self.server.forward(data) if forward_only else self.server.forward_backward(data)
                out = await asyncio.wrap_future(fut.future())
                outs.append(types.ForwardBackwardOutput(
                    loss_fn_output_type="ArrayRecord",
                    loss_fn_outputs=[{"logprobs": types.TensorData.from_torch(o["logprobs"].float())}
                                     for o in out.loss_fn_outputs],
                    metrics={"loss:sum": float(out.metrics["loss:sum"])}))
            return combine_fwd_bwd_output_results(outs)
        return self.holder.run_coroutine_threadsafe(run())


def tinker_data(texts=("the cat sat on the mat", "a tiny model learns bytes", "gradients flow back")):
    out = []
    for d in regrad.data_from_texts(list(texts)):
        out.append(types.Datum(model_input=types.ModelInput.from_ints(d.model_input.to_ints()),
                               loss_fn_inputs={k: np.asarray(d.loss_fn_inputs[k]) for k in ("target_tokens", "weights")}))
    return out
