"""refiner (TensorRT flavour): context K/V in PyTorch, then the refiner_step engine per step.
Same inputs, checks and noise as the torch flavour (helios_triton.stage.refiner_call)."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from helios.errors import HeliosError
from helios.refiner import euler_sample
from helios_triton.stage import load_stage, refiner_call
from helios_triton.stub import input_array



class TritonPythonModel:
    def initialize(self, args):
        self.stage = load_stage(args, "refiner")
        self.refiner = self.stage.modules["refiner"]

    def _step(self, x, sigma, context_k, context_v):
        out = pb_utils.InferenceRequest(
            model_name="refiner_step", requested_output_names=["velocity"],
            inputs=[pb_utils.Tensor("latent", x), pb_utils.Tensor("sigma", np.array([sigma], np.float32)),
                    pb_utils.Tensor("context_k", context_k),
                    pb_utils.Tensor("context_v", context_v)]).exec()
        if out.has_error():
            raise RuntimeError(out.error().message())
        return pb_utils.get_output_tensor_by_name(out, "velocity").as_numpy()

    @torch.no_grad()
    def execute(self, requests):
        st = self.stage
        responses = []
        for request in requests:
            try:
                call = refiner_call(st.config, lambda name: input_array(request, name), st.device,
                                    st.dtype)
            except HeliosError as e:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
                continue
            kv = self.refiner.encode_context(call.plan, call.anchor, call.history)
            context_k = torch.stack([k for k, _ in kv]).float().cpu().numpy()
            context_v = torch.stack([v for _, v in kv]).float().cpu().numpy()
            noise = call.noise.float().cpu().numpy()
            try:
                x = euler_sample(lambda x, i, sigma: self._step(x, sigma, context_k, context_v),
                                 noise, self.refiner.sigmas()).astype(np.float32)
            except RuntimeError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"refiner_step: {e}")))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("latent", x[0])]))
        return responses
