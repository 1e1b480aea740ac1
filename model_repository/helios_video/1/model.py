"""helios_video: the whole video of a helios request in one response (for HTTP clients)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from helios.config import read_config
from helios.errors import HeliosError
from helios_triton.contract import HELIOS_INPUT_NAMES
from helios_triton.sessions import check_session_id
from helios_triton.stub import input_array, model_parameters, process_settings, video_request



class TritonPythonModel:
    def initialize(self, args):
        process_settings()
        params = model_parameters(args)
        self.config = read_config(params["checkpoint"])
        self.speculative = params.get("speculative", "off") == "on"

    def execute(self, requests):
        responses = []
        for request in requests:
            # Checked here too, so that a bad input is INVALID_ARG: an error that comes back
            # through a BLS call reaches this model without its code.
            try:
                video_request(self.config, lambda name: input_array(request, name), self.speculative)
                session_id = input_array(request, "SESSION_ID")
                if session_id is not None:
                    check_session_id(session_id.reshape(-1)[0])
            except HeliosError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    e.renamed(HELIOS_INPUT_NAMES), pb_utils.TritonError.INVALID_ARG)))
                continue
            stream = pb_utils.InferenceRequest(
                model_name="helios", inputs=request.inputs(),
                requested_output_names=["FRAMES"]).exec(decoupled=True)
            chunks, error = [], None
            for response in stream:
                if response.has_error():
                    error = response.error()
                    continue
                frames = pb_utils.get_output_tensor_by_name(response, "FRAMES")
                if frames is not None:
                    chunks.append(frames.as_numpy())
            # The stream's cleanup goes out through the stub's queue before this question
            # does, so the stream's responses are freed here, under the GIL, when it is
            # dropped, not by the stub's message thread (helios_triton.bls._TokenStream).
            request.is_cancelled()
            if error is not None:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(error.message(), error.code())))
            else:
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("FRAMES", np.concatenate(chunks))]))
        return responses
