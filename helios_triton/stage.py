"""What the models that run torch share in ``initialize`` and ``execute``: device, dtype,
loading the stage's components (or the whole pipeline), and the refiner's request. What every
stub shares, torch or not, is in ``helios_triton.stub``.

Nothing here imports ``triton_python_backend_utils`` (only the stub has it), so all of it is
tested in an ordinary process.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from helios import attention
from helios import ar_runtime
from helios.accel import accelerate
from helios.checkpoint import load_component, read_config
from helios.errors import HeliosError
from helios.fp8 import quantize_refiner
from helios.schedule import frame_noise
from helios.settings import Settings
from helios_triton.stub import model_parameters, process_settings

log = logging.getLogger("helios_triton")


def limit_gpu_share(params: dict) -> None:
    """The ``gpu_share`` parameter (1-100, empty: all): under CUDA MPS, the percentage of the
    GPU's SMs that this process's kernels may occupy (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, read
    when CUDA starts in the process, so this runs before anything touches the GPU). A
    compute-bound stage held below 100 % leaves SMs free for the memory-bound AR decode
    rounds of another process, which otherwise queue behind its matrix products."""
    value = params.get("gpu_share", "").strip()
    if not value:
        return
    if not value.isdigit() or not 1 <= int(value) <= 100:
        raise HeliosError("gpu_share", f"must be a percentage in [1, 100], got {value!r}")
    os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = value


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


def kv_pool_blocks(params: dict, device: torch.device, dtype: torch.dtype, block: int,
                   *models) -> int:
    """max_tokens_in_paged_kv_cache, or on a GPU the kv_cache_free_gpu_mem_fraction of the
    free memory (the smaller of the two when both are set), as in TensorRT-LLM."""
    tokens = int(params.get("max_tokens_in_paged_kv_cache") or 0)
    blocks = tokens // block if tokens else None
    fraction = float(params.get("kv_cache_free_gpu_mem_fraction") or 0)
    if device.type == "cuda" and fraction > 0:
        per_token = 0
        for m in models:
            if m is not None:
                c = m.config
                per_token += 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
        per_block = per_token * block * torch.finfo(dtype).bits // 8
        free, _ = torch.cuda.mem_get_info(device)
        by_memory = int(free * fraction) // per_block
        blocks = by_memory if blocks is None else min(blocks, by_memory)
    if not blocks:
        raise HeliosError("max_tokens_in_paged_kv_cache", "must be set (> 0) on a CPU")
    return blocks


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
    settings = process_settings()
    attention.use_settings(settings)
    ar_runtime.use_settings(settings)
    params = model_parameters(args)
    limit_gpu_share(params)
    device = model_device(args, params)
    dtype = model_dtype(device, params)
    config = read_config(params["checkpoint"])
    modules = {c: load_component(params["checkpoint"], c, config, device, dtype) for c in components}
    if "refiner" in modules and params.get("weight_quantization", "none") == "fp8":
        quantize_refiner(modules["refiner"])  # before compiling (helios/fp8.py)
    done = accelerate(device, modules.get("refiner"), modules.get("vae"), settings.compile,
                      settings.cuda_graphs)
    if "refiner" in modules and device.type == "cuda":
        done.append(f"attention {attention.backend()}")
    if done:
        log.info("%s: %s", "+".join(components), ", ".join(done))
    return Stage(params, device, dtype, config, modules)


def load_pipeline(args: dict, params: dict, settings: Settings, report: Callable[[str], None]):
    """``stages = fused``: every stage of the video in the ``helios`` model's own process, as
    the in-process ``HeliosPipeline``. With the ``max_streams`` parameter at 1, one stream at a
    time: its AR backbone decodes before the refiner renders, as ``benchmarks/fps.py``
    measures it, or beside it with the ``prefetch_plans`` parameter on; each latent frame's
    decode queued before the next render with ``overlap_decode`` on. Above 1, that many
    streams at once (``shared_ar``): one batched AR round for all of them, renders in turn.
    The stage models are then not in the repository. Returns the pipeline after one warm-up
    video, which compiles, captures and tunes every context a stream meets (the refiner's
    history lengths, the AR's decode step, the decoder's first and later frames), so that the
    first request pays none of it. ``report`` takes the progress lines (the server's log)."""
    from helios.pipeline import HeliosPipeline  # the fused mode alone needs every stage's code

    attention.use_settings(settings)
    ar_runtime.use_settings(settings)
    t0 = time.perf_counter()
    device = model_device(args, params)
    streams = int(params.get("max_streams", "1"))
    pipe = HeliosPipeline.from_checkpoint(
        params["checkpoint"], device=device, dtype=model_dtype(device, params),
        max_streams=streams, shared_ar=streams > 1,
        ar_fp8=params.get("ar_weight_quantization") == "fp8",
        refiner_fp8=params.get("refiner_weight_quantization") == "fp8",
        prefetch_plans=params.get("prefetch_plans") == "on",
        overlap_decode=params.get("overlap_decode") == "on",
        compile=settings.compile, cuda_graphs=settings.cuda_graphs)
    attn = f", attention {attention.backend()}" if device.type == "cuda" else ""
    overlap = "; decodes overlapped with the next render" if pipe.overlap_decode else ""
    report(f"helios: every stage loaded in {time.perf_counter() - t0:.1f} s "
           f"({', '.join(pipe.accelerated) or 'eager'}{attn}){overlap}{gpu_memory(device)}")
    warm_up(pipe, report, speculative=params.get("speculative") == "on")
    return pipe


def warm_up(pipe, report: Callable[[str], None], speculative: bool) -> None:
    """One video through every context a stream meets (the refiner's history lengths, the
    AR's decode step, the decoder's first and later frames), decoded as the server's
    requests will be (``speculative``), so that compiling, capturing and tuning happen now."""
    t0 = time.perf_counter()
    cfg = pipe.config
    frames = cfg.frames_per_latent * (cfg.refiner.history_frames + 2)
    for i, _ in enumerate(pipe.generate("warm-up", num_frames=frames, seed=0,
                                        speculative=speculative)):
        report(f"helios: warm-up chunk {i} at {time.perf_counter() - t0:.1f} s")
    report(f"helios: warm-up video done{gpu_memory(pipe.device)}")


def gpu_memory(device) -> str:
    """", PyTorch holds A GiB of GPU memory (R reserved)" on CUDA, else "": for the load's log
    line, beside what nvidia-smi reads for the whole process."""
    if torch.device(device).type != "cuda":
        return ""
    gib = 1 << 30
    return (f", PyTorch holds {torch.cuda.memory_allocated(device) / gib:.1f} GiB of GPU memory "
            f"({torch.cuda.memory_reserved(device) / gib:.1f} reserved)")


def stream_threads(pipe, report: Callable[[str], None], speculative: bool) -> ThreadPoolExecutor:
    """The long-lived threads that run a fused pipeline's streams, one per stream it serves
    at once, each through its first use now: ``max_streams`` short videos at once, decoded as
    the requests will be (``speculative``), so that every thread's first GPU work and the
    batched AR rounds are behind us before the first request. A thread per request instead
    paid about 0.5 s at the start of each 14b stream on the H200 (docs/performance.md)."""
    t0 = time.perf_counter()
    n = pipe.max_streams
    pool = ThreadPoolExecutor(n, thread_name_prefix="helios-stream")
    frames = 2 * pipe.config.frames_per_latent
    warm = [pool.submit(pipe.generate_video, "warm-up", num_frames=frames, seed=i,
                        speculative=speculative) for i in range(n)]
    for future in warm:
        future.result()
    report(f"helios: {n} stream threads warmed up in {time.perf_counter() - t0:.1f} s"
           f"{gpu_memory(pipe.device)}")
    return pool


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


