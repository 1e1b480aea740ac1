"""helios_update: a new prompt for a running stream, handed over through its mailbox
(helios_triton.sessions) and answered with the frame it holds from; or a player's report of
the frame it shows (SHOWN_FRAME), left there for the stream's pacer and answered with that
frame."""

import numpy as np
import triton_python_backend_utils as pb_utils

from helios.config import read_config
from helios.errors import HeliosError
from helios.tokenizer import tokenize
from helios_triton.contract import UPDATE_INPUT_NAMES
from helios_triton.sessions import check_session_id, send_shown, send_update
from helios_triton.stub import input_array, model_parameters, process_settings, prompt_text


class TritonPythonModel:
    def initialize(self, args):
        self.sessions_dir = process_settings().sessions_dir
        self.config = read_config(model_parameters(args)["checkpoint"])

    def _update(self, request) -> int:
        session_id = input_array(request, "SESSION_ID")
        if session_id is None:
            raise HeliosError("SESSION_ID", "is required")
        session_id = check_session_id(session_id.reshape(-1)[0])
        prompt, shown = input_array(request, "PROMPT"), input_array(request, "SHOWN_FRAME")
        if prompt is None and shown is None:
            raise HeliosError("PROMPT", "is required (or SHOWN_FRAME alone: the frame a player "
                                        "shows)")
        if prompt is not None:
            prompt = prompt_text(prompt.reshape(-1)[0])
            # checked here, before the stream is asked
            tokenize(prompt, self.config.text_encoder.max_prompt_bytes)
        if shown is not None:
            frame = send_shown(self.sessions_dir, session_id, int(shown.reshape(-1)[0]))
            if prompt is None:
                return frame
        at = input_array(request, "AT_FRAME")
        at = None if at is None else int(at.reshape(-1)[0])
        return send_update(self.sessions_dir, session_id, prompt, at)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                frame = self._update(request)
            except HeliosError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    e.renamed(UPDATE_INPUT_NAMES), pb_utils.TritonError.INVALID_ARG)))
                continue
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("AT_FRAME", np.array([frame], np.int32))]))
        return responses
