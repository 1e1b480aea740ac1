"""ar_backbone (torch runtime): TensorRT-LLM's request tensors -> helios.ar_scheduler.ARScheduler.

input_ids holds the prompt as virtual ids vocab_size .. vocab_size + prompt_vocab_size - 1
(rows of prompt_embedding_table), then ordinary token ids. Every response carries the new
tokens of one iteration (streaming) or all of them (non-streaming); a request with stop=true
ends the running request that has the same request id.
"""

import json
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from helios.ar_backbone import fuse_projections
from helios.ar_runtime import ARRuntime
from helios.ar_scheduler import ARJob, ARScheduler
from helios.checkpoint import load_component, read_config
from helios.errors import HeliosError
from helios.fp8 import quantize_ar
from helios.sampling import SamplingParams
from helios_triton.stage import (compile_batches, kv_pool_blocks, limit_gpu_share, model_device,
                                 model_dtype)
from helios_triton.stub import input_array, model_parameters, process_settings, requested_outputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _scalar(request, name, default=None):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return default if t is None else t.as_numpy().reshape(-1)[0].item()



class TritonPythonModel:
    def initialize(self, args):
        settings = process_settings()
        params = model_parameters(args)
        limit_gpu_share(params)
        self.device = model_device(args, params)
        dtype = model_dtype(self.device, params)
        ckpt = params["checkpoint"]
        self.config = read_config(ckpt)
        model = load_component(ckpt, "ar_backbone", self.config, self.device, dtype)
        if params.get("weight_quantization", "none") == "fp8":
            quantize_ar(model)
        elif self.device.type == "cuda":  # as HeliosPipeline does: fewer products a step
            fuse_projections(model)
        speculative = params.get("speculative_decoding_mode", "none") == "draft_target"
        draft = load_component(ckpt, "draft", self.config, self.device, dtype) if speculative else None
        self.vocab_size = model.config.vocab_size
        block = int(params.get("kv_cache_block_size", self.config.kv_block_size))
        num_blocks = kv_pool_blocks(params, self.device, dtype, block, model, draft)
        runtime = ARRuntime(model, draft, num_blocks=num_blocks, block_size=block, device=self.device,
                            cuda_graphs=params.get("cuda_graphs", "on") == "on" and settings.cuda_graphs,
                            max_positions=self.config.max_ar_positions(),
                            compile_steps=compile_batches(params.get("torch_compile", "off"))
                            if settings.compile else False)
        # Every batch size up to max_batch_size compiled and captured before the first request.
        t0 = time.perf_counter()
        runtime.prepare_static(range(1, json.loads(args["model_config"])["max_batch_size"] + 1))
        if runtime.cuda_graphs:
            pb_utils.Logger.log_info(f"ar_backbone: decode steps captured in "
                                     f"{time.perf_counter() - t0:.1f} s")
        self.check_period = float(params.get("cancellation_check_period_ms", "100")) / 1000
        self._metrics()
        self.scheduler = ARScheduler(runtime, int(params.get("num_draft_tokens", "4")),
                                     on_iteration=self._update_metrics,
                                     group=self.config.plan_tokens_per_frame)
        self._update_metrics(self.scheduler.stats())
        pb_utils.Logger.log_info(
            f"ar_backbone: {num_blocks} KV blocks of {block} tokens on {self.device}, "
            f"speculative decoding {'on' if speculative else 'off'}, weights "
            f"{params.get('weight_quantization', 'none')}")

    def _metrics(self):
        kind = pb_utils.MetricFamily
        self.m_blocks = kind(name="helios_kv_cache_blocks", description="KV cache blocks by state",
                             kind=kind.GAUGE)
        self.m_free = self.m_blocks.Metric(labels={"model": "ar_backbone", "state": "free"})
        self.m_used = self.m_blocks.Metric(labels={"model": "ar_backbone", "state": "used"})
        self.m_seq_family = kind(name="helios_ar_active_sequences",
                                 description="Sequences decoding in the current batch", kind=kind.GAUGE)
        self.m_active = self.m_seq_family.Metric(labels={"model": "ar_backbone"})
        self.m_queue_family = kind(name="helios_ar_queued_requests",
                                   description="Requests waiting for KV cache room", kind=kind.GAUGE)
        self.m_queued = self.m_queue_family.Metric(labels={"model": "ar_backbone"})
        self.m_iter_family = kind(name="helios_ar_iterations", description="Batched decode rounds",
                                  kind=kind.GAUGE)
        self.m_iter = self.m_iter_family.Metric(labels={"model": "ar_backbone"})

    def _update_metrics(self, stats):
        self.m_free.set(stats["kv_blocks_free"])
        self.m_used.set(stats["kv_blocks_used"])
        self.m_active.set(stats["active_sequences"])
        self.m_queued.set(stats["queued_requests"])
        self.m_iter.set(stats["iterations"])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            if _scalar(request, "stop", False):
                self.scheduler.stop(request.request_id())
                sender.send(flags=FINAL)
                continue
            try:
                job = self._job(request, sender)
            except HeliosError as e:
                sender.send(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)), flags=FINAL)
                continue
            self.scheduler.submit(job)
        return None

    def _job(self, request, sender) -> ARJob:
        ids = input_array(request, "input_ids").reshape(-1).astype(np.int64)
        length = int(_scalar(request, "input_lengths"))
        if not 1 <= length <= ids.shape[0]:
            raise HeliosError("input_lengths", f"must be in [1, {ids.shape[0]}], got {length}")
        ids = ids[:length]
        n = int(_scalar(request, "request_output_len"))
        if n < 1:
            raise HeliosError("request_output_len", f"must be >= 1, got {n}")
        table = input_array(request, "prompt_embedding_table")
        rows = int(_scalar(request, "prompt_vocab_size", 0))
        prefix_len = int((ids >= self.vocab_size).sum())
        if prefix_len:
            if table is None:
                raise HeliosError("prompt_embedding_table", "is required when input_ids holds "
                                                            f"prompt-table ids (>= {self.vocab_size})")
            table = table.reshape(-1, table.shape[-1])
            expected = np.arange(self.vocab_size, self.vocab_size + prefix_len)
            if not np.array_equal(ids[:prefix_len], expected) or rows < prefix_len \
                    or table.shape[0] < prefix_len:
                raise HeliosError("input_ids", f"must start with the prompt-table ids "
                                               f"{self.vocab_size}..{self.vocab_size + rows - 1} in order")
        hidden = self.scheduler.runtime.model.config.hidden_size
        prefix = (torch.from_numpy(table[:prefix_len].astype(np.float32)) if prefix_len
                  else torch.zeros(0, hidden))
        draft_table = input_array(request, "draft_prompt_embedding_table")
        draft_prefix = None
        if draft_table is not None and prefix_len:
            draft_table = draft_table.reshape(-1, draft_table.shape[-1])
            draft_prefix = torch.from_numpy(draft_table[:prefix_len].astype(np.float32))
        tokens = ids[prefix_len:].tolist()
        if any(t < 0 for t in tokens):
            raise HeliosError("input_ids", f"must be >= 0, got {min(tokens)}")
        bias = input_array(request, "embedding_bias")
        if bias is not None:
            # vocab_size entries (TensorRT-LLM's embedding_bias), or slots x vocab_size: one
            # row per plan-token slot of a frame (helios.schedule.plan_bias)
            bias = torch.from_numpy(bias.reshape(-1).astype(np.float32))
            if bias.shape[0] == 0 or bias.shape[0] % self.vocab_size:
                raise HeliosError("embedding_bias", f"must have vocab_size = {self.vocab_size} "
                                                    f"entries or a multiple of it (one row per "
                                                    f"slot), got {bias.shape[0]}")
            bias = bias.view(-1, self.vocab_size)
        seed = int(_scalar(request, "random_seed", 0))
        params = SamplingParams(float(_scalar(request, "temperature", 1.0)),
                                int(_scalar(request, "runtime_top_k", 0)),
                                float(_scalar(request, "runtime_top_p", 1.0)),
                                seed % (2**63)).validate()
        streaming = bool(_scalar(request, "streaming", False))
        kept: list[int] = []
        wanted = request.requested_output_names()  # asked here: the request is gone by the emits

        def respond(toks):
            out = requested_outputs(wanted, {"output_ids": np.array([[toks]], np.int32),
                                             "sequence_length": np.array([[len(toks)]], np.int32)})
            return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()])

        def emit(toks):
            if streaming:
                sender.send(respond(toks))
            else:
                kept.extend(toks)

        def finish(error):
            done[0] = True
            if error is not None:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)), flags=FINAL)
            elif streaming:
                sender.send(flags=FINAL)
            else:
                sender.send(respond(kept), flags=FINAL)

        last, done = [0.0, False], [False]

        def cancelled():  # asking the server costs a round trip: at most once per period
            if done[0]:   # never after the final response (tritonserver 2.51 crashes on it)
                return True
            now = time.monotonic()
            if now - last[0] >= self.check_period:
                last[0], last[1] = now, sender.is_cancelled()
            return last[1]

        speculative = self.scheduler.runtime.draft is not None and draft_prefix is not None
        return ARJob(request.request_id(), prefix, draft_prefix, tokens, n, params, bias,
                     speculative, emit, finish, cancelled)

    def finalize(self):
        self.scheduler.close()
        # The custom metrics here, each Metric before its family, not in the interpreter's
        # teardown, where releasing them crashed the stub (docs/serving.md).
        self.m_free = self.m_used = self.m_active = self.m_queued = self.m_iter = None
        self.m_blocks = self.m_seq_family = self.m_queue_family = self.m_iter_family = None
