"""tokenizer: PROMPT bytes -> byte-level token ids (helios.tokenizer.tokenize)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from helios.config import read_config
from helios.errors import HeliosError
from helios.tokenizer import tokenize
from helios_triton.contract import HELIOS_INPUT_NAMES
from helios_triton.stub import model_parameters, process_settings, prompt_text


class TritonPythonModel:
    def initialize(self, args):
        process_settings()
        self.max_bytes = read_config(model_parameters(args)["checkpoint"]).text_encoder.max_prompt_bytes

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)[0]
            try:
                ids = tokenize(prompt_text(raw), self.max_bytes)
            except HeliosError as e:
                message = e.renamed(HELIOS_INPUT_NAMES)
            else:
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("input_ids", np.array([ids], np.int32)),
                    pb_utils.Tensor("input_lengths", np.array([len(ids)], np.int32))]))
                continue
            responses.append(pb_utils.InferenceResponse(
                error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)))
        return responses
