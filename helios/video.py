"""H.264 mp4 writing and image reading through PyAV (FFmpeg), frame by frame as they come."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import HeliosError


# The container formats the writer can produce H.264 into.
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")


def check_output(text: str) -> Path:
    """The video file to write: a video suffix, in a folder that exists and can be written."""
    import os  # noqa: PLC0415

    path = Path(text)
    if text == "-" or path.suffix.lower() not in VIDEO_SUFFIXES:
        raise HeliosError("output", f"must be a file name ending in {', '.join(VIDEO_SUFFIXES)}, "
                                    f"got {text!r}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise HeliosError("output", f"must be in an existing folder, {str(folder)!r} is not one")
    if not os.access(folder, os.W_OK) or path.is_dir():
        raise HeliosError("output", f"must be a writable file, cannot write {text!r}")
    return path


def partial_path(path: Path) -> Path:
    """Where a video is written until it is complete (then renamed to ``path``)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


class Mp4Writer:
    """Append uint8 [T, H, W, 3] chunks; the file is a valid mp4 once closed."""

    def __init__(self, path: str | Path, fps: int, width: int, height: int, crf: int = 18):
        import av  # noqa: PLC0415  (PyAV is only needed where video is written)

        if width % 2 or height % 2:
            raise HeliosError("output", f"H.264 yuv420p needs even width and height, got {width}x{height}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        import av  # noqa: PLC0415

        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode a whole video: (uint8 [T, H, W, 3], fps)."""
    import av  # noqa: PLC0415

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


def read_image(path: str | Path) -> np.ndarray:
    """Any image FFmpeg can read (png, jpeg, ...) -> uint8 [H, W, 3]."""
    import av  # noqa: PLC0415

    p = Path(path)
    if not p.is_file():
        raise HeliosError("image", f"must be a readable image file, {str(p)!r} does not exist")
    try:
        with av.open(str(p)) as c:
            frame = next(c.decode(video=0))
            return frame.to_ndarray(format="rgb24")
    except Exception as e:  # PyAV raises a family of FFmpeg errors; all mean "unreadable"
        raise HeliosError("image", f"must be a readable image file, cannot decode {str(p)!r}: "
                                   f"{type(e).__name__}") from None


def read_clip(path: str | Path, max_frames: int) -> np.ndarray:
    """The clip a video continues: every frame of a video FFmpeg can read, uint8
    [T, H, W, 3]; more than ``max_frames`` is refused (HeliosError naming ``video``)."""
    import av  # noqa: PLC0415

    p = Path(path)
    if not p.is_file():
        raise HeliosError("video", f"must be a readable video file, {str(p)!r} does not exist")
    frames = []
    try:
        with av.open(str(p)) as c:
            for frame in c.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) > max_frames:
                    raise HeliosError("video", f"must have at most {max_frames} frames, "
                                               f"{str(p)!r} has more")
    except HeliosError:
        raise
    except Exception as e:  # PyAV raises a family of FFmpeg errors; all mean "unreadable"
        raise HeliosError("video", f"must be a readable video file, cannot decode {str(p)!r}: "
                                   f"{type(e).__name__}") from None
    if not frames:
        raise HeliosError("video", f"must be a readable video file, {str(p)!r} has no frames")
    return np.stack(frames)
