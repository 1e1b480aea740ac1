"""text_encoder: token ids -> prefix embeddings (helios.text_encoder.TextEncoder)."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from helios.checkpoint import load_component
from helios.serving import model_device, model_dtype, model_parameters


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.device = model_device(args, params)
        self.model = load_component(params["checkpoint"], "text_encoder", device=self.device,
                                    dtype=model_dtype(self.device, params))

    @torch.no_grad()
    def execute(self, requests):
        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "input_lengths").as_numpy()
            ar, draft = self.model(torch.from_numpy(ids.astype(np.int64)).to(self.device),
                                   torch.from_numpy(lengths.astype(np.int64)).to(self.device))
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("prompt_embedding_table", ar.float().cpu().numpy()),
                pb_utils.Tensor("draft_prompt_embedding_table", draft.float().cpu().numpy())]))
        return responses
