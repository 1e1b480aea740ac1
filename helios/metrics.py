"""Pixel metrics that need no downloaded model: what the dominant object is and does, flicker,
and drift over a long video. They read generated frames the way they read synthetic ground
truth, and the tests prove them on ground truth first."""

from __future__ import annotations

import numpy as np

from .data import COLORS, SHAPES

_NAMES = list(COLORS)
_RGB = np.array([COLORS[c] for c in _NAMES], np.float32)


def _foreground(frame: np.ndarray) -> np.ndarray:
    """Pixels that differ from the background (the median colour of the frame's border)."""
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).astype(np.float32)
    bg = np.median(border, axis=0)
    return np.abs(frame.astype(np.float32) - bg).sum(-1) > 60


# Growing: over GROWTH_LAG frames (two latent frames: a generated video's object changes
# size a latent frame at a time, not every frame) the area grows by more than GROWTH, as
# 1.8x over 32 frames does. A synthetic growing object's radius grows by 80 % over 32 frames
# (its area by 1.27-1.44x over 8); one that rests or moves keeps its area.
GROWTH_LAG, GROWTH = 8, 1.15


def _track(masks: list) -> np.ndarray:
    """[T, 3]: each mask's centre (row, column) and area, the centres unwrapped. Objects that
    leave the frame at one edge come back at the other (the synthetic motions wrap), so a
    centre is the circular mean of the mask's rows and columns, and each step from one frame
    to the next is taken the short way round: an object crossing an edge moves on, it does
    not jump across the frame. A frame without the object keeps the last centre."""
    h, w = masks[0].shape
    angles = [2 * np.pi * np.arange(n) / n for n in (h, w)]
    out = np.zeros((len(masks), 3))
    for t, m in enumerate(masks):
        area = m.sum()
        if area == 0:
            out[t] = (*(out[t - 1, :2] if t else (np.nan, np.nan)), 0)
            continue
        centre = []
        for axis, (a, n) in enumerate(zip(angles, (h, w))):
            mass = m.sum(1 - axis)
            pos = np.arctan2(mass @ np.sin(a), mass @ np.cos(a)) * n / (2 * np.pi) % n
            last = out[t - 1, axis] if t else np.nan  # unwrapped; NaN before the object is seen
            if not np.isnan(last):
                pos = last + (pos - last + n / 2) % n - n / 2
            centre.append(pos)
        out[t] = (*centre, area)
    return out


def dominant_object(frames: np.ndarray) -> dict:
    """Colour, shape and motion of the largest coloured region, from uint8 [T, H, W, 3]."""
    masks = [_foreground(f) for f in frames]
    first = masks[0]
    if first.sum() < 10:
        return {"color": None, "shape": None, "motion": None}
    pixels = frames[0][first].astype(np.float32)
    # The dominant colour: the named colour most foreground pixels are closest to.
    votes = np.bincount(np.linalg.norm(pixels[:, None] - _RGB[None], axis=-1).argmin(1),
                        minlength=len(_NAMES))
    color = _NAMES[int(votes.argmax())]
    own = [m & (np.linalg.norm(f.astype(np.float32) - _RGB[votes.argmax()], axis=-1) < 60)
           for f, m in zip(frames, masks)]
    ys, xs = np.nonzero(own[0])
    if len(ys) == 0:  # foreground, but none of it near the dominant named colour
        return {"color": color, "shape": None, "motion": None}
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = own[0].sum() / box  # square ~1, circle ~0.79, triangle ~0.5
    shape = SHAPES[int(np.argmin([abs(fill - 0.785), abs(fill - 1.0), abs(fill - 0.5)]))]
    track = _track(own)
    dy, dx = track[-1, 0] - track[0, 0], track[-1, 1] - track[0, 1]
    area = track[:, 2]
    lag = min(GROWTH_LAG, len(area) - 1)
    growth = area[lag:] / np.maximum(area[:len(area) - lag], 1)
    # Bouncing: out vertically and at least halfway back. A video that ends mid-bounce
    # (32 frames against a 24-frame period) still has a net vertical displacement, so this
    # comes before the direction test.
    excursion = np.abs(track[:, 0] - track[0, 0])
    peak = int(np.nanargmax(excursion)) if np.isfinite(excursion).any() else 0
    came_back = np.nanmin(excursion[peak:]) < 0.5 * excursion[peak]
    size = frames.shape[1]
    # Growing: the area grows from one latent frame to the next, for most of the video (a
    # growing object restarts small every 32 frames, so a window that does not start at a
    # restart sees a drop and no net growth).
    if lag > 0 and np.median(growth) > GROWTH:
        motion = "growing"
    elif excursion[peak] > 0.08 * size and came_back:
        motion = "bouncing"
    elif max(abs(dx), abs(dy)) > 0.08 * size:
        motion = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    else:
        motion = "static"
    return {"color": color, "shape": shape, "motion": motion}


def frame_changes(frames: np.ndarray) -> np.ndarray:
    """[T - 1]: the mean absolute change from each frame to the next, in uint8 levels."""
    return np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))


def flicker(frames: np.ndarray) -> float:
    """Mean absolute change between consecutive frames, in [0, 1]."""
    f = frames.astype(np.float32) / 255
    return float(np.abs(np.diff(f, axis=0)).mean())


def _sharpness(frames: np.ndarray) -> float:
    g = frames.astype(np.float32).mean(-1)
    lap = g[:, 1:-1, 1:-1] * 4 - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    return float(lap.var())


def drift(frames: np.ndarray, chunk: int = 24) -> dict:
    """Colour and sharpness statistics of the first vs the last ``chunk`` frames."""
    a, b = frames[:chunk], frames[-chunk:]
    return {"mean_rgb_first": a.reshape(-1, 3).mean(0).tolist(),
            "mean_rgb_last": b.reshape(-1, 3).mean(0).tolist(),
            "color_shift": float(np.abs(a.reshape(-1, 3).mean(0) - b.reshape(-1, 3).mean(0)).mean() / 255),
            "sharpness_first": _sharpness(a), "sharpness_last": _sharpness(b)}
