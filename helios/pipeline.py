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
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .ar_runtime import ARRuntime
from .checkpoint import load_component, read_config
from .config import HeliosConfig
from .errors import HeliosError
from .sampling import INT64_MAX, SamplingParams
from .text_encoder import tokenize
from .vae import from_uint8, to_uint8

MAX_FPS = 60
_ids = itertools.count()


@dataclass(frozen=True)
class VideoRequest:
    """A validated generation request."""

    prompt: str
    num_frames: int
    fps: int
    sampling: SamplingParams
    image: np.ndarray | None = None
    speculative: bool = True

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


@dataclass
class VideoChunk:
    frames: np.ndarray   # uint8 [T, H, W, 3]
    offset: int          # index of the first frame in the video
    total: int           # frames in the whole video

    @property
    def final(self) -> bool:
        return self.offset + len(self.frames) >= self.total


def derive_seed(seed: int, *path: int) -> int:
    """A seed for one part of a request (an AR segment, a frame's noise), splitmix64-mixed so
    that the parts draw independent numbers. Both runtimes derive the same seeds."""
    x = seed & 0xFFFFFFFFFFFFFFFF
    for p in path:
        x = (x + 0x9E3779B97F4A7C15 * (p + 1)) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & INT64_MAX


AR_SEED, NOISE_SEED = 1, 2


@dataclass(frozen=True)
class Segment:
    """One stateless AR request: the context keeps the last ``kept`` frames' plan tokens
    (after the prompt and begin-of-video) and ``new`` frames are generated after them."""

    index: int
    first_frame: int   # index of the first new frame
    kept: int
    new: int


def ar_segments(cfg: HeliosConfig, num_latent: int, given: int = 0) -> list[Segment]:
    """Split a video into AR segments so that the context never exceeds the window.

    A segment fills the window; the next keeps its newest half (the older half is dropped, and
    the kept frames are re-encoded at their new positions once per half-window). ``given``
    frames (image-to-video) start the first segment's context.
    """
    window = cfg.ar_context_frames
    keep_after = window - max(1, window // 2)
    segments, done, kept = [], given, given
    while done < num_latent:
        new = min(window - kept, num_latent - done)
        segments.append(Segment(len(segments), done, kept, new))
        done += new
        kept = keep_after
    return segments


def codebook_bias(ar_cfg) -> torch.Tensor:
    """Logit bias that restricts sampling to plan tokens (TensorRT-LLM's embedding_bias)."""
    bias = torch.zeros(ar_cfg.vocab_size)
    bias[ar_cfg.codebook_size:] = float("-inf")
    return bias


def frame_noise(seed: int, index: int, shape) -> torch.Tensor:
    """The refiner's starting noise for latent frame ``index`` (float32, drawn on the CPU so
    that every device starts from the same numbers)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, NOISE_SEED, index))
    return torch.randn(shape, generator=gen)


class RefinerHistory:
    """The refiner's view of the past: the first latent frame and the most recent ones."""

    def __init__(self, history_frames: int):
        self.history_frames = history_frames
        self.anchor = None
        self.recent: list = []  # most recent first

    def push(self, latent) -> None:
        if self.anchor is None:
            self.anchor = latent
        else:
            self.recent = [latent, *self.recent][:self.history_frames]


def validate_request(cfg: HeliosConfig, prompt, *, duration_s=None, num_frames=None, fps=None,
                     seed=0, temperature=0.7, top_k=0, top_p=1.0, image=None,
                     speculative=True) -> VideoRequest:
    """Check every field and turn it into a VideoRequest; raises HeliosError naming the field."""
    tokenize(prompt, cfg.text_encoder.max_prompt_bytes)
    fps = cfg.fps if fps is None else fps
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or not 1 <= fps <= MAX_FPS:
        raise HeliosError("fps", f"must be an integer in [1, {MAX_FPS}], got {fps}")
    max_frames = int(cfg.max_duration_s * fps)
    if num_frames is None and duration_s is None:
        raise HeliosError("duration", "or num_frames must be given")
    if num_frames is None:
        d = duration_s
        if not isinstance(d, (int, float)) or not math.isfinite(d) or not 0 < d <= cfg.max_duration_s:
            raise HeliosError("duration", f"must be in (0, {cfg.max_duration_s:g}] seconds, got {d}")
        num_frames = max(1, round(d * fps))
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) \
            or not 1 <= num_frames <= max_frames:
        raise HeliosError("num_frames", f"must be an integer in [1, {max_frames}], got {num_frames}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise HeliosError("seed", f"must be an integer in [0, 2**63-1], got {seed!r}")
    params = SamplingParams(float(temperature) if isinstance(temperature, (int, float)) else temperature,
                            int(top_k) if isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool) else top_k,
                            float(top_p) if isinstance(top_p, (int, float)) else top_p,
                            int(seed)).validate()
    if image is not None:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
                or min(image.shape[:2]) < 8:
            raise HeliosError("image", f"must be a uint8 RGB array of shape [H, W, 3] with H, W >= 8, "
                                       f"got {image.dtype} {list(image.shape)}")
    return VideoRequest(prompt, int(num_frames), int(fps), params, image, bool(speculative))


