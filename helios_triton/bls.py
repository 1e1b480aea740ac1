"""The orchestrator's stage functions as BLS calls to this server's stage models.

``TritonStages`` implements ``helios.orchestrator.Stages`` over ``prompt_encoder``,
``image_encoder``, ``video_encoder``, ``ar_backbone``, ``refiner`` and ``vae_decoder`` with the tensor names of
``helios_triton.contract``. Only a python-backend stub can import this module (it needs
``triton_python_backend_utils``). Latent frames are float32 numpy arrays [1, C, h, w], as the
stage models send and take them: the ``helios`` model that runs these calls never imports
torch (a stub's start costs about 3 s of CPU less, each of its instances).
"""

import asyncio
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from helios_triton.calls import CallWatch


def _outputs(model, response, outputs):
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


def _t(name, array):
    return pb_utils.Tensor(name, np.ascontiguousarray(array))


class TritonStages:
    """The stage functions of helios.orchestrator over the stage models of this server."""

    def __init__(self, config, speculative: bool, slot_bias: bool = True,
                 watch: CallWatch = CallWatch(None), settle=None):
        self.config = config
        self.speculative = speculative
        self.slot_bias = slot_bias
        self.vocab_size = config.ar_backbone.vocab_size
        self.watch = watch  # marks every wait on a stage for the supervisor (helios_triton.calls)
        # A question to tritonserver that the stub queues behind its earlier messages (the
        # served request's is_cancelled): see _TokenStream.
        self.settle = settle

    def _call(self, model, inputs, outputs):
        """One BLS request; returns {output name: numpy array} or raises with the stage's
        error."""
        with self.watch.waiting(model):
            response = pb_utils.InferenceRequest(model_name=model, inputs=inputs,
                                                 requested_output_names=outputs).exec()
        return _outputs(model, response, outputs)

    def encode_prompt(self, prompt):
        out = self._call("prompt_encoder",
                         [_t("PROMPT", np.array([prompt.encode("utf-8")], np.object_))],
                         ["prompt_embedding_table", "draft_prompt_embedding_table"])
        # Kept as they came (FP32 here, FP16 from a TensorRT text encoder): passed on untouched.
        return out["prompt_embedding_table"][0], out["draft_prompt_embedding_table"][0]

    def encode_image(self, image):
        out = self._call("image_encoder", [_t("image", image)], ["latent", "plan_tokens"])
        return out["latent"][None], out["plan_tokens"].tolist()

    def encode_video(self, video):
        out = self._call("video_encoder", [_t("frames", video)], ["latent", "plan_tokens"])
        return [z[None] for z in out["latent"]], out["plan_tokens"].tolist()

    def ar_stream(self, prefix, draft_prefix, tokens, n, params, bias, speculative):
        if not self.slot_bias:  # one row: what any slot allows
            bias = bias.reshape(-1, bias.shape[-1]).max(0)
        rows = prefix.shape[0]
        ids = np.concatenate([np.arange(self.vocab_size, self.vocab_size + rows), tokens])
        inputs = [
            _t("input_ids", ids.astype(np.int32)[None]),
            _t("input_lengths", np.array([[ids.shape[0]]], np.int32)),
            _t("request_output_len", np.array([[n]], np.int32)),
            _t("prompt_embedding_table", prefix[None]),
            _t("prompt_vocab_size", np.array([[rows]], np.int32)),
            _t("embedding_bias", np.asarray(bias, np.float32).reshape(1, -1)),
            _t("temperature", np.array([[params.temperature]], np.float32)),
            _t("runtime_top_k", np.array([[params.top_k]], np.int32)),
            _t("runtime_top_p", np.array([[params.top_p]], np.float32)),
            _t("random_seed", np.array([[params.seed]], np.uint64)),
            _t("streaming", np.array([[True]])),
        ]
        if self.speculative:  # the deployment decides; the request's flag is for in-process use
            inputs.append(_t("draft_prompt_embedding_table", draft_prefix[None]))
        request_id = uuid.uuid4().hex
        # Sent now, not when the tokens are first asked for (orchestrator.plan_stream).
        with self.watch.waiting("ar_backbone"):
            responses = pb_utils.InferenceRequest(
                model_name="ar_backbone", inputs=inputs, request_id=request_id,
                requested_output_names=["output_ids"]).exec(decoupled=True)
        return _TokenStream(responses, n, lambda: self._stop(request_id), self.settle, self.watch)

    def _stop(self, request_id):
        """Ends the AR request ``request_id``; returns the stop request's response iterator,
        read to its end (for _TokenStream to let go of)."""
        stop = pb_utils.InferenceRequest(
            model_name="ar_backbone", request_id=request_id, requested_output_names=[],
            inputs=[_t("input_ids", np.zeros((1, 1), np.int32)),
                    _t("input_lengths", np.ones((1, 1), np.int32)),
                    _t("request_output_len", np.ones((1, 1), np.int32)),
                    _t("stop", np.array([[True]]))])
        with self.watch.waiting("ar_backbone"):
            responses = stop.exec(decoupled=True)
            for _ in responses:
                pass
        return responses

    def _refine_request(self, plan, index, seed, anchor, history):
        inputs = [_t("plan_tokens", np.array(plan, np.int32)),
                  _t("seed", np.array([seed], np.int64)),
                  _t("frame_index", np.array([index], np.int32))]
        if anchor is not None:
            inputs.append(_t("anchor", np.asarray(anchor[0], np.float32)))
        if history:
            inputs.append(_t("history", np.concatenate(history).astype(np.float32, copy=False)))
        return "refiner", inputs, ["latent"]

    def _decode_request(self, latent, prev_latent):
        # prev_latent always goes (zeros before the first frame, which is what the decoder
        # assumes without one): a TensorRT engine has no optional inputs.
        prev = np.zeros_like(latent) if prev_latent is None else prev_latent
        inputs = [_t("latent", np.asarray(latent[0], np.float32)),
                  _t("prev_latent", np.asarray(prev[0], np.float32))]
        return "vae_decoder", inputs, ["frames"]

    def refine(self, plan, index, seed, anchor, history):
        return self._call(*self._refine_request(plan, index, seed, anchor, history))["latent"][None]

    def decode(self, latent, prev_latent):
        return self._call(*self._decode_request(latent, prev_latent))["frames"]


