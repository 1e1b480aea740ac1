"""Prompt switches of a running stream: what a session can change while its video plays.

A switch names a new prompt and the frame from which it holds. It takes effect at the first
latent-frame boundary at or after that frame (a latent frame is ``frames_per_latent`` video
frames), and only there: what was rendered before stays as it was. ``PromptSwitches`` is the
schedule that the renderer (``orchestrator.stream_video``) consults before each latent frame;
updates come from any thread (an interactive client, a Triton request, a scripted list).

At a switch the AR backbone starts a new segment under the new prompt's embedding, its
context the plan tokens of the last ``switch_keep`` latent frames (none: see
``helios.schedule.switch_keep``), prefilled anew. The AR is stateless between segments
anyway, so this costs one prefill and nothing is kept per session. The refiner keeps its
anchor and history, so the picture turns into the new prompt's rather than cutting to a
new video.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .config import HeliosConfig
from .errors import HeliosError
from .tokenizer import tokenize


@dataclass(frozen=True)
class Switch:
    frame: int    # the first video frame generated under ``prompt``
    prompt: str
    # Wall-clock times (time.time()) of the update reaching the stream and of the switch at
    # its boundary: what a server logs of where a switch's time went (not compared).
    sent_at: float | None = field(default=None, compare=False)
    applied_at: float | None = field(default=None, compare=False)

    def timing(self, out_at: float) -> str:
        """Where this switch's time went, given when its first frame left (``out_at``)."""
        return (f"applied {(self.applied_at - self.sent_at) * 1e3:.0f} ms after the update "
                f"reached the stream, its first frame out {(out_at - self.applied_at) * 1e3:.0f}"
                f" ms later")


def check_frame(value, num_frames: int, field: str = "at_frame") -> int:
    """A frame index of a video of ``num_frames`` frames; HeliosError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value < num_frames:
        raise HeliosError(field, f"must be an integer in [0, {num_frames - 1}] (a frame of "
                                 f"this video), got {value!r}")
    return int(value)


class PromptSwitches:
    """The prompt updates of one stream, applied at latent-frame boundaries; thread-safe.

    ``update`` may be called from any thread while the stream runs; ``due(latent)`` is called
    by the renderer before it renders latent frame ``latent`` and returns the prompt to switch
    to there, if any. An update asks for a frame (``at_frame``) or for the next boundary not
    yet rendered (``at_frame=None``); a frame the stream has already passed is refused, as is
    any update once the stream has ended. Several updates due at one boundary: the last one
    sent wins.
    """

    def __init__(self, cfg: HeliosConfig, num_frames: int):
        self.frames_per_latent = cfg.frames_per_latent
        self.num_frames = num_frames
        self.num_latent = cfg.num_latent_frames(num_frames)
        self.max_prompt_bytes = cfg.text_encoder.max_prompt_bytes
        self._lock = threading.Lock()
        # (latent index, order sent, prompt, when it was sent)
        self._pending: list[tuple[int, int, str, float]] = []
        self._sent = 0
        self._next = 0        # the first latent frame whose prompt is not decided yet
        self._ended = False
        self._shown: tuple[int, float] | None = None
        self.applied: list[Switch] = []

    def update(self, prompt: str, at_frame: int | None = None,
               sent_at: float | None = None) -> int:
        """Schedule ``prompt``; returns the frame from which it will hold. Raises HeliosError
        (field ``prompt``, ``at_frame`` or ``session``) for a bad or late update.
        ``sent_at``: when the update was sent to the stream (time.time(); default now)."""
        tokenize(prompt, self.max_prompt_bytes)
        if at_frame is not None:
            at_frame = check_frame(at_frame, self.num_frames)
        with self._lock:
            if self._ended:
                raise HeliosError("session", "has ended: its video is complete or was stopped")
            if at_frame is None:
                latent = self._next
            else:
                latent = math.ceil(at_frame / self.frames_per_latent)
                if latent < self._next:
                    raise HeliosError("at_frame", f"{at_frame} has already been generated: "
                                                  f"the stream's next frame is "
                                                  f"{self._next * self.frames_per_latent}")
            if latent >= self.num_latent:
                raise HeliosError("at_frame" if at_frame is not None else "session",
                                  "is past the video's last latent frame: nothing is left "
                                  "to generate under a new prompt")
            self._pending.append((latent, self._sent, prompt,
                                  time.time() if sent_at is None else sent_at))
            self._sent += 1
            return latent * self.frames_per_latent

    def due(self, latent: int) -> str | None:
        """The prompt that holds from latent frame ``latent`` on, if it changes there."""
        with self._lock:
            self._next = latent + 1
            now = [p for p in self._pending if p[0] <= latent]
            if not now:
                return None
            self._pending = [p for p in self._pending if p[0] > latent]
            _, _, prompt, sent_at = max(now, key=lambda p: p[1])
            self.applied.append(Switch(latent * self.frames_per_latent, prompt, sent_at,
                                       time.time()))
            return prompt

    def shown(self, frame, at: float | None = None) -> None:
        """The stream's player shows ``frame`` now (``at``: when, by time.time()). The pacer
        (``helios.orchestrator.Pacer``) then keeps the stream's lead over the picture itself
        rather than over its model of the player. HeliosError naming ``shown_frame`` for a
        frame outside the video."""
        frame = check_frame(frame, self.num_frames, "shown_frame")
        with self._lock:
            self._shown = (frame, time.time() if at is None else float(at))

    def player(self) -> tuple[int, float] | None:
        """The latest ``shown`` report: (frame, when it was shown by time.time()), or None."""
        with self._lock:
            return self._shown

    def end(self) -> None:
        """The stream is over; later updates are refused."""
        with self._lock:
            self._ended = True
            self._pending.clear()


def scripted(cfg: HeliosConfig, num_frames: int, fps: int,
             prompt_at: list[tuple[float, str]]) -> PromptSwitches:
    """A schedule of (seconds, prompt) switches, as ``--prompt-at SECONDS PROMPT`` gives them:
    each holds from frame round(seconds * fps) (rounded up to a latent-frame boundary)."""
    switches = PromptSwitches(cfg, num_frames)
    for seconds, prompt in prompt_at:
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or not 0 <= seconds < num_frames / fps:
            raise HeliosError("prompt_at", f"seconds must be in [0, {num_frames / fps:g}) "
                                           f"(within the video), got {seconds}")
        switches.update(prompt, at_frame=min(num_frames - 1, round(seconds * fps)))
    return switches
