"""video_encoder: the end of a clip -> its latent frames + their plan tokens (video-to-video)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from helios.errors import HeliosError
from helios.pipeline import encode_video
from helios.schedule import check_video
from helios_triton.contract import HELIOS_INPUT_NAMES
from helios_triton.stage import load_stage


class TritonPythonModel:
    def initialize(self, args):
        stage = load_stage(args, "vae", "refiner")
        self.config, self.vae, self.refiner = stage.config, stage.modules["vae"], stage.modules["refiner"]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                video = check_video(pb_utils.get_input_tensor_by_name(request, "frames").as_numpy(),
                                    self.config.frames_per_latent)
            except HeliosError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    e.renamed(HELIOS_INPUT_NAMES), pb_utils.TritonError.INVALID_ARG)))
                continue
            latents, plans = encode_video(self.config, self.vae, self.refiner, video)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("latent", latents.float().cpu().numpy()),
                pb_utils.Tensor("plan_tokens", np.array(plans, np.int32))]))
        return responses
