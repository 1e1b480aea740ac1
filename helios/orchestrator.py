"""The per-request schedule of Helios, independent of where the stages run.

``stream_video`` turns a validated request into uint8 frame chunks by calling five stage
functions. ``HeliosPipeline`` implements them in-process (PyTorch modules); the Triton
``helios`` model implements them as BLS calls to the stage models. Both therefore run the
same schedule and, for the same seed, produce the same frames.

Stage functions (``Stages``):
    encode_prompt(prompt) -> (prefix [L, H], draft prefix [L, H_draft])
    encode_image(image uint8 [H, W, 3]) -> (latent [1, C, h, w], plan tokens of that frame)
    ar_stream(prefix, draft_prefix, tokens, n, params, bias, speculative) -> iterator of
        token lists, n tokens in all; closing it early stops and frees the AR sequence
    refine(plan, index, seed, anchor, recent) -> latent [1, C, h, w]
    decode(latent, prev_latent or None) -> uint8 [4, H, W, 3]
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Protocol

import numpy as np

from .config import HeliosConfig
from .schedule import (AR_SEED, RefinerHistory, VideoChunk, VideoRequest, ar_segments,
                             codebook_bias, derive_seed)


class Stages(Protocol):
    def encode_prompt(self, prompt: str): ...
    def encode_image(self, image: np.ndarray): ...
    def ar_stream(self, prefix, draft_prefix, tokens, n, params, bias, speculative): ...
    def refine(self, plan, index, seed, anchor, recent): ...
    def decode(self, latent, prev_latent): ...


def stream_video(cfg: HeliosConfig, req: VideoRequest, stages: Stages,
                 cancelled: Callable[[], bool] | None = None) -> Iterator[VideoChunk]:
    """Yield the video of ``req`` chunk by chunk (4 frames per latent frame, the last one
    trimmed to ``req.num_frames``). Stops early, releasing the AR stream, when ``cancelled()``
    turns true or the consumer closes the generator."""
    n = cfg.plan_tokens_per_frame
    seed = req.sampling.seed
    num_latent = cfg.num_latent_frames(req.num_frames)
    bos = cfg.ar_backbone.bos_token_id
    bias = codebook_bias(cfg.ar_backbone)
    prefix, draft_prefix = stages.encode_prompt(req.prompt)
    history = RefinerHistory(cfg.refiner.history_frames)
    plans: list[list[int]] = []
    state = {"prev": None, "emitted": 0}

    def chunk(latent) -> VideoChunk:
        frames = stages.decode(latent, state["prev"])
        frames = frames[:req.num_frames - state["emitted"]]
        out = VideoChunk(frames, state["emitted"], req.num_frames)
        state["emitted"] += len(frames)
        state["prev"] = latent
        history.push(latent)
        return out

    if req.image is not None:
        latent, plan = stages.encode_image(req.image)
        plans.append(list(plan))
        yield chunk(latent)
    for seg in ar_segments(cfg, num_latent, len(plans)):
        if cancelled is not None and cancelled():
            return
        context = [bos] + [t for p in plans[len(plans) - seg.kept:] for t in p]
        params = dataclasses.replace(req.sampling, seed=derive_seed(seed, AR_SEED, seg.index))
        tokens = stages.ar_stream(prefix, draft_prefix, context, seg.new * n, params, bias,
                                  req.speculative)
        try:
            buf: list[int] = []
            for new in tokens:
                buf += list(new)
                while len(buf) >= n:
                    plans.append(buf[:n])
                    buf = buf[n:]
                    latent = stages.refine(plans[-1], len(plans) - 1, seed,
                                           history.anchor, history.recent)
                    yield chunk(latent)
                    if cancelled is not None and cancelled():
                        return
        finally:
            tokens.close()
