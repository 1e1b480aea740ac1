"""In-flight batching of AR requests for the Triton ``ar_backbone`` model (torch runtime).

The Triton model's ``execute`` only translates tensors into an ``ARJob`` and hands it to
``ARScheduler.submit``; one scheduler thread owns the ``ARRuntime`` and, every iteration,
admits waiting jobs, drops stopped or cancelled ones (their KV blocks go back to the pool),
and runs one ``decode_round`` over all live sequences, streaming each job's new tokens out
through its ``emit`` callback. This is TensorRT-LLM's in-flight batching with its
``guaranteed_no_evict`` policy: a job is admitted only when the pool can hold it to its end
alongside every job already running, so a running stream never runs out of blocks.
"""

from __future__ import annotations

import collections
import faulthandler
import itertools
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .accel import accelerate
from .ar_runtime import ARRuntime
from .checkpoint import load_component, read_config
from .errors import HeliosError
from .fp8 import quantize_refiner
from .schedule import frame_noise
from .sampling import SamplingParams

log = logging.getLogger("helios.serving")


def enable_stack_dumps(folder: str) -> None:
    """On SIGUSR2, write the Python stack of every thread of this process to
    ``folder/<pid>.txt``: what a stalled stage model is waiting on. Every Triton model of the
    repository imports this module, so ``HELIOS_STACKS_DIR=DIR tritonserver ...`` arms all the
    stub processes (``pkill -USR2 -f triton_python_backend_stub``) with nothing to install and
    no ptrace rights (py-spy needs both). A crash (SIGSEGV, SIGABRT, ...) writes there too."""
    os.makedirs(folder, exist_ok=True)
    out = open(os.path.join(folder, f"{os.getpid()}.txt"), "w")  # noqa: SIM115  kept open
    out.write(f"pid {os.getpid()}\n")
    out.flush()
    faulthandler.register(signal.SIGUSR2, file=out, all_threads=True)
    faulthandler.enable(file=out, all_threads=True)


if os.environ.get("HELIOS_STACKS_DIR"):
    enable_stack_dumps(os.environ["HELIOS_STACKS_DIR"])


@dataclass
class ARJob:
    request_id: str
    prefix: torch.Tensor               # [P, hidden]
    draft_prefix: torch.Tensor | None  # [P, draft hidden]
    tokens: list[int]                  # context after the prefix
    num_new: int                       # tokens to generate
    params: SamplingParams
    bias: torch.Tensor | None
    speculative: bool
    emit: Callable[[list[int]], None]           # new tokens (streaming)
    finish: Callable[[str | None], None]        # end of the job: None or an error message
    cancelled: Callable[[], bool] = lambda: False
    remaining: int = field(init=False)
    seq_id: int = field(init=False, default=-1)

    def __post_init__(self):
        self.remaining = self.num_new

    @property
    def max_length(self) -> int:
        return self.prefix.shape[0] + len(self.tokens) + self.num_new


