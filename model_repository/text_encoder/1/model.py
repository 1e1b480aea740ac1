"""text_encoder: token ids -> prefix embeddings (helios.text_encoder.TextEncoder)."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from helios_triton.stage import load_stage


class TritonPythonModel:
    def initialize(self, args):
        stage = load_stage(args, "text_encoder")
        self.device, self.model = stage.device, stage.modules["text_encoder"]

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
