"""helios: the client-facing, decoupled model. Runs helios.orchestrator.stream_video with the
stage functions implemented as BLS calls; one response per chunk.

Each instance serves one stream at a time, inside ``execute``, on the stub's main thread;
concurrent streams run in separate instances (instance_group count), and requests beyond them
wait in Triton's queue. No threads of our own: with tritonserver 2.51 a Python thread that
runs while a BLS call of another thread receives its response can crash the stub (seen:
SIGSEGV in pb_utils.Tensor() during a concurrent exec(), under perf_analyzer at concurrency 2).
The one concurrency here, ``refine_and_decode``, makes every tensor first and then only waits
while the stub's own executor threads run the two requests (``async_exec``); it ran without a
crash on the H100 (1 and 4 streams, perf_analyzer at concurrency 1 and 4) and in the tests.
"""

import asyncio
import faulthandler
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from helios.checkpoint import read_config
from helios.errors import HeliosError
from helios.orchestrator import stream_video
from helios.schedule import validate_request
from helios_triton.bls import OverlappedStages, TritonStages
from helios_triton.contract import HELIOS_INPUT_NAMES
from helios_triton.stage import (model_parameters, process_settings, prompt_text,
                                 requested_outputs)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _scalar(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy().reshape(-1)[0].item()


class TritonPythonModel:
    def initialize(self, args):
        faulthandler.enable(all_threads=True)  # a crash prints every thread's stack to the log
        process_settings()
        params = model_parameters(args)
        self.config = read_config(params["checkpoint"])
        self.speculative = params.get("speculative", "off") == "on"
        self.slot_bias = params.get("slot_bias", "on") == "on"
        # "on": a latent frame is decoded while the next one renders (OverlappedStages)
        self.loop = asyncio.new_event_loop() if params.get("overlap_decode", "off") == "on" else None
        pb_utils.Logger.log_info(f"helios: a latent frame is decoded "
                                 f"{'while the next one renders' if self.loop else 'after rendering'}")

    def _request(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "PROMPT")
        if tensor is None:
            raise HeliosError("PROMPT", "is required")
        prompt = prompt_text(tensor.as_numpy().reshape(-1)[0])
        num_frames, duration = _scalar(request, "NUM_FRAMES"), _scalar(request, "DURATION_S")
        if num_frames is None and duration is None:
            raise HeliosError("NUM_FRAMES", "or DURATION_S must be given")
        image = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        kwargs = {"num_frames": num_frames, "duration_s": duration, "fps": _scalar(request, "FPS"),
                  "image": None if image is None else image.as_numpy()}
        for key, name in (("seed", "SEED"), ("temperature", "TEMPERATURE"), ("top_k", "TOP_K"),
                          ("top_p", "TOP_P")):
            value = _scalar(request, name)
            if value is not None:
                kwargs[key] = value
        req = validate_request(self.config, prompt, speculative=self.speculative, **kwargs)
        return req

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                req = self._request(request)
            except HeliosError as e:
                error = pb_utils.TritonError(e.renamed(HELIOS_INPUT_NAMES),
                                             pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                continue
            self._serve(request, sender, req)
        return None

    def _serve(self, request, sender, req):
        rid = request.request_id() or uuid.uuid4().hex[:8]
        pb_utils.Logger.log_info(f"helios {rid}: {req.num_frames} frames at {req.fps} fps, "
                                 f"seed {req.sampling.seed}")
        stages = (OverlappedStages(self.config, self.speculative, self.slot_bias, self.loop)
                  if self.loop else TritonStages(self.config, self.speculative, self.slot_bias))
        sent, final = 0, False
        wanted = request.requested_output_names()

        def cancelled():
            # Never ask after the final response: its response factory is gone by then, and
            # tritonserver 2.51 crashes on the question (seen: SIGSEGV in ...IsCancelled).
            return not final and sender.is_cancelled()

        try:
            last = False
            for chunk in stream_video(self.config, req, stages, cancelled=cancelled):
                last = chunk.final
                out = requested_outputs(wanted, {"FRAMES": chunk.frames,
                                                  "FRAME_OFFSET": np.array([chunk.offset], np.int32),
                                                  "FINAL": np.array([chunk.final])})
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))
                sent += len(chunk.frames)
                if sent % (4 * req.fps) < len(chunk.frames) or chunk.final:
                    pb_utils.Logger.log_info(f"helios {rid}: {sent}/{req.num_frames} frames")
            if not last:
                pb_utils.Logger.log_info(f"helios {rid}: cancelled after {sent} frames")
            # The final flag goes out alone, once the schedule has ended: the last chunk (FINAL
            # true) leaves while the ar_backbone BLS stream still owes its own final response,
            # and a BLS stream that outlives its parent request's final response crashes the
            # stub (tritonserver 2.51, Python 3.12: SIGSEGV, seen on the GPU machine).
            final = True
            sender.send(flags=FINAL)
        except Exception as e:  # one failed stream must not take the others down
            pb_utils.Logger.log_error(f"helios {rid}: {e}")
            try:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
            except Exception:
                pass