class ARScheduler:
    def __init__(self, runtime: ARRuntime, speculative_tokens: int = 4,
                 on_iteration: Callable[[dict], None] | None = None):
        self.runtime = runtime
        self.k = speculative_tokens
        self.on_iteration = on_iteration
        self._cond = threading.Condition()
        self._queue: collections.deque[ARJob] = collections.deque()
        self._live: dict[int, ARJob] = {}
        self._stops: set[str] = set()
        self._reserved = 0
        self._ids = itertools.count()
        self._closed = False
        self.iterations = 0
        self._thread = threading.Thread(target=self._loop, name="ar-scheduler", daemon=True)
        self._thread.start()

    # ---- called from Triton's execute thread -------------------------------------------
    def blocks_for(self, job: ARJob) -> int:
        """Blocks of the target pool the job can use at most (the draft pool mirrors it)."""
        extra = self.k + 1 if job.speculative and self.runtime.draft is not None else 0
        return math.ceil((job.max_length + extra) / self.runtime.cache.block_size)

    def submit(self, job: ARJob) -> None:
        need, total = self.blocks_for(job), self.runtime.cache.num_blocks
        if need > total:
            job.finish(f"request needs {need} KV cache blocks of "
                       f"{self.runtime.cache.block_size} tokens, the pool has {total} "
                       f"(max_tokens_in_paged_kv_cache)")
            return
        with self._cond:
            if self._closed:
                job.finish("the AR scheduler is shutting down")
                return
            self._queue.append(job)
            self._cond.notify()

    def stop(self, request_id: str) -> None:
        """TensorRT-LLM's stop request: end the job with this request id, keeping its tokens."""
        with self._cond:
            self._stops.add(request_id)
            self._cond.notify()

    def stats(self) -> dict:
        cache = self.runtime.cache
        with self._cond:
            return {"kv_blocks_total": cache.num_blocks, "kv_blocks_free": cache.num_free_blocks,
                    "kv_blocks_used": cache.num_blocks - cache.num_free_blocks,
                    "active_sequences": len(self._live), "queued_requests": len(self._queue),
                    "iterations": self.iterations,
                    "draft_tokens": self.runtime.stats["draft_tokens"],
                    "accepted_draft_tokens": self.runtime.stats["accepted_tokens"]}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        for job in list(self._queue) + list(self._live.values()):
            job.finish("the AR scheduler is shutting down")

    # ---- the scheduler thread ----------------------------------------------------------
    def _end(self, job: ARJob, error: str | None) -> None:
        if job.seq_id in self._live:
            del self._live[job.seq_id]
            self._reserved -= self.blocks_for(job)
            self.runtime.free(job.seq_id)
        try:
            job.finish(error)
        except Exception:  # a client that went away must not stop the other streams
            log.exception("finishing request %s failed", job.request_id)

    def _admit(self) -> None:
        total = self.runtime.cache.num_blocks
        while self._queue and self._reserved + self.blocks_for(self._queue[0]) <= total:
            job = self._queue.popleft()
            job.seq_id = next(self._ids)
            self.runtime.add_sequence(job.seq_id, job.prefix, job.tokens, job.params,
                                      job.draft_prefix, job.bias)
            self._reserved += self.blocks_for(job)
            self._live[job.seq_id] = job

    def _loop(self) -> None:
        dev = self.runtime.device
        if dev.type == "cuda":  # high priority: the refiner's kernels share the GPU (MPS)
            with torch.cuda.stream(torch.cuda.Stream(dev, priority=-1)):
                self._rounds()
        else:
            self._rounds()

    def _rounds(self) -> None:
        while True:
            self._round()
            if self.on_iteration is not None:  # after every pass: frees show up at once
                self.on_iteration(self.stats())
            if self._closed:
                return

    def _round(self) -> None:
        """Admit, drop stopped or cancelled jobs, run one decode round."""
        with self._cond:
            while not self._closed and not self._queue and not self._live:
                self._cond.wait()
            if self._closed:
                return
            stops, self._stops = self._stops, set()
            for job in [j for j in self._queue if j.request_id in stops]:
                self._queue.remove(job)
                self._end(job, None)
            self._admit()
            live = list(self._live.values())
        for job in live:
            if job.request_id in stops or job.cancelled():
                log.info("request %s stopped after %d of %d tokens", job.request_id,
                         job.num_new - job.remaining, job.num_new)
                self._end(job, None)
        live = [j for j in live if j.seq_id in self._live]
        if not live:
            return
        try:
            out = self.runtime.decode_round({j.seq_id: j.remaining for j in live},
                                            {j.seq_id: j.speculative for j in live}, self.k)
        except Exception as e:  # never leave a stream hanging: fail the batch, go on
            log.exception("decode round failed")
            for job in live:
                self._end(job, f"AR decoding failed: {e}")
            return
        self.iterations += 1
        for job in live:
            job.remaining -= len(out[job.seq_id])
        if self.on_iteration is not None:  # before the tokens go out: a client that has a
            self.on_iteration(self.stats())  # token sees the metrics of the round that made it
        for job in live:
            toks = out[job.seq_id]
            try:
                job.emit(toks)
            except Exception:
                log.exception("sending tokens of request %s failed", job.request_id)
                self._end(job, None)
                continue
            if job.remaining <= 0:
                self._end(job, None)


# ---- helpers for the Triton python-backend models (no triton import here) -------------------
def requested_outputs(wanted, arrays: dict) -> dict:
    """The entries of {output name: array} named in ``wanted`` (a request's
    ``requested_output_names()``; empty means all), each a fresh C-order
    array that owns its memory. A response must not carry outputs its BLS caller did not
    request: tritonserver 2.51's python-backend stub under Python 3.12 then crashes (SIGSEGV in
    libpython, seen on the GPU machine when ar_backbone answered the helios model's BLS stream
    with output_ids and sequence_length; benchmarks/diag/decoupled_check.py reproduces it)."""
    wanted = set(wanted) or set(arrays)
    return {k: np.array(v, order="C", copy=True) for k, v in arrays.items() if k in wanted}


def model_parameters(args: dict) -> dict[str, str]:
    """The ``parameters`` of a model's config.pbtxt as a plain {key: string} dict."""
    import json  # noqa: PLC0415

    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


def model_device(args: dict, params: dict) -> torch.device:
    """cuda:N for a KIND_GPU instance (N from Triton), else the ``device`` parameter."""
    if args.get("model_instance_kind") == "GPU" or params.get("device", "cpu").startswith("cuda"):
        return torch.device(f"cuda:{args.get('model_instance_device_id', '0')}")
    return torch.device("cpu")


def model_dtype(device: torch.device, params: dict) -> torch.dtype:
    name = params.get("dtype", "auto")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def compile_batches(value: str) -> bool | frozenset[int]:
    """The ``torch_compile`` parameter of ``ar_backbone``: "off", "on" (every batch size), or
    the batch sizes to compile, comma-separated ("1": one stream's steps compiled, the
    batched ones captured eagerly, which saves their dynamic-shape compilation)."""
    v = value.strip().lower()
    if v in ("off", "on"):
        return v == "on"
    try:
        sizes = frozenset(int(x) for x in v.split(","))
        if min(sizes) >= 1:
            return sizes
    except ValueError:
        pass
    raise HeliosError("torch_compile",
                      f"must be off, on or batch sizes >= 1 such as 1,2, got {value!r}")


