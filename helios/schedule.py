"""What a request is and how it is scheduled, shared by every runtime.

Validation of the request fields (one HeliosError per bad field), the AR segments that keep
the context bounded, the seeds derived from the request's seed, the logit bias that keeps
sampling inside the codebook, the refiner's noise and its history window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .config import HeliosConfig
from .errors import HeliosError
from .sampling_params import INT64_MAX, SamplingParams
from .tokenizer import tokenize

if TYPE_CHECKING:  # torch is imported where a tensor is made: the request checks need none
    import torch

MAX_FPS = 60
MAX_PACE_S = 60.0  # the most a paced stream may run ahead of its player


@dataclass(frozen=True)
class VideoRequest:
    """A validated generation request."""

    prompt: str
    num_frames: int
    fps: int
    sampling: SamplingParams
    image: np.ndarray | None = None
    speculative: bool = True
    video: np.ndarray | None = None   # a clip to continue: uint8 [T, H, W, 3]
    # Generate at most this many seconds of video ahead of a player that started at the first
    # chunk (None: as fast as the stages go). What a person watching and steering wants: a
    # prompt switch then shows within about that lead, not after everything already made.
    pace_s: float | None = None

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
    """One stateless AR request: the context holds ``kept`` frames' plan tokens (after the
    prompt and begin-of-video) and ``new`` frames are generated after them. The first
    ``sink`` of the kept frames are the generation's first frames (``sink_frames``), the
    rest the newest ones before ``first_frame``."""

    index: int
    first_frame: int   # index of the first new frame
    kept: int
    new: int
    sink: int = 0


def segment_keep(window: int) -> int:
    """Latent frames of plan tokens a segment after the first keeps of the one before: the
    newest half of the window (the older half is dropped, and the kept frames are re-encoded
    at their new positions once per half-window). Training shows the AR exactly these
    continuation windows."""
    return window - max(1, window // 2)


def sink_frames(window: int) -> int:
    """Of the frames a segment after the first keeps (``segment_keep``), how many are the
    generation's first frames rather than the newest: half of them (2 of 4 at tiny's window
    of 8). The first frames the generation saw or made (a video's start, the clip a video
    continues, the start under a new prompt) stay in every later segment's context, an
    attention sink of frames, so the AR's colour and shape stay those of the start: without
    it the tiny AR, copying its own recent frames, drifted (a cyan circle was green after 2 s
    and magenta after 8 of 60); with 2 sink frames, 5 prompts kept their colour in 100 % of
    their seconds over 60 s (docs/sessions.md). Training shows the AR the same windows
    (``helios.training.ar.ar_batch``)."""
    return segment_keep(window) // 2


def switch_keep(cfg: HeliosConfig) -> int:
    """Latent frames of plan tokens that the AR context keeps at a prompt switch: none. The AR
    starts a new segment under the new prompt, as a video starts, and the picture's continuity
    comes from the refiner, which keeps its anchor and history. Measured on held-out prompt
    pairs (docs/sessions.md): an AR never trained on a context that disagrees with its caption
    copies the context, so with the newest half of the window kept (4 latent frames at tiny)
    12.5 % of 24 switches took the new colour; with none kept, 100 %."""
    return 0


def ar_segments(cfg: HeliosConfig, num_latent: int, given: int = 0,
                kept: int | None = None) -> list[Segment]:
    """Split a video into AR segments so that the context never exceeds the window.

    A segment fills the window; the next keeps ``segment_keep`` frames: the ``sink_frames``
    first of the generation, then the newest. Generation starts at frame ``given`` (after an
    image, or at a prompt switch), and the first segment's context keeps ``kept`` of the
    frames before it (all ``given`` by default); the generation's first frames start there.
    """
    window = cfg.ar_context_frames
    keep_after, sink_after = segment_keep(window), sink_frames(window)
    kept = given if kept is None else kept
    segments, done, sink = [], given, 0
    while done < num_latent:
        new = min(window - kept, num_latent - done)
        segments.append(Segment(len(segments), done, kept, new, sink))
        done += new
        kept, sink = keep_after, sink_after
    return segments


def _plan_vocab_row(ar_cfg) -> np.ndarray:
    bias = np.zeros(ar_cfg.vocab_size, np.float32)
    # A large finite value, not -inf: TensorRT-LLM adds this bias inside its sampling kernels.
    bias[ar_cfg.plan_vocab_size:] = -1e9
    return bias


def plan_vocab_bias(ar_cfg) -> torch.Tensor:
    """Logit bias that restricts sampling to plan tokens (TensorRT-LLM's embedding_bias)."""
    import torch  # noqa: PLC0415  (see the imports above)
    return torch.from_numpy(_plan_vocab_row(ar_cfg))


def plan_bias(cfg: HeliosConfig) -> np.ndarray:
    """[slots, vocab] logit bias of a frame's plan tokens: with geometry tokens, each slot of
    the frame is kept to its own ids (region slots to the codebook, the row slot to the row
    bins, ...), so that a sampled region code never lands in a geometry slot, after which the
    AR loses the frame layout (docs/training.md). Without: ``plan_vocab_bias``'s one
    row. The AR runtime applies row j to the generated tokens j, j + slots, ...; generation
    always starts at a frame's first slot. float32, in numpy: the orchestrator makes it,
    and the ``helios`` model that runs the orchestrator over the stage models has no torch."""
    bias = _plan_vocab_row(cfg.ar_backbone)
    rf = cfg.refiner
    if not rf.geometry_bins:
        return bias[None]
    rows = np.tile(bias, (cfg.plan_tokens_per_frame, 1))
    rows[:rf.region_tokens, rf.codebook_size:] = -1e9
    start = rf.codebook_size
    for slot, n in enumerate(rf.geometry_bins, start=rf.region_tokens):
        rows[slot, :start] = -1e9
        rows[slot, start + n:] = -1e9
        start += n
    return rows


def frame_noise(seed: int, index: int, shape) -> torch.Tensor:
    """The refiner's starting noise for latent frame ``index`` (float32, drawn on the CPU so
    that every device starts from the same numbers)."""
    import torch  # noqa: PLC0415  (see the imports above)
    gen = torch.Generator().manual_seed(derive_seed(seed, NOISE_SEED, index))
    return torch.randn(shape, generator=gen)


class ContextFrames:
    """The refiner's view of the past: the *anchor* (the video's first latent frame) and the
    *history* (the last ``history_frames`` latent frames after it, most recent first). The
    anchor is never part of the history. Inference pushes latents, training frame indices."""

    def __init__(self, history_frames: int):
        self.history_frames = history_frames
        self.anchor = None
        self.history: list = []

    def push(self, latent) -> None:
        if self.anchor is None:
            self.anchor = latent
        else:
            self.history = [latent, *self.history][:self.history_frames]


def check_image(image) -> np.ndarray:
    """The first frame of image-to-video: a uint8 RGB array [H, W, 3], H and W >= 8."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
            or min(image.shape[:2]) < 8:
        raise HeliosError("image", f"must be a uint8 RGB array of shape [H, W, 3] with H, W >= 8, "
                                   f"got {image.dtype} {list(image.shape)}")
    return image


def centre_crop(h: int, w: int, height: int, width: int) -> tuple[slice, slice]:
    """The rows and columns of an h x w frame kept to fit it to height x width: the centre of
    the frame at the target's aspect ratio (then resized). How a clip to continue is fitted."""
    if h * width > w * height:   # taller than the target: crop rows
        keep = round(w * height / width)
        return slice((h - keep) // 2, (h - keep) // 2 + keep), slice(0, w)
    if h * width < w * height:   # wider: crop columns
        keep = round(h * width / height)
        return slice(0, h), slice((w - keep) // 2, (w - keep) // 2 + keep)
    return slice(0, h), slice(0, w)


MAX_VIDEO_FRAMES = 120   # the clip a video continues: at most 5 s at 24 fps
MAX_VIDEO_SIDE = 2048


def check_video(video, min_frames: int) -> np.ndarray:
    """The clip a video continues: uint8 RGB frames [T, H, W, 3], T in [min_frames, 120]
    (at least one latent frame), H and W in [8, 2048]."""
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[3] != 3 \
            or not 8 <= min(video.shape[1:3]) <= max(video.shape[1:3]) <= MAX_VIDEO_SIDE \
            or not min_frames <= video.shape[0] <= MAX_VIDEO_FRAMES:
        raise HeliosError("video", f"must be uint8 RGB frames [T, H, W, 3] with T in "
                                   f"[{min_frames}, {MAX_VIDEO_FRAMES}] and H, W in [8, "
                                   f"{MAX_VIDEO_SIDE}], got {video.dtype} {list(video.shape)}")
    return video


def validate_request(cfg: HeliosConfig, prompt, *, duration_s=None, num_frames=None, fps=None,
                     seed=0, temperature=0.7, top_k=0, top_p=1.0, image=None,
                     speculative=True, video=None, pace_s=None) -> VideoRequest:
    """Check every field and turn it into a VideoRequest; raises HeliosError naming the field."""
    tokenize(prompt, cfg.text_encoder.max_prompt_bytes)
    fps = cfg.fps if fps is None else fps
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or not 1 <= fps <= MAX_FPS:
        raise HeliosError("fps", f"must be an integer in [1, {MAX_FPS}], got {fps}")
    max_frames = int(cfg.max_duration_s * fps)
    if num_frames is None and duration_s is None:
        raise HeliosError("duration", "or num_frames must be given")
    if duration_s is not None:  # checked even where num_frames decides the length
        d = duration_s
        if not isinstance(d, (int, float)) or not math.isfinite(d) or not 0 < d <= cfg.max_duration_s:
            raise HeliosError("duration", f"must be in (0, {cfg.max_duration_s:g}] seconds, got {d}")
    if num_frames is None:
        num_frames = max(1, round(duration_s * fps))
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) \
            or not 1 <= num_frames <= max_frames:
        raise HeliosError("num_frames", f"must be an integer in [1, {max_frames}], got {num_frames}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise HeliosError("seed", f"must be an integer in [0, 2**63-1], got {seed!r}")
    params = SamplingParams(float(temperature) if isinstance(temperature, (int, float)) else temperature,
                            int(top_k) if isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool) else top_k,
                            float(top_p) if isinstance(top_p, (int, float)) else top_p,
                            int(seed)).validate()
    image = None if image is None else check_image(image)
    if video is not None:
        video = check_video(video, cfg.frames_per_latent)
        if image is not None:
            raise HeliosError("video", "cannot be given with image: a video continues a clip "
                                       "or starts from an image, not both")
    if pace_s is not None and (isinstance(pace_s, bool) or not isinstance(pace_s, (int, float))
                               or not math.isfinite(pace_s) or not 0 <= pace_s <= MAX_PACE_S):
        raise HeliosError("pace", f"must be in [0, {MAX_PACE_S:g}] seconds, got {pace_s}")
    return VideoRequest(prompt, int(num_frames), int(fps), params, image, bool(speculative),
                        video, None if pace_s is None else float(pace_s))


