"""``helios-client generate``: stream a video from a Helios server into an mp4.

Exit codes: 0 done, 2 a bad argument or one the server rejected (the message names it), 3 the
server cannot be reached, 1 any other server error, 130 interrupted (the request is
cancelled). The video is written to a temporary file beside ``--output`` and renamed when it
is complete, so an error never leaves a partial mp4 under the requested name.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from .api import (HeliosClient, RequestError, ServerUnavailable, is_unknown_session,
                  new_session_id)


class Mp4Writer:
    """H.264 mp4 through PyAV, written chunk by chunk as frames arrive."""

    def __init__(self, path: str, fps: int):
        import av  # noqa: PLC0415

        self._av = av
        self._container = av.open(path, mode="w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps))
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": "18", "preset": "veryfast"}
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        if self.frames == 0:
            self._stream.height, self._stream.width = frames.shape[1:3]
        for f in frames:
            for packet in self._stream.encode(self._av.VideoFrame.from_ndarray(f, format="rgb24")):
                self._container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        if self.frames:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()


class BadArgument(Exception):
    """One line naming the argument and what it allows."""


# The container formats the writer can produce H.264 into (helios.video's, pinned by a test).
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line (no usage block), like every other error here."""

    def error(self, message):
        self.exit(2, f"helios-client: error: {message}\n")


def _int_in(name: str, low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be an integer in [{low}, {high}], "
                                             f"got {value}")
        return value
    return parse


