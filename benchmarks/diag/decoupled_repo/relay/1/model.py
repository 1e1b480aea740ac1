"""Decoupled: a BLS stream (exec(decoupled=True)) to the model named in TARGET, each response
passed on as it arrives, as the helios model reads ar_backbone."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, "N").as_numpy()
            target = pb_utils.get_input_tensor_by_name(request, "TARGET").as_numpy()[0].decode()
            sender = request.get_response_sender()
            responses = pb_utils.InferenceRequest(
                model_name=target, inputs=[pb_utils.Tensor("N", n)],
                requested_output_names=["I"]).exec(decoupled=True)
            for r in responses:
                out = pb_utils.get_output_tensor_by_name(r, "I")
                if out is not None:
                    sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("I", out.as_numpy())]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
