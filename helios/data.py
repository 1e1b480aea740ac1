"""Synthetic captioned clips: the training data of the tiny model (deterministic by seed).

A clip shows one or two coloured shapes on a background, each moving one way; its caption
says so ("a red circle moving left on a dark background"). Some (shape, colour, motion)
combinations are held out of training (``is_held_out``) so that prompt adherence is measured on
prompts the model never saw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
          "yellow": (235, 215, 40), "magenta": (215, 50, 200), "cyan": (40, 210, 215)}
MOTIONS = ("left", "right", "up", "down", "bouncing", "growing", "static")
BACKGROUNDS = {"dark": (20, 20, 28), "light": (225, 225, 220)}
_PHRASE = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
           "bouncing": "bouncing", "growing": "growing", "static": "resting"}


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    motion: str

    def phrase(self) -> str:
        return f"a {self.color} {self.shape} {_PHRASE[self.motion]}"


@dataclass(frozen=True)
class ClipSpec:
    objects: tuple[ObjectSpec, ...]
    background: str

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"


def drop_attribute_words(caption: str, rng: np.random.Generator, p: float) -> str:
    """The caption with each colour word left out, and each shape word replaced by "shape",
    with probability ``p`` apiece: "a red circle moving left" may become "a circle moving
    left" or "a red shape moving left". Training the AR on such captions makes the motion
    words name a motion on their own, whatever shape and colour they come with: the
    held-out prompts are unseen (shape, colour, motion) triples. Only the synthetic
    vocabulary's colour and shape words are touched."""
    out = []
    for word in caption.split(" "):
        if word in COLORS and rng.random() < p:
            continue
        out.append("shape" if word in SHAPES and rng.random() < p else word)
    return " ".join(out)


def is_held_out(obj: ObjectSpec) -> bool:
    """About one in seven (shape, colour, motion) combinations never appears in training."""
    key = f"{obj.shape}/{obj.color}/{obj.motion}".encode()
    return int(hashlib.sha256(key).hexdigest(), 16) % 7 == 0


def sample_spec(rng: np.random.Generator, held_out: bool = False, max_objects: int = 2) -> ClipSpec:
    """A random clip description; ``held_out`` picks only held-out combinations (else none)."""
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        while True:
            o = ObjectSpec(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))],
                           MOTIONS[rng.integers(len(MOTIONS))])
            if is_held_out(o) == held_out and all(o.color != p.color for p in objects):
                objects.append(o)
                break
    return ClipSpec(tuple(objects), list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])


def _mask(shape: str, h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(y - cy) <= r) & (np.abs(x - cx) <= r)
    # Triangle pointing up: inside when below the two slanted edges and above the base.
    top, base = cy - r, cy + r
    half = (y - top) / (2 * r) * r
    return (y >= top) & (y <= base) & (np.abs(x - cx) <= half)


SPEED = 1.0 / 128   # of the frame size per frame, for the four moving directions
BOUNCE_PERIOD = 24   # frames
GROW_PERIOD = 32     # frames: a growing object restarts small after this many


def object_state(o: ObjectSpec, t: int, cy: float, cx: float, r: float, size: int):
    """(y, x, radius) of an object at frame ``t``. Motion is stationary: a constant speed
    that wraps around the frame, a periodic bounce, a sawtooth growth, so that a video of
    any length keeps doing what its caption says."""
    step = SPEED * size * t
    y, x, rad = cy, cx, r
    if o.motion == "left":
        x -= step
    elif o.motion == "right":
        x += step
    elif o.motion == "up":
        y -= step
    elif o.motion == "down":
        y += step
    elif o.motion == "bouncing":
        y += size * 0.15 * abs(np.sin(np.pi * t / BOUNCE_PERIOD))
    elif o.motion == "growing":
        rad = r * (1 + 0.8 * (t % GROW_PERIOD) / GROW_PERIOD)
    return y % size, x % size, rad


def _starts(spec: ClipSpec, size: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Each object's (y, x, radius) at frame 0."""
    starts = []
    for i, _ in enumerate(spec.objects):
        r = size * 0.11
        lo, hi = size * 0.3, size * 0.7
        cy, cx = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if len(spec.objects) == 2:  # keep two objects apart: left and right halves
            cx = size * (0.3 if i == 0 else 0.7)
        starts.append((cy, cx, r))
    return starts


def _draw(frame: np.ndarray, o: ObjectSpec, y: float, x: float, rad: float) -> None:
    size = frame.shape[0]
    mask = np.zeros((size, size), bool)
    for dy in (-size, 0, size):       # an object crossing an edge shows on both sides
        for dx in (-size, 0, size):
            if -rad * 2 < y + dy < size + rad * 2 and -rad * 2 < x + dx < size + rad * 2:
                mask |= _mask(o.shape, size, size, y + dy, x + dx, rad)
    frame[mask] = COLORS[o.color]


def render_switch_clip(before: ClipSpec, after: ClipSpec, num_frames: int, switch_frame: int,
                       size: int = 128, seed: int = 0) -> np.ndarray:
    """uint8 [T, size, size, 3]: ``before`` until ``switch_frame``, then ``after``, whose
    objects go on from where ``before``'s were (a prompt switch as a session makes one: the
    scene changes what it shows, not where). Both specs have the same number of objects."""
    if len(before.objects) != len(after.objects):
        raise ValueError("a switch keeps the number of objects")
    starts = _starts(before, size, np.random.default_rng(seed))
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        spec = before if t < switch_frame else after
        frames[t] = BACKGROUNDS[spec.background]
        for o, o0, (cy, cx, r) in zip(spec.objects, before.objects, starts):
            if t < switch_frame:
                y, x, rad = object_state(o, t, cy, cx, r, size)
            else:
                y, x, _ = object_state(o0, switch_frame, cy, cx, r, size)
                y, x, rad = object_state(o, t - switch_frame, y, x, r, size)
            _draw(frames[t], o, y, x, rad)
    return frames


def render_clip(spec: ClipSpec, num_frames: int, size: int = 128, seed: int = 0,
                start: int = 0) -> np.ndarray:
    """uint8 [T, size, size, 3] of frames ``start`` .. ``start + T - 1``; start positions vary
    with the seed, the motion never does."""
    starts = _starts(spec, size, np.random.default_rng(seed))
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    frames[:] = BACKGROUNDS[spec.background]
    for t in range(num_frames):
        for o, (cy, cx, r) in zip(spec.objects, starts):
            _draw(frames[t], o, *object_state(o, start + t, cy, cx, r, size))
    return frames


def render_long_session_clip(spec: ClipSpec, num_frames: int, head: int, gap: int,
                             size: int = 128, seed: int = 0) -> np.ndarray:
    """uint8 [T, size, size, 3]: the first ``head`` frames of ``spec``'s video, then its
    frames from ``head + gap`` on, as a long video's later AR segments see it: its first
    frames beside its newest, ``gap`` frames left out between them."""
    return np.concatenate([render_clip(spec, head, size, seed),
                           render_clip(spec, num_frames - head, size, seed, start=head + gap)])
