"""image_encoder: RGB image -> first latent frame + its plan tokens (image-to-video)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from helios.errors import HeliosError
from helios.pipeline import encode_image
from helios.schedule import check_image
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
                image = check_image(pb_utils.get_input_tensor_by_name(request, "image").as_numpy())
            except HeliosError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    e.renamed(HELIOS_INPUT_NAMES), pb_utils.TritonError.INVALID_ARG)))
                continue
            latent, plan = encode_image(self.config, self.vae, self.refiner, image)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("latent", latent[0].float().cpu().numpy()),
                pb_utils.Tensor("plan_tokens", np.array(plan, np.int32))]))
        return responses
