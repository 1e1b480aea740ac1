"""Where training clips come from: captioned synthetic clips (``helios.data``) or a folder of
videos with captions."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..config import HeliosConfig
from ..data import render_clip, render_long_session_clip, render_switch_clip, sample_spec
from ..errors import HeliosError
from ..tokenizer import tokenize

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


class SyntheticClips:
    """Captioned synthetic clips (helios.data), never the held-out combinations."""

    def __init__(self, cfg: HeliosConfig):
        self.size = cfg.height

    def sample(self, rng: np.random.Generator, num_frames: int) -> tuple[np.ndarray, str]:
        return synthetic_clip(rng, num_frames, self.size)


def synthetic_clip(rng: np.random.Generator, num_frames: int, size: int) -> tuple[np.ndarray, str]:
    """A random captioned clip (uint8 [T, size, size, 3], caption) of a training combination."""
    spec = sample_spec(rng, max_objects=2 if rng.random() < 0.25 else 1)
    return render_clip(spec, num_frames, size, seed=int(rng.integers(2**31))), spec.caption


def synthetic_bank_clip(job) -> tuple[np.ndarray, str]:
    """Clip ``i`` of a synthetic latent bank (run in a worker process)."""
    size, seed, i, num_frames = job
    return synthetic_clip(np.random.default_rng([seed, 99, i]), num_frames, size)


# A long session's later AR segments keep the video's first frames and its newest, any number
# of latent frames apart; the bank's clips show them 4 apart. One period of the slowest
# synthetic motion (an object crosses the frame in 128 frames, 32 latent frames) covers every
# distance a long video reaches.
LONG_GAPS = 32


def synthetic_long_clip(job) -> tuple[np.ndarray, str]:
    """Clip ``i`` of a bank of long-session windows (run in a worker process): a synthetic
    clip's first ``sink`` latent frames, then the rest of its latent frames from 0 to
    ``LONG_GAPS - 1`` latent frames later on. ``helios.training.ar.ar_batch`` cuts a
    continuation window from it as from a bank clip: the first frames, then the newest kept
    ones 4 to 35 latent frames after them (4 in the bank's clips), then those to predict."""
    size, seed, i, num_frames, frames_per_latent, sink = job
    rng = np.random.default_rng([seed, 97, i])
    spec = sample_spec(rng, max_objects=2 if rng.random() < 0.25 else 1)
    clip_seed, gap = int(rng.integers(2**31)), int(rng.integers(LONG_GAPS))
    clip = render_long_session_clip(spec, num_frames, sink * frames_per_latent,
                                    gap * frames_per_latent, size, clip_seed)
    return clip, spec.caption


def synthetic_switch_clip(job) -> tuple[np.ndarray, str, int]:
    """Clip ``i`` of a bank of prompt switches (run in a worker process): one object that
    turns, at a latent-frame boundary in [1, 6], into another description (colour, shape,
    motion or background: at least one differs) where it is; -> (clip, the caption after
    the switch, the latent frame of the switch)."""
    size, seed, i, num_frames, frames_per_latent = job
    rng = np.random.default_rng([seed, 98, i])
    before = sample_spec(rng, max_objects=1)
    after = before
    while after == before:
        after = sample_spec(rng, max_objects=1)
    at = int(rng.integers(1, 7))
    clip = render_switch_clip(before, after, num_frames, at * frames_per_latent, size,
                              seed=int(rng.integers(2**31)))
    return clip, after.caption, at


class FolderClips:
    """Videos of a folder with their captions, resized to the configuration.

    A caption is the sidecar ``<video>.txt``, or a row of ``captions.csv`` (columns ``file``
    and ``caption``). Files that cannot be decoded, have no caption, or are shorter than one
    latent frame are listed in ``rejected`` with the reason and never used.
    """

    def __init__(self, folder: str | Path, cfg: HeliosConfig):
        import av  # noqa: PLC0415

        folder = Path(folder)
        if not folder.is_dir():
            raise HeliosError("data", f"must be a folder of videos, {str(folder)!r} is not one")
        table = {}
        if (folder / "captions.csv").is_file():
            with open(folder / "captions.csv", newline="") as f:
                table = {row["file"]: row["caption"] for row in csv.DictReader(f)}
        self.clips: list[tuple[np.ndarray, str]] = []
        self.names: list[str] = []
        self.rejected: list[tuple[str, str]] = []
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in VIDEO_SUFFIXES:
                continue
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text().strip() if sidecar.is_file() else table.get(path.name)
            if not caption:
                self.rejected.append((path.name, "no caption (.txt sidecar or captions.csv row)"))
                continue
            try:
                tokenize(caption, cfg.text_encoder.max_prompt_bytes)
            except HeliosError as e:
                self.rejected.append((path.name, f"caption: {e}"))
                continue
            try:
                frames = self._read(path, cfg, av)
            except Exception as e:  # PyAV raises many FFmpeg error types: all mean unreadable
                self.rejected.append((path.name, f"cannot decode: {type(e).__name__}: {e}"))
                continue
            if len(frames) < cfg.frames_per_latent:
                self.rejected.append((path.name, f"{len(frames)} frames, fewer than one latent "
                                                 f"frame ({cfg.frames_per_latent})"))
                continue
            self.clips.append((frames, caption))
            self.names.append(path.name)
        if not self.clips:
            raise HeliosError("data", f"has no usable video in {str(folder)!r} "
                                      f"({len(self.rejected)} rejected)")

    @staticmethod
    def _read(path: Path, cfg: HeliosConfig, av) -> np.ndarray:
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24", width=cfg.width, height=cfg.height)
                      for f in c.decode(video=0)]
        if not frames:
            raise ValueError("no video frames")
        return np.stack(frames)

    def sample(self, rng: np.random.Generator, num_frames: int) -> tuple[np.ndarray, str]:
        frames, caption = self.clips[int(rng.integers(len(self.clips)))]
        start = int(rng.integers(max(1, len(frames) - num_frames + 1)))
        window = frames[start:start + num_frames]
        if len(window) < num_frames:  # a short clip holds its last frame
            pad = np.repeat(window[-1:], num_frames - len(window), axis=0)
            window = np.concatenate([window, pad])
        return window, caption