@dataclass
class Stage:
    """What a stage model's ``initialize`` needs: its parameters, device, dtype, the
    checkpoint's config and the loaded components by name."""

    params: dict
    device: torch.device
    dtype: torch.dtype
    config: object
    modules: dict


def load_stage(args: dict, *components: str) -> Stage:
    """Read the model's parameters and load ``components`` of its checkpoint onto its device."""
    params = model_parameters(args)
    device = model_device(args, params)
    dtype = model_dtype(device, params)
    config = read_config(params["checkpoint"])
    modules = {c: load_component(params["checkpoint"], c, config, device, dtype) for c in components}
    if "refiner" in modules and params.get("weight_quantization", "none") == "fp8":
        quantize_refiner(modules["refiner"])  # before compiling (helios/fp8.py)
    done = accelerate(device, modules.get("refiner"), modules.get("vae"))
    if done:
        log.info("%s: %s", "+".join(components), ", ".join(done))
    return Stage(params, device, dtype, config, modules)


@dataclass
class RefinerCall:
    """The refiner model's request as tensors on its device (both repository flavours)."""

    plan: torch.Tensor            # [1, n] int64
    noise: torch.Tensor           # [1, C, h, w], the frame's starting noise
    anchor: torch.Tensor | None   # [1, C, h, w]
    history: list                 # [1, C, h, w] each, most recent first


def refiner_call(config, get: Callable, device, dtype) -> RefinerCall:
    """Check and convert a refiner request's inputs; ``get(name)`` returns the input as a numpy
    array, or None when it is absent (anchor and history may be). Both refiner models (torch
    and TensorRT flavours) read their requests through this."""
    plan, anchor, history = get("plan_tokens"), get("anchor"), get("history")
    seed, frame_index = int(get("seed").reshape(-1)[0]), int(get("frame_index").reshape(-1)[0])
    codebook = config.refiner.plan_vocab_size
    if plan.min() < 0 or plan.max() >= codebook:
        raise HeliosError("plan_tokens", f"must be in [0, {codebook - 1}]")
    shape = (1, config.refiner.latent_channels, config.latent_height, config.latent_width)
    as_device = lambda a: torch.from_numpy(a).to(device, dtype)  # noqa: E731
    return RefinerCall(
        torch.from_numpy(plan.astype("int64")).to(device)[None],
        frame_noise(seed, frame_index, shape).to(device, dtype),
        None if anchor is None else as_device(anchor)[None],
        [] if history is None else [h[None] for h in as_device(history)])


# Names of the helios model's inputs for each field of a request.
HELIOS_INPUT_NAMES = {"prompt": "PROMPT", "duration": "DURATION_S", "num_frames": "NUM_FRAMES",
                      "fps": "FPS", "seed": "SEED", "temperature": "TEMPERATURE",
                      "top_k": "TOP_K", "top_p": "TOP_P", "image": "IMAGE"}


# What the helios orchestrator (model_repository/helios/1/model.py) sends to and reads from
# each stage model, by tensor name and Triton dtype. Both flavours of the repository (torch,
# TensorRT) must provide exactly this; the tests check every filled config against it.
# "TABLE" is the prompt-embedding dtype: FP32 in the torch flavour, FP16 in the TensorRT one;
# it passes from prompt_encoder to ar_backbone untouched, so the two must agree.
STAGE_CONTRACT = {
    "prompt_encoder": {
        "inputs": {"PROMPT": "TYPE_STRING"},
        "outputs": {"prompt_embedding_table": "TABLE", "draft_prompt_embedding_table": "TABLE"},
    },
    "image_encoder": {
        "inputs": {"image": "TYPE_UINT8"},
        "outputs": {"latent": "TYPE_FP32", "plan_tokens": "TYPE_INT32"},
    },
    "ar_backbone": {
        "inputs": {"input_ids": "TYPE_INT32", "input_lengths": "TYPE_INT32",
                   "request_output_len": "TYPE_INT32", "prompt_embedding_table": "TABLE",
                   "prompt_vocab_size": "TYPE_INT32", "embedding_bias": "TYPE_FP32",
                   "temperature": "TYPE_FP32", "runtime_top_k": "TYPE_INT32",
                   "runtime_top_p": "TYPE_FP32", "random_seed": "TYPE_UINT64",
                   "streaming": "TYPE_BOOL", "stop": "TYPE_BOOL"},
        "outputs": {"output_ids": "TYPE_INT32"},
    },
    "refiner": {
        "inputs": {"plan_tokens": "TYPE_INT32", "seed": "TYPE_INT64", "frame_index": "TYPE_INT32",
                   "anchor": "TYPE_FP32", "history": "TYPE_FP32"},
        "outputs": {"latent": "TYPE_FP32"},
    },
    "vae_decoder": {
        "inputs": {"latent": "TYPE_FP32", "prev_latent": "TYPE_FP32"},
        "outputs": {"frames": "TYPE_UINT8"},
    },
}
