"""vae_decoder: latent frame (+ previous) -> 4 uint8 RGB frames (helios.vae)."""

import torch
import triton_python_backend_utils as pb_utils

from helios_triton.stage import load_stage
from helios.vae import to_uint8


class TritonPythonModel:
    def initialize(self, args):
        stage = load_stage(args, "vae")
        self.device, self.dtype, self.model = stage.device, stage.dtype, stage.modules["vae"]

    @torch.no_grad()
    def execute(self, requests):
        responses = []
        for request in requests:
            latent = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "latent").as_numpy())
            prev = pb_utils.get_input_tensor_by_name(request, "prev_latent")
            prev = None if prev is None else torch.from_numpy(prev.as_numpy())[None].to(self.device, self.dtype)
            pixels = self.model.decode(latent[None].to(self.device, self.dtype), prev)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("frames", to_uint8(pixels)[0].numpy())]))
        return responses