class OverlappedStages(TritonStages):
    """``overlap_decode`` on: the stage functions plus ``refine_and_decode``, with which
    orchestrator.stream_video decodes a latent frame while the next one renders."""

    def __init__(self, config, speculative: bool, slot_bias: bool,
                 loop: asyncio.AbstractEventLoop, watch: CallWatch = CallWatch(None),
                 settle=None):
        super().__init__(config, speculative, slot_bias, watch, settle)
        self._loop = loop

    def refine_and_decode(self, refine, decode):
        """Both BLS requests in flight at once (``async_exec``: the stub waits for each in a
        thread of its own): the decoder's GPU work, the copies of its 4 frames and the
        host's share of both calls then hide behind the next frame's rendering. Every input
        tensor is made before either request goes out."""
        r, d = self._refine_request(*refine), self._decode_request(*decode)
        with self.watch.waiting("refiner, vae_decoder"):
            latent, frames = self._loop.run_until_complete(_in_flight_together(r, d))
        return latent["latent"][None], frames["frames"]


async def _in_flight_together(*calls):
    """BLS requests (model, inputs, output names) sent together; their outputs, in order."""
    requests = [pb_utils.InferenceRequest(model_name=m, inputs=i, requested_output_names=o)
                for m, i, o in calls]
    responses = await asyncio.gather(*(r.async_exec() for r in requests))
    return [_outputs(m, response, o) for (m, _, o), response in zip(calls, responses)]


class _TokenStream:
    """The token lists of one ar_backbone BLS stream. close() before all ``n`` tokens came
    (the client went away, or a prompt switch) ends the AR request, freeing its KV blocks,
    and takes the stream's remaining responses; it does so even if no token was asked for yet.

    Once a stream's final response has been read, its iterator is let go of only after
    ``settle()`` has returned. The stub (tritonserver 2.51's python backend) holds each
    stream's responses twice: in the Python iterator and in a map of its own, from which the
    stub's message thread removes the stream when the cleanup message that reading the final
    response queued goes out. Whichever lets go last frees the responses, and their numpy
    arrays, and that thread holds no GIL: a stream dropped here first had its arrays freed
    off the GIL while this thread ran Python, which corrupted the interpreter's memory (the
    helios stub's SIGSEGV at prompt switches on the H200 under Python 3.12, docs/serving.md).
    ``settle`` asks tritonserver a question through the same queue (is_cancelled), so when
    it returns the cleanup has gone out and the last reference is ours, dropped under the GIL.
    """

    def __init__(self, responses, n, stop, settle, watch: CallWatch):
        self.responses, self.n, self.stop, self.watch = iter(responses), n, stop, watch
        self.settle = settle
        self.received, self.closed = 0, False  # closed: nothing more is read

    def __iter__(self):
        return self

    def __next__(self):
        while not self.closed:
            with self.watch.waiting("ar_backbone"):
                try:
                    response = next(self.responses)
                except StopIteration:  # after the final response
                    self._let_go()
                    raise
            if response.has_error():
                raise RuntimeError(f"ar_backbone: {response.error().message()}")
            out = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if out is not None:
                toks = out.as_numpy().reshape(-1).tolist()
                self.received += len(toks)
                return toks
        raise StopIteration

    def close(self):
        if self.closed:
            return
        self.closed = True
        stopped = self.stop() if self.received < self.n else None
        with self.watch.waiting("ar_backbone"):
            for _ in self.responses:
                pass
        self._let_go(stopped)

    def _let_go(self, *held):
        """Drops this stream's iterator once the stub's cleanup of it has gone out (the
        class's docstring); nothing more is read. ``held``: other streams read to their end
        (the stop request's), kept until then as well."""
        self.closed = True
        if self.settle is not None:
            self.settle()
        self.responses = iter(())