class HeliosPipeline:
    def __init__(self, config: HeliosConfig, text_encoder, ar_backbone, draft, refiner, vae,
                 device="cpu", low_vram: bool = False, max_streams: int = 8):
        self.config = config
        self.device = torch.device(device)
        self.low_vram = low_vram and self.device.type == "cuda"
        self.text_encoder, self.ar_backbone, self.draft = text_encoder, ar_backbone, draft
        self.refiner, self.vae = refiner, vae
        self.dtype = next(ar_backbone.parameters()).dtype
        home = "cpu" if self.low_vram else self.device
        for m in self.modules():
            m.to(home).eval()
        per_stream = math.ceil((config.max_ar_positions() + config.speculative_tokens + 1)
                               / config.kv_block_size)
        self.ar = ARRuntime(ar_backbone, draft, num_blocks=max_streams * per_stream,
                            block_size=config.kv_block_size, device=self.device)

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

    # ---- stages ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str):
        """-> (prefix for the AR backbone [L, H], prefix for the draft [L, H_draft])."""
        ids = tokenize(prompt, self.config.text_encoder.max_prompt_bytes)
        with self._active(self.text_encoder):
            dev = next(self.text_encoder.parameters()).device
            x = torch.tensor([ids], device=dev)
            ar, dr = self.text_encoder(x, torch.tensor([len(ids)], device=dev))
        return ar[0], dr[0]

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> the first latent frame [1, C, h, w] (the image held 4 frames)."""
        cfg = self.config
        x = from_uint8(torch.from_numpy(np.ascontiguousarray(image))[None, None])[0]  # [1, 3, H, W]
        x = F.interpolate(x, size=(cfg.height, cfg.width), mode="bilinear", align_corners=False)
        frames = x[:, None].expand(1, cfg.frames_per_latent, 3, cfg.height, cfg.width)
        with self._active(self.vae):
            dev = next(self.vae.parameters()).device
            return self.vae.encode(frames.to(dev, self.dtype))

    # ---- the loop ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str, **kwargs) -> Iterator[VideoChunk]:
        """Stream a video: yields VideoChunk(frames uint8 [T, H, W, 3], offset, total).

        Keyword arguments: duration_s or num_frames, fps, seed, temperature, top_k, top_p,
        image (uint8 [H, W, 3], image-to-video), speculative. Invalid values raise HeliosError
        before any work starts.
        """
        req = validate_request(self.config, prompt, **kwargs)
        return self._run(req)

    def _run(self, req: VideoRequest) -> Iterator[VideoChunk]:
        """Decode each latent frame as soon as it exists (conditioned on the previous one)."""
        prev, emitted = None, 0
        for latent in self.latents(req):
            with self._active(self.vae):
                dev = self._dev(self.vae)
                pixels = self.vae.decode(latent.to(dev), None if prev is None else prev.to(dev))
            frames = to_uint8(pixels)[0].numpy()[:req.num_frames - emitted]
            yield VideoChunk(frames, emitted, req.num_frames)
            emitted += len(frames)
            prev = latent

    @torch.no_grad()
    def render(self, plan: list[int], index: int, seed: int, history: RefinerHistory):
        """Plan tokens of latent frame ``index`` -> that latent frame [1, C, h, w]."""
        cfg = self.config
        shape = (1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width)
        with self._active(self.refiner):
            dev = self._dev(self.refiner)
            return self.refiner.render(
                frame_noise(seed, index, shape).to(dev, self.dtype),
                torch.tensor([plan], device=dev),
                anchor=None if history.anchor is None else history.anchor.to(dev),
                history=[h.to(dev) for h in history.recent])

    @torch.no_grad()
    def latents(self, req: VideoRequest) -> Iterator[torch.Tensor]:
        """The latent frames of a request, one [1, C, h, w] tensor at a time."""
        cfg = self.config
        ar_cfg = self.ar_backbone.config
        n = cfg.plan_tokens_per_frame
        seed = req.sampling.seed
        speculative = req.speculative and self.draft is not None
        prefix, draft_prefix = self.encode_prompt(req.prompt)
        bias = codebook_bias(ar_cfg)
        history = RefinerHistory(cfg.refiner.history_frames)
        plans: list[list[int]] = []
        if req.image is not None:
            latent = self.encode_image(req.image)
            with self._active(self.refiner):
                plans.append(self.refiner.plan_tokenizer(
                    latent.to(self._dev(self.refiner)), self.refiner.plan_embed.weight)[0].tolist())
            history.push(latent)
            yield latent
        ar_modules = [m for m in (self.ar_backbone, self.draft) if m is not None]
        for seg in ar_segments(cfg, cfg.num_latent_frames(req.num_frames), len(plans)):
            seq = ("stream", next(_ids))
            context = [ar_cfg.bos_token_id] + [t for p in plans[len(plans) - seg.kept:] for t in p]
            params = dataclasses.replace(req.sampling, seed=derive_seed(seed, AR_SEED, seg.index))
            self.ar.add_sequence(seq, prefix, context, params, draft_prefix, bias)
            try:
                remaining, buf = seg.new * n, []
                while remaining:
                    with self._active(*ar_modules):
                        toks = self.ar.decode_round({seq: remaining}, speculative,
                                                    cfg.speculative_tokens)[seq]
                    buf += toks
                    remaining -= len(toks)
                    while len(buf) >= n:
                        plans.append(buf[:n])
                        buf = buf[n:]
                        latent = self.render(plans[-1], len(plans) - 1, seed, history)
                        history.push(latent)
                        yield latent
            finally:
                self.ar.free(seq)  # also when the consumer stops early (cancellation)

    def _dev(self, module):
        return next(module.parameters()).device

    def generate_video(self, prompt: str, **kwargs) -> np.ndarray:
        """The whole video at once: uint8 [T, H, W, 3]."""
        return np.concatenate([c.frames for c in self.generate(prompt, **kwargs)])
