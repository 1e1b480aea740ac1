"""refiner: plan tokens + history -> one latent frame (helios.refiner.Refiner.render)."""

import torch
import triton_python_backend_utils as pb_utils

from helios.checkpoint import load_component, read_config
from helios.schedule import frame_noise
from helios.serving import model_device, model_dtype, model_parameters


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.device = model_device(args, params)
        self.dtype = model_dtype(self.device, params)
        self.config = read_config(params["checkpoint"])
        self.model = load_component(params["checkpoint"], "refiner", self.config, self.device,
                                    self.dtype)

    def _tensor(self, request, name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else torch.from_numpy(t.as_numpy()).to(self.device, self.dtype)

    @torch.no_grad()
    def execute(self, requests):
        cfg = self.config
        shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
        responses = []
        for request in requests:
            plan = pb_utils.get_input_tensor_by_name(request, "plan_tokens").as_numpy()
            seed = int(pb_utils.get_input_tensor_by_name(request, "seed").as_numpy().reshape(-1)[0])
            index = int(pb_utils.get_input_tensor_by_name(request, "frame_index").as_numpy().reshape(-1)[0])
            if plan.min() < 0 or plan.max() >= cfg.refiner.codebook_size:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"plan_tokens must be in [0, {cfg.refiner.codebook_size - 1}]",
                    pb_utils.TritonError.INVALID_ARG)))
                continue
            anchor = self._tensor(request, "anchor")
            history = self._tensor(request, "history")
            latent = self.model.render(
                frame_noise(seed, index, shape).to(self.device, self.dtype),
                torch.from_numpy(plan.astype("int64")).to(self.device)[None],
                anchor=None if anchor is None else anchor[None],
                history=[] if history is None else [h[None] for h in history])
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("latent", latent[0].float().cpu().numpy())]))
        return responses
