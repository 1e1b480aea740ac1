"""helios_video: the whole video of a helios request in one response (for HTTP clients)."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
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
            if error is not None:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(error.message(), error.code())))
            else:
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("FRAMES", np.concatenate(chunks))]))
        return responses
