"""The Helios pipeline: prompt -> streamed uint8 video chunks.

A thin loop over the four stages (text encoder, AR backbone, refiner, VAE decoder), one
latent frame at a time, yielding the frames of each latent frame as soon as they are decoded:

    prefix = text_encoder(prompt)                       once per request
    for each latent frame:
        plan  = ar_backbone: begin-of-frame, then plan_tokens_per_frame sampled tokens
        z     = refiner: noise -> latent in a few steps, given plan, anchor frame, history
        yield vae_decoder(z, previous z)                4 RGB frames

Memory stays bounded however long the video is: the AR context is a window of recent frames
after the prompt (``ar_segments``: each segment is one stateless AR request, as TensorRT-LLM
serves them), and the refiner sees the first latent frame plus the last few. Every random
draw comes from a seed derived from the request's seed (``derive_seed``), so the Triton
server, which runs the same schedule through its stage models, produces the same frames.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .accel import accelerate
from .ar_backbone import fuse_projections
from .ar_runtime import ARRuntime
from .ar_scheduler import ARJob, ARScheduler
from .checkpoint import load_component, read_config
from .config import HeliosConfig
from .fp8 import quantize_ar, quantize_refiner
from .kv_cache import host_to_device
from .orchestrator import stream_video
from .schedule import VideoChunk, VideoRequest, frame_noise, segment_keep, validate_request
from .session import PromptSwitches, scripted
from .tokenizer import tokenize
from .vae import fit_frames, from_uint8, to_uint8

_ids = itertools.count()


@torch.no_grad()
def encode_image(cfg: HeliosConfig, vae, refiner, image: np.ndarray):
    """Image-to-video: uint8 [H, W, 3] -> (first latent frame [1, C, h, w], its plan tokens).

    The image, resized to the configured size and held for 4 frames, is encoded by the VAE;
    the refiner's plan tokenizer turns that latent into the plan tokens the AR context needs.
    """
    p = next(vae.parameters())
    x = from_uint8(torch.from_numpy(np.ascontiguousarray(image))[None, None])[0]  # [1, 3, H, W]
    x = F.interpolate(x, size=(cfg.height, cfg.width), mode="bilinear", align_corners=False)
    frames = x[:, None].expand(1, cfg.frames_per_latent, 3, cfg.height, cfg.width)
    latent = vae.encode(frames.to(p.device, p.dtype))
    plan = refiner.plan_tokenizer(latent.to(next(refiner.parameters()).device),
                                  refiner.plan_embed.weight)
    return latent, plan[0].tolist()


def video_latents(cfg: HeliosConfig) -> int:
    """Latent frames of a clip that a continuation keeps: enough for the AR context of a
    segment after the first and for the refiner's anchor and history."""
    return max(segment_keep(cfg.ar_context_frames), cfg.refiner.history_frames + 1)


