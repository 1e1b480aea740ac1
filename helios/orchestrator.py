"""The per-request schedule of Helios, independent of where the stages run.

``stream_video`` turns a validated request into uint8 frame chunks by calling five stage
functions. ``HeliosPipeline`` implements them in-process (PyTorch modules); the Triton
``helios`` model implements them as BLS calls to the stage models. Both therefore run the
same schedule and, for the same seed, produce the same frames.

Stage functions (``Stages``):
    encode_prompt(prompt) -> (prefix [L, H], draft prefix [L, H_draft])
    encode_image(image uint8 [H, W, 3]) -> (latent [1, C, h, w], plan tokens of that frame)
    encode_video(clip uint8 [T, H, W, 3]) -> (latent frames [1, C, h, w] each, their plan
        tokens): the end of the clip a continuation starts from
    ar_stream(prefix, draft_prefix, tokens, n, params, bias, speculative) -> iterator of
        token lists, n tokens in all; closing it early stops and frees the AR sequence
    refine(plan, index, seed, anchor, history) -> latent [1, C, h, w]
    decode(latent, prev_latent or None) -> uint8 [4, H, W, 3]
    prefetch(iterator) -> iterator (optional): runs the plan-token stream ahead of rendering
    refine_and_decode(refine_args, decode_args) -> (latent, frames) (optional): both at once,
        as ``refine(*refine_args)`` and ``decode(*decode_args)``

``ar_stream`` should send its AR request when called, not when first iterated: the next
segment's request then goes out before the current segment's last frame is rendered.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Protocol

import numpy as np

from .config import HeliosConfig
from .schedule import (AR_SEED, ContextFrames, VideoChunk, VideoRequest, ar_segments,
                       centre_crop, derive_seed, plan_bias, segment_keep, switch_keep)
from .session import PromptSwitches


class Stages(Protocol):
    def encode_prompt(self, prompt: str): ...
    def encode_image(self, image: np.ndarray): ...
    def ar_stream(self, prefix, draft_prefix, tokens, n, params, bias, speculative): ...
    def refine(self, plan, index, seed, anchor, history): ...
    def decode(self, latent, prev_latent): ...


def stream_video(cfg: HeliosConfig, req: VideoRequest, stages: Stages,
                 cancelled: Callable[[], bool] | None = None,
                 switches: PromptSwitches | None = None) -> Iterator[VideoChunk]:
    """Yield the video of ``req`` chunk by chunk (4 frames per latent frame, the last one
    trimmed to ``req.num_frames``). Stops early, releasing the AR stream, when ``cancelled()``
    turns true or the consumer closes the generator.

    The plan tokens come from ``plan_stream``; a ``stages.prefetch(iterator)``, where the
    stages have one, runs it ahead of the rendering (the in-process pipeline overlaps the AR
    with the refiner that way). ``switches`` (helios.session) may change the prompt between
    latent frames: the plan tokens decoded ahead of the switch are dropped, and a new AR
    segment starts there under the new prompt. With ``req.pace_s`` set, each latent frame waits
    until the frames already out are at most that far ahead of the player (``Pacer``; the
    player's own reports come through ``switches.shown``), so that a switch is seen soon after
    it is asked for."""
    prefix, draft_prefix = stages.encode_prompt(req.prompt)
    pacer = Pacer(req.pace_s, req.fps, cancelled, None if switches is None else switches.player)
    context = ContextFrames(cfg.refiner.history_frames)
    plans: list[list[int]] = []
    state = {"prev": None, "emitted": 0}
    fade = SwitchFade(cfg.switch_fade_frames)

    def emit(latent, frames) -> VideoChunk:
        pacer.sent(state["emitted"])
        frames = fade(frames[:req.num_frames - state["emitted"]], state["emitted"])
        out = VideoChunk(frames, state["emitted"], req.num_frames)
        state["emitted"] += len(frames)
        state["prev"] = latent
        return out

    def chunk(latent) -> VideoChunk:
        context.push(latent)
        return emit(latent, stages.decode(latent, state["prev"]))

    given = 0  # latent frames of a clip that the video continues (not emitted)
    if req.video is not None:
        latents, video_plans = stages.encode_video(req.video)
        for latent in latents:
            context.push(latent)
        plans.extend(list(p) for p in video_plans)
        state["prev"] = latents[-1]
        given = len(plans)
        # The model's first frame is as far from the clip's last as the VAE's reconstruction
        # of it (about 4x the clip's own frame change on the tiny model): the continuation
        # dissolves in from the clip's last frame, as a switch does from the frame before it.
        fade.begin_from(fitted_frame(req.video[-1], cfg.height, cfg.width), 0)
    if req.image is not None:
        latent, plan = stages.encode_image(req.image)
        plans.append(list(plan))
        if switches is not None:
            switches.due(0)  # the given frame is the image's, whatever the prompt
        yield chunk(latent)
    if cancelled is not None and cancelled():
        return
    first = len(plans)
    prefetch = getattr(stages, "prefetch", None) or (lambda plans_: plans_)

    num_latent = given + cfg.num_latent_frames(req.num_frames)

    def plans_from(start: int, kept: int, generation: int):
        return prefetch(plan_stream(cfg, req, stages, prefix, draft_prefix, plans, start, kept,
                                    generation, num_latent))

    upcoming = plans_from(first, min(first, segment_keep(cfg.ar_context_frames)), 0)
    both = getattr(stages, "refine_and_decode", None)
    # With refine_and_decode, a latent frame is decoded while the next one renders (its
    # chunk goes out one rendering later). The first frame, and the first under a new
    # prompt, are decoded at once, for the latency of the first chunk and of a switch. The
    # refiner's inputs and the decoder's are those of the sequential order, so the frames
    # are the same.
    pending = None  # rendered, in the context frames, not decoded yet
    index = at_once = first
    try:
        while True:
            if not pacer.wait(state["emitted"]):
                return  # cancelled while held back
            prompt = None if switches is None else switches.due(index - given)
            if prompt is not None:
                upcoming.close()
                del plans[index:]  # decoded ahead under the old prompt
                prefix, draft_prefix = stages.encode_prompt(prompt)
                upcoming = plans_from(index, min(index, switch_keep(cfg)), len(switches.applied))
                at_once = index
                # The new prompt's first frame: after the frames emitted and the latent frame
                # rendered under the old prompt that still waits for its decode.
                fade.begin(state["emitted"] + (cfg.frames_per_latent if pending is not None else 0))
            plan = next(upcoming, None)
            if plan is None:
                break
            refine = (plan, index, req.sampling.seed, context.anchor, context.history)
            if pending is None:
                latent = stages.refine(*refine)
            else:
                latent, frames = both(refine, (pending, state["prev"]))
                yield emit(pending, frames)
                pending = None
                if cancelled is not None and cancelled():
                    return
            if both is None or index == at_once:
                yield chunk(latent)
            else:
                context.push(latent)
                pending = latent
            index += 1
            if cancelled is not None and cancelled():
                return
        if pending is not None:
            yield emit(pending, stages.decode(pending, state["prev"]))
    finally:
        upcoming.close()
        if switches is not None:
            switches.end()


def fitted_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """One uint8 frame [H, W, 3] fitted as ``helios.vae.fit_frames`` fits a clip (its centre
    cropped, then resized bilinearly with PyTorch's half-pixel centres), as uint8; a frame of
    the size already is returned as it is. In numpy, since the ``helios`` model that runs the
    orchestrator over the stage models has no torch; within 1 of ``fit_frames`` rounded
    (float32 arithmetic in another order; tests/test_continuation.py)."""
    if frame.shape[:2] == (height, width):
        return frame
    rows, cols = centre_crop(*frame.shape[:2], height, width)
    x = frame[rows, cols].astype(np.float32)

    def taps(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out)
                         - 0.5, 0)
        low = np.minimum(src.astype(np.int64), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), (src - low).astype(np.float32)

    top, bottom, dy = taps(x.shape[0], height)
    left, right, dx = taps(x.shape[1], width)
    x = x[:, left] * (1 - dx)[None, :, None] + x[:, right] * dx[None, :, None]
    x = x[top] * (1 - dy)[:, None, None] + x[bottom] * dy[:, None, None]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class SwitchFade:
    """A prompt switch as a dissolve: the new prompt's first ``frames`` frames are blended with
    the last frame shown before it, the new one's weight growing by 1 / (frames + 1) a frame.

    The model changes the picture at a switch at once (the new prompt's object renders in the
    first latent frame under it); a dissolve spreads that change over the frames of the fade.
    Only the frames sent are blended: the refiner's history and the decoder's previous latent
    are the model's own frames, so the frames after the fade are those of a cut. Integer
    arithmetic, so every runtime sends the same bytes."""

    def __init__(self, frames: int):
        self.frames = frames
        self.start: int | None = None  # the new prompt's first frame
        self.base = None               # the last frame shown before it (uint16)
        self.last = None               # the last frame sent

    def begin(self, first_new_frame: int) -> None:
        """A switch whose first frame is ``first_new_frame``; nothing to fade from before any
        frame was sent."""
        if self.frames and self.last is not None:
            self.start, self.base = first_new_frame, None

    def begin_from(self, frame: np.ndarray, first_new_frame: int) -> None:
        """A dissolve from ``frame``, shown last though not sent: a continued clip's last
        frame, into the continuation's first frames."""
        self.last = frame
        self.begin(first_new_frame)

    def __call__(self, frames: np.ndarray, offset: int) -> np.ndarray:
        """``frames`` (uint8 [T, H, W, 3]) that start at frame ``offset``, as they are sent."""
        if self.start is not None and offset + len(frames) > self.start \
                and offset < self.start + self.frames:
            frames = frames.copy()
            for i in range(len(frames)):
                k = offset + i - self.start + 1  # the new prompt's weight, in 1 / (frames + 1)
                if k == 1:
                    self.base = self.last.astype(np.uint16)
                if 1 <= k <= self.frames:
                    mixed = self.base * (self.frames + 1 - k) + frames[i].astype(np.uint16) * k
                    frames[i] = mixed // (self.frames + 1)
                self.last = frames[i]
        elif len(frames):
            self.last = frames[-1]
        return frames


# How far behind the pacer's model of the player a report may put the player: a player that
# is stuck, or a client that keeps reporting its first frame, holds its stream (its GPU
# memory and its serving slot) up to this long, not for ever.
PLAYER_BEHIND_MAX_S = 5.0


class Pacer:
    """Holds a stream back to ``lead_s`` seconds of video ahead of its player (``lead_s``
    None: never). The player is modelled as players behave: it starts when the first chunk
    goes out, plays at the video's frame rate, and when it reaches a frame that has not
    arrived it waits for it, so its clock restarts there. ``player()``, where given, returns
    what the player itself last reported, (frame shown, when by time.time()) or None
    (``PromptSwitches.player``): a player further behind than the model (frames still on
    their way to it, a page slowed by its machine) holds the stream back by its report, up
    to ``PLAYER_BEHIND_MAX_S``."""

    def __init__(self, lead_s: float | None, fps: int, cancelled: Callable[[], bool] | None = None,
                 player: Callable[[], tuple[int, float] | None] | None = None):
        self.lead_s, self.fps, self.cancelled, self.player = lead_s, fps, cancelled, player
        self.t0: float | None = None  # when the player showed (or would show) frame 0

    def sent(self, first: int) -> None:
        """A chunk whose first frame is ``first`` goes out now. Without this restart, every
        stall of a stream slower than its player (a loaded CPU) would leave the player further
        behind the clock, and the lead would grow by the stalls."""
        now = time.monotonic()
        if self.t0 is None or now > self.t0 + first / self.fps:
            self.t0 = now - first / self.fps

    def ahead(self, emitted: int, now: float, wall: float) -> float:
        """Seconds by which ``emitted`` frames are beyond the lead at ``now`` (time.monotonic)
        and ``wall`` (time.time(), the same instant): by the model's clock, or by the player's
        report where that puts the player further behind."""
        t0 = self.t0
        heard = self.player() if self.player is not None else None
        if heard is not None:
            frame, at = heard  # shown at ``at``, playing on at the frame rate since
            t0 = max(t0, min(now - (wall - at) - frame / self.fps, t0 + PLAYER_BEHIND_MAX_S))
        return t0 + emitted / self.fps - self.lead_s - now

    def wait(self, emitted: int) -> bool:
        """Return once ``emitted`` frames are no more than the lead ahead of the player;
        False if the stream was cancelled meanwhile."""
        if self.lead_s is None or self.t0 is None:
            return True
        while (ahead := self.ahead(emitted, time.monotonic(), time.time())) > 0:
            if self.cancelled is not None and self.cancelled():
                return False
            time.sleep(min(ahead, 0.05))
        return True


def plan_stream(cfg: HeliosConfig, req: VideoRequest, stages: Stages, prefix, draft_prefix,
                plans: list[list[int]], start: int = 0, kept: int = 0,
                generation: int = 0, num_latent: int | None = None) -> Iterator[list[int]]:
    """The plan tokens of each latent frame from ``start`` on, one AR segment after another;
    appends them to ``plans`` (which holds those before ``start``: an image's, or those
    rendered before a prompt switch) as they come. The first segment's context keeps
    ``kept`` of the frames before ``start``; every later one the generation's first frames
    (from ``start - kept`` on: ``sink_frames``) and the newest. ``generation`` counts the
    prompt switches before this stream, so that each draws its own seeds. ``num_latent``:
    the schedule's latent frames (those of a continued clip included; default the request's).

    The last frame of a segment is held back until the next segment's AR request has gone
    out (its context is plan tokens only, known once the last token arrives), so the AR never
    waits for the refiner to finish the frames it already described."""
    n = cfg.plan_tokens_per_frame
    bos = cfg.ar_backbone.bos_token_id
    bias = plan_bias(cfg)
    held = None
    if num_latent is None:
        num_latent = cfg.num_latent_frames(req.num_frames)
    origin = start - kept  # the generation's first frame: the sink frames start there
    for seg in ar_segments(cfg, num_latent, start, kept):
        frames = plans[origin:origin + seg.sink] + plans[len(plans) - (seg.kept - seg.sink):]
        context = [bos] + [t for p in frames for t in p]
        path = (seg.index,) if generation == 0 else (seg.index, generation)
        params = dataclasses.replace(req.sampling, seed=derive_seed(req.sampling.seed, AR_SEED,
                                                                    *path))
        tokens = stages.ar_stream(prefix, draft_prefix, context, seg.new * n, params, bias,
                                  req.speculative)
        try:
            if held is not None:
                yield held
            buf: list[int] = []
            last = seg.first_frame + seg.new
            for new in tokens:  # to the end: the stream ends its AR request itself
                buf += list(new)
                while len(buf) >= n:
                    plans.append(buf[:n])
                    buf = buf[n:]
                    if len(plans) < last:
                        yield plans[-1]
            held = plans[-1]
        finally:
            tokens.close()
    if held is not None:
        yield held