def _seconds(name: str):
    """A number of seconds above 0 (finite), else one line naming the option."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"{name} must be a number of seconds > 0, got {text}")
        return value
    return parse


def _output_path(text: str) -> Path:
    """The output file: a video suffix, in a folder that exists and can be written."""
    path = Path(text)
    if text == "-" or path.suffix.lower() not in VIDEO_SUFFIXES:
        raise BadArgument(f"output must be a file name ending in {', '.join(VIDEO_SUFFIXES)}, "
                          f"got {text!r}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadArgument(f"output must be in an existing folder, {str(folder)!r} is not one")
    if not os.access(folder, os.W_OK) or path.is_dir():
        raise BadArgument(f"output must be a writable file, cannot write {text!r}")
    return path


def _read_image(path: str) -> np.ndarray:
    import av  # noqa: PLC0415

    if not Path(path).is_file():
        raise BadArgument(f"image must be a readable image file, {path!r} does not exist")
    try:
        with av.open(path) as c:
            return next(c.decode(video=0)).to_ndarray(format="rgb24")
    except Exception as e:  # FFmpeg's many error types all mean "cannot use this file"
        raise BadArgument(f"image must be a readable image file, cannot decode {path!r}: "
                          f"{type(e).__name__}") from None


MAX_VIDEO_FRAMES = 120  # the server's bound on a continued clip (docs/serving.md)


def _read_video(path: str) -> np.ndarray:
    """The clip to continue: every frame of a video file, uint8 [T, H, W, 3]."""
    import av  # noqa: PLC0415

    if not Path(path).is_file():
        raise BadArgument(f"video must be a readable video file, {path!r} does not exist")
    try:
        with av.open(path) as c:
            frames = []
            for f in c.decode(video=0):
                frames.append(f.to_ndarray(format="rgb24"))
                if len(frames) > MAX_VIDEO_FRAMES:
                    break
    except Exception as e:  # FFmpeg's many error types all mean "cannot use this file"
        raise BadArgument(f"video must be a readable video file, cannot decode {path!r}: "
                          f"{type(e).__name__}") from None
    if not 4 <= len(frames) <= MAX_VIDEO_FRAMES:
        has = "more than that" if len(frames) > MAX_VIDEO_FRAMES else len(frames)
        raise BadArgument(f"video must have 4 to {MAX_VIDEO_FRAMES} frames, {path!r} has {has}")
    return np.stack(frames)


def _switch_times(pairs, total_s: float) -> list[tuple[float, str]]:
    """``--prompt-at SECONDS PROMPT`` pairs, checked: seconds within the video, a prompt."""
    out = []
    for seconds, prompt in pairs:
        try:
            at = float(seconds)
        except ValueError:
            raise BadArgument(f"prompt-at seconds must be a number, got {seconds!r}") from None
        if not 0 <= at < total_s:
            raise BadArgument(f"prompt-at seconds must be in [0, {total_s:g}) (within the "
                              f"video), got {seconds}")
        if not prompt.strip():
            raise BadArgument("prompt-at prompt must not be empty")
        out.append((at, prompt))
    return out


class _Steering(threading.Thread):
    """Prompt updates of one session, from a thread of its own: the scripted ones first
    (``--prompt-at``, each at its frame), then each line of standard input (``--interactive``,
    from the next latent frame). An update sent before the stream has started is sent again
    until the server knows the session. ``report(line)`` tells the user how each went."""

    def __init__(self, client, session_id, scripted, interactive, report):
        super().__init__(daemon=True, name="helios-client-steering")
        self.client = client
        self.session_id, self.scripted, self.interactive = session_id, scripted, interactive
        self.report, self.ended = report, threading.Event()

    def _send(self, prompt: str, at_frame: int | None) -> None:
        try:
            frame = self.client.update(self.session_id, prompt, at_frame, wait_s=math.inf,
                                       stop=self.ended.is_set)
        except RequestError as e:
            if not is_unknown_session(e):  # else the stream is over: nothing to steer
                self.report(f"helios-client: update refused: {e}")
            return
        except Exception as e:  # the server went away: the stream reports it
            self.report(f"helios-client: update failed: {e}")
            return
        self.report(f"prompt from frame {frame}: {prompt}")

    def run(self) -> None:
        for frame, prompt in self.scripted:
            self._send(prompt, frame)
        if self.interactive:
            for line in sys.stdin:
                if self.ended.is_set():
                    return
                if line.strip():
                    self._send(line.strip(), None)


def main(argv=None) -> int:
    ap = _Parser(prog="helios-client", description="Helios Triton client")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate a video into an mp4")
    g.add_argument("--url", default=None, help="server address (default localhost:8001 for "
                                               "gRPC, localhost:8000 for HTTP)")
    g.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    g.add_argument("--prompt", required=True)
    g.add_argument("--duration", type=float, default=None, help="seconds")
    g.add_argument("--num-frames", type=_int_in("num_frames", 1, 2**31 - 1), default=None)
    g.add_argument("--fps", type=_int_in("fps", 1, 2**31 - 1), default=24)
    g.add_argument("--seed", type=_int_in("seed", 0, 2**63 - 1), default=0)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=_int_in("top_k", 0, 2**31 - 1), default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--image", default=None, help="first frame (image-to-video)")
    g.add_argument("--video", default=None,
                   help="a clip of 4 to 120 frames to continue (video-to-video); the output is "
                        "the continuation")
    g.add_argument("--prompt-at", nargs=2, action="append", default=[],
                   metavar=("SECONDS", "PROMPT"),
                   help="switch to PROMPT at SECONDS into the video (repeatable)")
    g.add_argument("--interactive", action="store_true",
                   help="while the video streams, each line typed on standard input becomes "
                        "its prompt from the next latent frame on (default duration 30 s)")
    g.add_argument("--output", default="out.mp4")
    g.add_argument("--timeout", type=_seconds("timeout"), default=600,
                   help="seconds without a response")
    g.add_argument("--no-progress", action="store_true")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if args.duration is None and args.num_frames is None:
        args.duration = 30.0 if args.interactive else 2.0
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    try:  # every argument checked before the server is asked
        output = _output_path(args.output)
        image = _read_image(args.image) if args.image else None
        video = _read_video(args.video) if args.video else None
        total_s = args.num_frames / args.fps if args.num_frames else args.duration
        prompt_at = _switch_times(args.prompt_at, total_s)
    except BadArgument as e:
        print(f"helios-client: error: {e}", file=sys.stderr)
        return 2
    steered = bool(prompt_at) or args.interactive
    params = dict(duration_s=args.duration, num_frames=args.num_frames, fps=args.fps,
                  seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, image=image, session_id=new_session_id() if steered else None,
                  video=video)
    partial = output.with_name(f".{output.stem}.partial{output.suffix}")  # as helios.video's
    writer, bar, chunks, t0 = None, None, None, time.perf_counter()
    done, steering = False, None

    def report(line: str) -> None:
        (bar.write if bar is not None else print)(line, file=sys.stderr)

    try:
        client = HeliosClient(url, args.protocol, args.timeout)
        if steered:
            client.check_ready()
            # Over gRPC the updates share the stream's client, hence its connection: behind
            # a Service with several replicas they reach the one that runs the stream.
            steering = _Steering(client if args.protocol == "grpc" else
                                 HeliosClient(url, args.protocol, args.timeout),
                                 params["session_id"],
                                 [(round(at * args.fps), p) for at, p in prompt_at],
                                 args.interactive, report)
            steering.start()
        if args.protocol == "grpc":
            chunks = client.stream(args.prompt, **params)
        else:
            client.check_ready()
            chunks = [client.generate(args.prompt, **params)]
        for chunk in chunks:
            frames = chunk if isinstance(chunk, np.ndarray) else chunk.frames
            if writer is None:
                writer = Mp4Writer(str(partial), args.fps)
                if not args.no_progress:
                    from tqdm import tqdm  # noqa: PLC0415
                    total = args.num_frames or round(args.duration * args.fps)
                    bar = tqdm(total=total, unit="frame", desc="receiving", file=sys.stderr)
            writer.write(frames)
            if bar is not None:
                bar.update(len(frames))
                bar.set_postfix(fps=f"{writer.frames / (time.perf_counter() - t0):.1f}")
        done = True
    except ServerUnavailable as e:
        print(f"helios-client: error: {e}", file=sys.stderr)
        return 3
    except RequestError as e:
        print(f"helios-client: error: {e}", file=sys.stderr)
        return 2 if e.invalid_argument else 1
    except KeyboardInterrupt:
        print("helios-client: interrupted, request cancelled", file=sys.stderr)
        return 130
    except OSError as e:  # the disk filled up, the folder went away, ...
        print(f"helios-client: error: output cannot be written: {e}", file=sys.stderr)
        return 2
    finally:
        if steering is not None:
            steering.ended.set()
        if hasattr(chunks, "close"):  # cancels the request on the server if it still runs
            chunks.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if done and writer is not None:
            partial.replace(output)
        else:
            partial.unlink(missing_ok=True)
    dt = time.perf_counter() - t0
    print(f"wrote {writer.frames} frames to {args.output} in {dt:.1f} s "
          f"({writer.frames / dt:.1f} frames/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
