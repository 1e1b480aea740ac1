"""helios: the client-facing, decoupled model. Runs helios.orchestrator.stream_video with the
stage functions implemented as BLS calls, or, with the ``stages`` parameter "fused", by the
in-process pipeline; one response per chunk, the first chunk's first frame in one of its own
(``stub.response_parts``).

With the stage models, each instance serves one stream at a time, inside ``execute``, on the
stub's main thread; concurrent streams run in separate instances (instance_group count), and
requests beyond them wait in Triton's queue. With the fused stages, one instance serves up to
``max_streams`` streams, each on one of as many long-lived threads; ``execute`` waits for a
free slot, so requests beyond them wait in Triton's queue there too (no BLS call runs in that
mode, so the hazard below does not apply). With the stage models, no threads of our own:
with tritonserver 2.51 a Python thread that runs while a BLS call of another thread
receives its response can crash the stub (seen:
SIGSEGV in pb_utils.Tensor() during a concurrent exec(), under perf_analyzer at concurrency 2).
The one concurrency here, ``refine_and_decode``, makes every tensor first and then only waits
while the stub's own executor threads run the two requests (``async_exec``); it ran without a
crash on the H100 (1 and 4 streams, perf_analyzer at concurrency 1 and 4) and in the tests.
"""

import asyncio
import queue
import threading
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from helios.config import read_config
from helios.errors import HeliosError
from helios.orchestrator import stream_video
from helios_triton.bls import OverlappedStages, TritonStages
from helios_triton.calls import CallWatch
from helios_triton.contract import HELIOS_INPUT_NAMES
from helios_triton.sessions import Mailbox, MailboxSwitches
from helios_triton.stub import (input_array, model_parameters, process_settings, requested_outputs,
                                response_parts, video_request)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL



class TritonPythonModel:
    def initialize(self, args):
        settings = process_settings()
        self.drain_file, self.sessions_dir = settings.drain_file, settings.sessions_dir
        self.watch = CallWatch(settings.calls_dir)
        params = model_parameters(args)
        self.config = read_config(params["checkpoint"])
        self.speculative = params.get("speculative", "off") == "on"
        self.slot_bias = params.get("slot_bias", "on") == "on"
        # "fused": the stages in this process (stage.load_pipeline), else BLS calls to the
        # stage models
        self.pipeline, self.loop, self.slots = None, None, None
        if params.get("stages", "models") == "fused":
            # torch only here: over the stage models this process has none (3 s of CPU less
            # at each instance's start; tests/test_repository.py)
            from helios_triton.stage import gpu_memory, load_pipeline, stream_threads

            t0 = time.perf_counter()
            self.pipeline = load_pipeline(args, params, settings, pb_utils.Logger.log_info)
            self.threads = stream_threads(self.pipeline, pb_utils.Logger.log_info,
                                          self.speculative)
            self.slots = threading.BoundedSemaphore(self.pipeline.max_streams)
            pb_utils.Logger.log_info(f"helios: every stage in this process on "
                                     f"{self.pipeline.device}, up to {self.pipeline.max_streams} "
                                     f"streams at once, loaded and warmed up in "
                                     f"{time.perf_counter() - t0:.1f} s{gpu_memory(self.pipeline.device)}")
        else:
            # "on": a latent frame is decoded while the next one renders (OverlappedStages)
            if params.get("overlap_decode", "off") == "on":
                self.loop = asyncio.new_event_loop()
            pb_utils.Logger.log_info(f"helios: a latent frame is decoded "
                                     f"{'while the next one renders' if self.loop else 'after rendering'}")
        # Streams in flight, per instance: the supervisor's drain waits for their sum to be 0.
        self.m_family = pb_utils.MetricFamily(  # kept: its metrics go with it
            name="helios_active_streams", kind=pb_utils.MetricFamily.GAUGE,
            description="Streams the helios model is generating")
        self.m_active = self.m_family.Metric(labels={"model": "helios",
                                                     "instance": args["model_instance_name"]})
        self.m_active.set(0)
        self.active, self.active_lock = 0, threading.Lock()
        # How every request ended. tritonserver 2.51 counts a decoupled request as a success
        # whenever execute returns, whatever its responses said: these counters do not.
        self.m_outcome_family = pb_utils.MetricFamily(
            name="helios_streams", kind=pb_utils.MetricFamily.COUNTER,
            description="Requests of the helios model by how they ended")
        self.m_outcome = {outcome: self.m_outcome_family.Metric(labels={
            "model": "helios", "instance": args["model_instance_name"], "outcome": outcome})
            for outcome in ("completed", "cancelled", "failed", "invalid", "refused")}

    def _request(self, request):
        return video_request(self.config, lambda name: input_array(request, name), self.speculative)

    def _refused_while_draining(self, sender) -> bool:
        if self.drain_file is None or not self.drain_file.exists():
            return False
        error = pb_utils.TritonError("the server is draining: it takes no new streams "
                                     "(retry on another replica)", pb_utils.TritonError.UNAVAILABLE)
        sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
        self.m_outcome["refused"].increment(1)
        return True

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            if self._refused_while_draining(sender):
                continue
            switches = None
            try:
                req = self._request(request)
                session_id = input_array(request, "SESSION_ID")
                if session_id is not None:  # prompt updates through helios_update
                    switches = MailboxSwitches(self.config, req.num_frames)
                    switches.mailbox = Mailbox(self.sessions_dir, session_id.reshape(-1)[0],
                                               switches)
            except HeliosError as e:
                error = pb_utils.TritonError(e.renamed(HELIOS_INPUT_NAMES),
                                             pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                self.m_outcome["invalid"].increment(1)
                continue
            if self.slots is None:
                self._counted(request, sender, req, switches)
                continue
            self.slots.acquire()  # the stream waits here for a free slot, later ones in Triton
            if self._refused_while_draining(sender):
                self.slots.release()
                if switches is not None:
                    switches.mailbox.close()
                continue
            self.threads.submit(self._counted, request, sender, req, switches)
        return None

    def _counted(self, request, sender, req, switches) -> None:
        """``_serve``, counted in the metrics; frees the stream's slot (fused) at the end."""
        with self.active_lock:
            self.active += 1
            self.m_active.set(self.active)
        try:
            outcome = self._serve(request, sender, req, switches)
        finally:
            with self.active_lock:
                self.active -= 1
                self.m_active.set(self.active)
            if switches is not None:
                switches.mailbox.close()
            if self.slots is not None:
                self.slots.release()
        self.m_outcome[outcome].increment(1)

    def finalize(self):
        if self.pipeline is not None:
            self.threads.shutdown(wait=False)
            self.pipeline.close()
        # Custom metrics go here, each Metric before its MetricFamily: left to the
        # interpreter's teardown, they were released after the stub's connection to tritonserver
        # was gone, and the stub crashed on its way out (SIGSEGV at every unload).
        self.m_active = self.m_outcome = None
        self.m_family = self.m_outcome_family = None

    def _serve(self, request, sender, req, switches) -> str:
        """Stream one request's chunks; returns how it ended: completed, cancelled or failed."""
        rid = request.request_id() or uuid.uuid4().hex[:8]
        pb_utils.Logger.log_info(f"helios {rid}: {req.num_frames} frames at {req.fps} fps, "
                                 f"seed {req.sampling.seed}")
        sent, final, timed = 0, False, 0  # timed: the switches whose first frame went out
        wanted = request.requested_output_names()
        outbox = _Outbox(sender, threaded=self.pipeline is not None)

        def cancelled():
            # Never ask after the final response: its response factory is gone by then, and
            # tritonserver 2.51 crashes on the question (seen: SIGSEGV in ...IsCancelled).
            return not final and sender.is_cancelled()

        # cancelled() is also what the BLS streams wait on before they let go of their
        # responses (bls._TokenStream): it goes through the stub's queue of messages.
        if self.pipeline is not None:
            stages = self.pipeline
        elif self.loop is not None:
            stages = OverlappedStages(self.config, self.speculative, self.slot_bias, self.loop,
                                      self.watch, settle=cancelled)
        else:
            stages = TritonStages(self.config, self.speculative, self.slot_bias, self.watch,
                                  settle=cancelled)

        try:
            last, t0 = False, time.perf_counter()
            for chunk in stream_video(self.config, req, stages, cancelled=cancelled,
                                      switches=switches):
                if sent == 0:
                    pb_utils.Logger.log_info(f"helios {rid}: first chunk ready after "
                                             f"{(time.perf_counter() - t0) * 1e3:.0f} ms")
                # The stamp a switch's time runs to: taken before the chunk is handed over, so
                # that the split never counts time the client already spends with the frame.
                last, handed = chunk.final, time.time()
                for frames, offset, final_part in response_parts(chunk, first=sent == 0):
                    out = requested_outputs(wanted, {"FRAMES": frames,
                                                      "FRAME_OFFSET": np.array([offset], np.int32),
                                                      "FINAL": np.array([final_part])})
                    outbox.send(pb_utils.InferenceResponse(
                        [pb_utils.Tensor(k, v) for k, v in out.items()]))
                sent += len(chunk.frames)
                for switch in [] if switches is None else switches.applied[timed:]:
                    if switch.frame >= sent:
                        break
                    timed += 1
                    pb_utils.Logger.log_info(f"helios {rid}: prompt switched at frame "
                                             f"{switch.frame}: {switch.timing(handed)}")
                if sent % (4 * req.fps) < len(chunk.frames) or chunk.final:
                    pb_utils.Logger.log_info(f"helios {rid}: {sent}/{req.num_frames} frames")
            if not last:
                pb_utils.Logger.log_info(f"helios {rid}: cancelled after {sent} frames")
            # The final flag goes out alone, once the schedule has ended: the last chunk (FINAL
            # true) leaves while the ar_backbone BLS stream still owes its own final response,
            # and a BLS stream that outlives its parent request's final response crashes the
            # stub (tritonserver 2.51, Python 3.12: SIGSEGV, seen on the GPU machine).
            outbox.flush()
            final = True
            sender.send(flags=FINAL)
            return "completed" if last else "cancelled"
        except Exception as e:  # one failed stream must not take the others down
            pb_utils.Logger.log_error(f"helios {rid}: {e}")
            try:
                outbox.flush()
            except Exception:
                pass
            try:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
            except Exception:
                pass
            return "failed"


class _Outbox:
    """A stream's chunk responses, sent in order. With the fused stages a thread of its own
    sends them, so that the next latent frame renders while the python backend copies the
    last chunk's frames out of this process (at 1280x720, 11 MB a chunk); at most two chunks
    wait. With the stage models they go out from the calling thread: a thread of ours would
    run while BLS responses arrive (see the module's docstring)."""

    def __init__(self, sender, threaded: bool):
        self.sender, self.error = sender, None
        self.queue = queue.Queue(maxsize=2) if threaded else None
        if self.queue is not None:
            self.thread = threading.Thread(target=self._run, name="helios-outbox", daemon=True)
            self.thread.start()

    def send(self, response) -> None:
        if self.error is not None:
            raise self.error
        if self.queue is None:
            self.sender.send(response)
        else:
            self.queue.put(response)

    def flush(self) -> None:
        """Return once every chunk has gone out; raises what sending one raised."""
        if self.queue is not None:
            self.queue.put(None)
            self.thread.join()
            self.queue = None
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (response := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.sender.send(response)
                except Exception as e:  # noqa: BLE001 - raised in the stream's own thread
                    self.error = e
