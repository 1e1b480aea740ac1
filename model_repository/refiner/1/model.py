"""refiner: plan tokens + history -> one latent frame (helios.refiner.Refiner.render)."""

import time

import torch
import triton_python_backend_utils as pb_utils

from helios.errors import HeliosError
from helios_triton.stage import load_stage, refiner_call
from helios_triton.stub import input_array



class TritonPythonModel:
    def initialize(self, args):
        self.stage = load_stage(args, "refiner")
        self.model = self.stage.modules["refiner"]
        st, cfg = self.stage, self.stage.config
        quant = st.params.get("weight_quantization", "none")
        pb_utils.Logger.log_info(f"refiner: block matmuls in "
                                 f"{'fp8' if quant == 'fp8' else str(st.dtype).replace('torch.', '')}")
        if st.device.type == "cuda":  # every context a stream meets compiled and captured now
            t0 = time.perf_counter()
            self.model.warm_up((1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width),
                               st.dtype, st.device)
            pb_utils.Logger.log_info(f"refiner: every history length compiled and captured in "
                                     f"{time.perf_counter() - t0:.1f} s")

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
            latent = self.model.render(call.noise, call.plan, call.anchor, call.history)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("latent", latent[0].float().cpu().numpy())]))
        return responses
