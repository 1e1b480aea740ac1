"""refiner (TensorRT flavour): context K/V in PyTorch, then the refiner_step engine per step."""

import numpy as np
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
        self.refiner = load_component(params["checkpoint"], "refiner", self.config, self.device,
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
            anchor, history = self._tensor(request, "anchor"), self._tensor(request, "history")
            kv = self.refiner.encode_context(
                torch.from_numpy(plan.astype(np.int64)).to(self.device)[None],
                anchor=None if anchor is None else anchor[None],
                history=[] if history is None else [h[None] for h in history])
            context_k = torch.stack([k for k, _ in kv]).float().cpu().numpy()
            context_v = torch.stack([v for _, v in kv]).float().cpu().numpy()
            x = frame_noise(seed, index, shape).numpy()
            sig = self.refiner.sigmas()
            try:
                for s, s_next in zip(sig[:-1], sig[1:]):
                    out = pb_utils.InferenceRequest(
                        model_name="refiner_step", requested_output_names=["velocity"],
                        inputs=[pb_utils.Tensor("latent", x),
                                pb_utils.Tensor("sigma", np.array([s], np.float32)),
                                pb_utils.Tensor("context_k", context_k),
                                pb_utils.Tensor("context_v", context_v)]).exec()
                    if out.has_error():
                        raise RuntimeError(out.error().message())
                    v = pb_utils.get_output_tensor_by_name(out, "velocity").as_numpy()
                    x = (x + (s_next - s) * v).astype(np.float32)
            except RuntimeError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"refiner_step: {e}")))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("latent", x[0])]))
        return responses