@torch.no_grad()
def encode_video(cfg: HeliosConfig, vae, refiner, video: np.ndarray):
    """Video continuation: uint8 [T, H, W, 3] -> (its last L latent frames [L, C, h, w], their
    plan tokens [L][n]), L = min(T // 4, video_latents(cfg)). Frames of another shape are
    cropped at their centre to the configured aspect ratio, then resized (bilinear)."""
    f = cfg.frames_per_latent
    n = min(len(video) // f, video_latents(cfg))
    clip = torch.from_numpy(np.ascontiguousarray(video[len(video) - n * f:]))
    x = fit_frames(from_uint8(clip[None])[0], cfg.height, cfg.width)  # [T, 3, H, W]
    p = next(vae.parameters())
    latents = vae.encode(x.view(n, f, 3, cfg.height, cfg.width).to(p.device, p.dtype))
    plans = refiner.plan_tokenizer(latents.to(next(refiner.parameters()).device),
                                   refiner.plan_embed.weight)
    return latents, plans.tolist()


class HeliosPipeline:
    """The four stages in one process; implements the stage functions of ``orchestrator``."""

    def __init__(self, config: HeliosConfig, text_encoder, ar_backbone, draft, refiner, vae,
                 device="cpu", low_vram: bool = False, max_streams: int = 8,
                 ar_fp8: bool = False, prefetch_plans: bool = False, refiner_fp8: bool = False,
                 compile: bool = True, cuda_graphs: bool = True, shared_ar: bool = False,
                 overlap_decode: bool | None = None):
        self.config, self.max_streams = config, max_streams
        self.device = torch.device(device)
        self.low_vram = low_vram and self.device.type == "cuda"
        self.text_encoder, self.ar_backbone, self.draft = text_encoder, ar_backbone, draft
        self.refiner, self.vae = refiner, vae
        self.dtype = next(ar_backbone.parameters()).dtype
        home = "cpu" if self.low_vram else self.device
        for m in self.modules():
            m.to(home).eval()
        if refiner_fp8:  # e4m3 matmuls in the refiner's blocks, before compiling (helios/fp8.py)
            quantize_refiner(refiner)
        self.accelerated = [] if self.low_vram else accelerate(self.device, refiner, vae,
                                                               compile, cuda_graphs)
        if refiner_fp8:
            self.accelerated.append("refiner matmuls fp8")
        if ar_fp8:  # e4m3 weights for the AR backbone's projections (helios/fp8.py)
            quantize_ar(ar_backbone)
            self.accelerated.append("AR weights fp8")
        elif self.device.type == "cuda":
            # q/k/v and gate/up each one matrix (quantize_ar fuses them too): a decode step
            # reads the same bytes in 4 products a layer instead of 7 (docs/performance.md).
            fuse_projections(ar_backbone)
            self.accelerated.append("AR projections fused")
        # CUDA graphs for the decode step on a GPU; not with --low-vram, where the weights move
        # between steps and a captured graph would read freed memory.
        graphs = self.device.type == "cuda" and not self.low_vram and cuda_graphs
        self.ar = ARRuntime(ar_backbone, draft, num_blocks=max_streams * config.kv_blocks_per_stream(),
                            block_size=config.kv_block_size, device=self.device,
                            cuda_graphs=graphs, max_positions=config.max_ar_positions(),
                            compile_steps=compile)
        self._ar_lock = threading.Lock()  # one ARRuntime, possibly several prefetch threads
        # ``shared_ar``: up to ``max_streams`` streams at once, each iterated in a thread of its
        # own (a server's requests). Their AR segments go to one ARScheduler, which decodes
        # every live sequence in one batched round on a high-priority CUDA stream, ahead of
        # the rendering (so prefetch_plans has nothing left to do); their renders and decodes
        # take turns on the GPU in the order they were asked for (``_turns``): the refiner's
        # and decoder's CUDA graphs have one set of input buffers each.
        self.scheduler: ARScheduler | None = None
        self._turns = _Turns() if shared_ar else contextlib.nullcontext()
        self._local = threading.local()  # the plan stream a thread is iterating (shared_ar)
        if shared_ar:
            prefetch_plans = False
        # ``prefetch_plans``: the AR backbone (memory-bound) decodes the next frames' plan
        # tokens in a thread, on a CUDA stream of its own, while the refiner (compute-bound)
        # renders. Off by default and never with --low-vram: with the compiled refiner the 14b
        # warm-up video did not finish on the H100 (docs/performance.md), and a decode step
        # needs the whole GPU's bandwidth anyway.
        self.prefetch_plans = prefetch_plans and not self.low_vram
        # ``overlap_decode``: one stream's latent frame is decoded and the next one's render
        # queued behind it before the host waits for the decoded frames (``refine_and_decode``),
        # so that the host's work between two renders (the chunk on its way out, the next
        # frame's noise and inputs) runs while the GPU renders instead of between its renders.
        # A chunk then leaves after the next render was queued, not after it ran: on a GPU
        # that costs the chunk the time to queue a render; on a CPU, where each call runs as it
        # is made, it costs a render. So by default (None) on CUDA alone, where it gained 4 %
        # at 14b on an H200 (docs/performance.md). Not with shared_ar, whose streams take
        # turns, nor --low-vram.
        if overlap_decode is None:
            overlap_decode = self.device.type == "cuda"
        self.overlap_decode = overlap_decode and not self.low_vram and not shared_ar
        self._ar_cuda_stream = None
        if self.prefetch_plans:
            # Compiled and captured here, before any prefetch thread exists: a graph capture
            # must not run while another thread uses the GPU.
            self.ar.prepare_static([1])
            if self.device.type == "cuda":
                # High priority: a decode step is a chain of small launches that the
                # refiner's large matrix products would otherwise keep waiting.
                self._ar_cuda_stream = torch.cuda.Stream(self.device, priority=-1)
        if shared_ar:
            # Every batch size built before the scheduler thread starts (no graph capture
            # while another thread uses the GPU).
            self.ar.prepare_static(range(1, max_streams + 1))
            self.scheduler = ARScheduler(self.ar, config.num_draft_tokens,
                                         group=config.plan_tokens_per_frame)

    def modules(self):
        return [m for m in (self.text_encoder, self.ar_backbone, self.draft, self.refiner, self.vae)
                if m is not None]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device="cpu", dtype: torch.dtype | None = None,
                        low_vram: bool = False, **kw) -> "HeliosPipeline":
        cfg = read_config(path)
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        load_dev = "cpu" if low_vram else device
        parts = {n: load_component(path, n, cfg, load_dev, dtype)
                 for n in ("text_encoder", "ar_backbone", "draft", "refiner", "vae")}
        return cls(cfg, **parts, device=device, low_vram=low_vram, **kw)

    @contextlib.contextmanager
    def _active(self, *modules):
        """With --low-vram only the stage that is running sits on the GPU."""
        if not self.low_vram:
            yield
            return
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")
            torch.cuda.empty_cache()

    @staticmethod
    def _dev(module):
        return next(module.parameters()).device

    # ---- the stage functions -----------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str):
        """-> (prefix for the AR backbone [L, H], prefix for the draft [L, H_draft])."""
        ids = tokenize(prompt, self.config.text_encoder.max_prompt_bytes)
        with self._active(self.text_encoder):
            dev = self._dev(self.text_encoder)
            ar, dr = self.text_encoder(torch.tensor([ids], device=dev),
                                       torch.tensor([len(ids)], device=dev))
        return ar[0], dr[0]

    @torch.no_grad()
    def encode_image(self, image: np.ndarray):
        """uint8 [H, W, 3] -> (first latent frame [1, C, h, w], its plan tokens)."""
        with self._active(self.vae, self.refiner), self._turns:
            return encode_image(self.config, self.vae, self.refiner, image)

    @torch.no_grad()
    def encode_video(self, video: np.ndarray):
        """uint8 [T, H, W, 3] -> (latent frames [1, C, h, w] each, their plan tokens)."""
        with self._active(self.vae, self.refiner), self._turns:
            latents, plans = encode_video(self.config, self.vae, self.refiner, video)
        return [z[None] for z in latents], plans

    @torch.no_grad()
    def ar_stream(self, prefix, draft_prefix, tokens, n, params, bias, speculative):
        """Stream ``n`` plan tokens after the context prefix + tokens (one AR segment)."""
        seq = ("stream", next(_ids))
        speculative = speculative and self.draft is not None
        if self.scheduler is not None:
            return self._scheduled(f"{seq[0]}-{seq[1]}", prefix, draft_prefix, tokens, n, params,
                                   bias, speculative)
        return self._decoded(seq, prefix, draft_prefix, tokens, n, params, bias, speculative)

    def _scheduled(self, request_id, prefix, draft_prefix, tokens, n, params, bias, speculative):
        """``ar_stream`` through the shared scheduler: the request goes out now, the tokens
        come from its rounds; closing the iterator stops the request (its KV blocks are freed
        at the next round)."""
        if prefix.is_cuda:  # the prefix was written on this thread's stream, read on another
            done = torch.cuda.Event()
            done.record()
            done.synchronize()
        out: queue.Queue = queue.Queue()
        stopped = threading.Event()
        delivered = [0]  # tokens decoded so far
        # The first segment after a start or a switch decodes its first frame's tokens, then
        # waits until the consumer asks for the next frame: that frame renders (and its chunk
        # leaves) with the GPU to itself, for the latency of the first frame and of a switch.
        plans = getattr(self._local, "plans", None)
        first_frame = self.config.plan_tokens_per_frame
        urgent = plans is not None and plans.asked <= 1

        def emit(new):
            delivered[0] += len(new)
            out.put(new)

        self.scheduler.submit(ARJob(
            request_id, prefix, draft_prefix, list(tokens), n, params, bias, speculative,
            emit=emit, finish=lambda error: out.put(_ARDone(error)), cancelled=stopped.is_set,
            held=lambda: urgent and delivered[0] >= first_frame and plans.asked <= 1))

        def tokens_out():
            try:
                while not isinstance(item := out.get(), _ARDone):
                    yield item
                if item.error is not None:
                    raise RuntimeError(item.error)
            finally:
                stopped.set()

        return tokens_out()

    @torch.no_grad()
    def _decoded(self, seq, prefix, draft_prefix, tokens, n, params, bias, speculative):
        """``ar_stream`` on this thread: one decode round after another."""
        with self._ar_lock:
            self.ar.add_sequence(seq, prefix, tokens, params, draft_prefix, bias)
        modules = [m for m in (self.ar_backbone, self.draft) if m is not None]

        def rounds():
            remaining = n
            while remaining:
                with self._ar_lock:
                    new = self.ar.decode_round({seq: remaining}, speculative,
                                               self.config.num_draft_tokens,
                                               self.config.plan_tokens_per_frame)[seq]
                remaining -= len(new)
                yield new

        try:
            if self.low_vram:  # the weights move once per segment, not once per token
                with self._active(*modules):
                    decoded = list(rounds())
                yield from decoded
            else:
                yield from rounds()
        finally:
            with self._ar_lock:
                self.ar.free(seq)  # also when the consumer stops early (cancellation)

    def close(self) -> None:
        """Stop the shared AR scheduler's thread (``shared_ar``); streams still running fail."""
        if self.scheduler is not None:
            self.scheduler.close()

    def prefetch(self, plans: Iterator[list[int]]) -> Iterator[list[int]]:
        """The plan-token stream run ahead in a thread (``prefetch_plans``); with
        ``shared_ar``, counted (``_Asked``); else as it is."""
        if self.scheduler is not None:
            return _Asked(plans, self._local, self.scheduler.wake)
        if not self.prefetch_plans:
            return plans
        return _Prefetch(plans, self._ar_cuda_stream, depth=self.config.ar_context_frames)

    @torch.no_grad()
    def refine(self, plan, index, seed, anchor, history):
        """Plan tokens of latent frame ``index`` -> that latent frame [1, C, h, w]."""
        cfg = self.config
        shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
        with self._active(self.refiner), self._turns:
            dev = self._dev(self.refiner)
            # Copied without waiting for the GPU, so that a render queued behind a decode
            # (overlap_decode) does not wait for it to be queued.
            return self.refiner.render(
                host_to_device(frame_noise(seed, index, shape), dev).to(self.dtype),
                host_to_device([list(plan)], dev),
                anchor=None if anchor is None else anchor.to(dev),
                history=[h.to(dev) for h in history])

    @torch.no_grad()
    def decode(self, latent, prev_latent):
        """Latent frame (+ the previous one) -> uint8 [4, H, W, 3]."""
        frames, done = self._queue_decode(latent, prev_latent)
        if done is not None:
            done.synchronize()
        return frames[0].numpy()

    @property
    def refine_and_decode(self):
        """The orchestrator's ``refine_and_decode`` where ``overlap_decode`` is on, else None."""
        return self._refine_and_decode if self.overlap_decode else None

    def _refine_and_decode(self, refine, decode):
        """Decode one latent frame, queue the next one's render behind it, then wait for the
        decoded frames: ``(refine(*refine), decode(*decode))``, in the order of the GPU."""
        frames, done = self._queue_decode(*decode)
        latent = self.refine(*refine)
        if done is not None:
            done.synchronize()
        return latent, frames[0].numpy()

    @torch.no_grad()
    def _queue_decode(self, latent, prev_latent):
        """The decode and the frames' copy to the host, queued on a GPU: (uint8 frames on the
        host [1, 4, H, W, 3], the event to wait for before reading them, None on a CPU). The
        copy is waited for after this stream's turn (shared_ar), so that the next stream's
        render queues behind it without the GPU going idle."""
        with self._active(self.vae), self._turns:
            dev = self._dev(self.vae)
            pixels = self.vae.decode(latent.to(dev),
                                     None if prev_latent is None else prev_latent.to(dev))
            if dev.type != "cuda":
                return to_uint8(pixels), None
            frames = to_uint8(pixels, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return frames, done

    # ---- the loop ----------------------------------------------------------------------
    def generate(self, prompt: str, prompt_at=None, **kwargs) -> Iterator[VideoChunk]:
        """Stream a video: yields VideoChunk(frames uint8 [T, H, W, 3], offset, total).

        Keyword arguments: duration_s or num_frames, fps, seed, temperature, top_k, top_p,
        image (uint8 [H, W, 3], image-to-video), video (uint8 [T, H, W, 3]: the clip to
        continue; the chunks are the continuation), speculative; ``prompt_at``: scripted prompt
        switches, [(seconds, prompt), ...]. Invalid values raise HeliosError before any work
        starts.
        """
        req = validate_request(self.config, prompt, **kwargs)
        if not prompt_at:
            return self.run(req)
        return iter(Session(self, req, scripted(self.config, req.num_frames, req.fps, prompt_at)))

    def session(self, prompt: str, **kwargs) -> "Session":
        """A stream whose prompt can change while it plays (``Session.update``); the same
        keyword arguments as ``generate``."""
        req = validate_request(self.config, prompt, **kwargs)
        return Session(self, req, PromptSwitches(self.config, req.num_frames))

    def run(self, req: VideoRequest, switches: PromptSwitches | None = None) -> Iterator[VideoChunk]:
        return stream_video(self.config, req, self, switches=switches)

    def latents(self, req: VideoRequest) -> Iterator[torch.Tensor]:
        """The latent frames of a request, undecoded (the reference for streamed decoding)."""
        recorder = _LatentRecorder(self)
        for _ in stream_video(self.config, req, recorder):
            yield recorder.latents[-1]

    def generate_video(self, prompt: str, **kwargs) -> np.ndarray:
        """The whole video at once: uint8 [T, H, W, 3]."""
        return np.concatenate([c.frames for c in self.generate(prompt, **kwargs)])


class Session:
    """A running stream whose prompt can be changed between latent frames.

    Iterate it for the VideoChunks; call ``update(prompt, at_frame=None)`` from any thread
    (between chunks, or from another thread while they come): the new prompt holds from
    ``at_frame`` (rounded up to a latent-frame boundary), or from the next latent frame not
    yet rendered; it returns that frame. Bad or late updates raise HeliosError, and leave
    the stream as it was. ``switches.applied`` lists the switches made so far. A player that
    shows the frames calls ``shown(frame)`` now and then: a paced stream (``pace_s``) then
    keeps its lead over the picture itself.
    """

    def __init__(self, pipe: HeliosPipeline, request: VideoRequest, switches: PromptSwitches):
        self.request, self.switches = request, switches
        self._chunks = pipe.run(request, switches)

    def __iter__(self) -> Iterator[VideoChunk]:
        return self._chunks

    def update(self, prompt: str, at_frame: int | None = None) -> int:
        return self.switches.update(prompt, at_frame)

    def shown(self, frame: int) -> None:
        """The player shows ``frame`` now: a paced stream keeps its lead over that frame."""
        self.switches.shown(frame)

    def close(self) -> None:
        """Stop the stream (its AR sequence and KV blocks are freed)."""
        self._chunks.close()
        self.switches.end()


class _ARDone:
    """The end of a scheduled AR request: None, or why it failed."""

    def __init__(self, error: str | None):
        self.error = error


class _Asked:
    """A stream's plan frames (one start or switch: ``orchestrator.plan_stream``), counting the
    frames its consumer has asked for; while it is being asked, the thread's ``local.plans``
    names it, so that the AR requests it makes know whose they are."""

    def __init__(self, source: Iterator, local: threading.local, asked_more):
        self.source, self.local, self.asked_more = source, local, asked_more
        self.asked = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.asked += 1
        if self.asked == 2:
            self.asked_more()  # its first AR request may be held until now
        self.local.plans = self
        try:
            return next(self.source)
        finally:
            self.local.plans = None

    def close(self):
        self.source.close()


class _Turns:
    """A lock granted in the order it was asked for: streams sharing the GPU render in turn,
    none of them starved."""

    def __init__(self):
        self._cond = threading.Condition()
        self._asked = self._served = 0

    def __enter__(self):
        with self._cond:
            ticket, self._asked = self._asked, self._asked + 1
            self._cond.wait_for(lambda: self._served == ticket)

    def __exit__(self, *exc):
        with self._cond:
            self._served += 1
            self._cond.notify_all()


# How often a prefetching thread that waits for room in its queue looks whether it was closed
# meanwhile; close() does not wait for it (it makes the room).
_PUT_POLL_S = 0.05


class _Prefetch:
    """Iterates ``source`` in a thread, up to ``depth`` items ahead of the consumer, on
    ``stream`` (a CUDA stream, or None). Errors reach the consumer at the item where they
    happened; close() stops the thread and closes ``source`` there.

    After the first item the thread waits until the consumer asks for the second: the first
    plan's render (a stream's first chunk, or the first under a new prompt) then has the GPU
    to itself, where the AR's steps decoding ahead on their high-priority stream would take
    turns with it. With them, that render took 77-117 ms of a 14b stream's first frame on an
    H200; with the wait 50-54 ms, as without this thread (``fps.py``'s first frame by stage,
    2026-12-03, docs/performance.md).

    close() empties the queue, so that a thread waiting for room in it (the usual place of a
    thread that runs ahead) stops at once instead of at its next look at ``stop``."""

    _END = object()

    def __init__(self, source: Iterator, stream, depth: int):
        self.items: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.asked = 0                  # items the consumer has asked for
        self.ahead = threading.Event()  # set when it asks for the second
        if stream is not None:  # what the consumer's stream wrote so far (the prompt prefix)
            stream.wait_stream(torch.cuda.current_stream(stream.device))
        self.thread = threading.Thread(target=self._run, args=(source, stream), daemon=True,
                                       name="helios-ar-prefetch")
        self.thread.start()

    def _run(self, source, stream):
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        error = None
        with ctx, torch.no_grad():
            try:
                for i, item in enumerate(source):
                    if not self._put((item, None)) or (i == 0 and not self._hold()):
                        return
            except BaseException as e:  # handed to the consumer
                error = e
            finally:
                source.close()
        self._put((self._END, error))

    def _hold(self) -> bool:
        """Wait until the consumer asks for the second item; False if closed meanwhile."""
        self.ahead.wait()
        return not self.stop.is_set()

    def _put(self, entry) -> bool:
        """Queue ``entry``; False once closed (an entry queued after close() stops it too)."""
        while not self.stop.is_set():
            try:
                self.items.put(entry, timeout=_PUT_POLL_S)
                return not self.stop.is_set()
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self.stop.is_set():
            raise StopIteration
        self.asked += 1
        if self.asked == 2:
            self.ahead.set()
        item, error = self.items.get()
        if item is self._END:
            self.stop.set()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self):
        self.stop.set()
        self.ahead.set()  # a thread holding after the first item stops at once
        while True:       # and one waiting for room in the queue gets it
            try:
                self.items.get_nowait()
            except queue.Empty:
                break
        self.thread.join()


class _LatentRecorder:
    """A pipeline's stages, except that ``decode`` records the latent instead of decoding it."""

    refine_and_decode = None  # every decode goes through ``decode``

    def __init__(self, pipe: HeliosPipeline):
        self.pipe = pipe
        self.latents: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def decode(self, latent, prev_latent):
        self.latents.append(latent)
        cfg = self.pipe.config  # full-size frames: a continuation's dissolve blends into them
        return np.zeros((cfg.frames_per_latent, cfg.height, cfg.width, 3), np.uint8)
