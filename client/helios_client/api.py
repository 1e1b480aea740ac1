"""The Python API under ``helios-client``.

gRPC streams: ``stream`` yields one ``Chunk`` per response of the decoupled ``helios`` model,
as soon as it arrives: a latent frame's 4 frames, except that the stream's first frame comes
alone, ahead of the other three (``Chunk.offset`` says where each chunk's frames go). HTTP
cannot call a decoupled model, so over HTTP ``generate`` asks the ``helios_video`` model for
the whole video in one response.
"""

from __future__ import annotations

import queue
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

STREAM_MODEL, VIDEO_MODEL, UPDATE_MODEL = "helios", "helios_video", "helios_update"


class ServerUnavailable(RuntimeError):
    """The server cannot be reached or is not ready."""


class RequestError(RuntimeError):
    """The server answered the request with an error (e.g. an invalid parameter)."""

    def __init__(self, message: str, invalid_argument: bool):
        super().__init__(message)
        self.invalid_argument = invalid_argument


@dataclass(frozen=True)
class Served:
    height: int
    width: int
    max_prompt_bytes: int


@dataclass
class Chunk:
    frames: np.ndarray   # uint8 [T, H, W, 3]
    offset: int
    final: bool


def _text(value: str) -> np.ndarray:
    return np.array([value.encode("utf-8")], dtype=np.object_)


def _inputs(module, prompt, duration_s=None, num_frames=None, fps=None, seed=None,
            temperature=None, top_k=None, top_p=None, image=None, session_id=None, video=None,
            pace_s=None):
    spec = [("PROMPT", _text(prompt), "BYTES")]
    for name, value, dtype, np_type in (
            ("DURATION_S", duration_s, "FP32", np.float32), ("NUM_FRAMES", num_frames, "INT32", np.int32),
            ("FPS", fps, "INT32", np.int32), ("SEED", seed, "INT64", np.int64),
            ("TEMPERATURE", temperature, "FP32", np.float32), ("TOP_K", top_k, "INT32", np.int32),
            ("TOP_P", top_p, "FP32", np.float32), ("PACE_S", pace_s, "FP32", np.float32)):
        if value is not None:
            spec.append((name, np.array([value], dtype=np_type), dtype))
    if image is not None:
        spec.append(("IMAGE", np.ascontiguousarray(image, dtype=np.uint8), "UINT8"))
    if session_id is not None:
        spec.append(("SESSION_ID", _text(session_id), "BYTES"))
    if video is not None:
        spec.append(("VIDEO", np.ascontiguousarray(video, dtype=np.uint8), "UINT8"))
    out = []
    for name, array, dtype in spec:
        t = module.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        out.append(t)
    return out


# The server names the offending input first: "TOP_P must be in (0, 1], got 1.5". Errors of a
# gRPC stream carry no status code (only the message), so the message is what tells them apart.
_INPUT_ERROR = re.compile(r"^(PROMPT|NUM_FRAMES|DURATION_S|FPS|SEED|TEMPERATURE|TOP_K|TOP_P|IMAGE"
                          r"|SESSION_ID|AT_FRAME|VIDEO|PACE_S) ")


def _is_invalid_argument(error) -> bool:
    status = getattr(error, "status", lambda: None)()
    return status in ("StatusCode.INVALID_ARGUMENT", "400") or bool(_INPUT_ERROR.match(_message(error)))


# gRPC backs off reconnecting to an address that refused it, for up to 2 minutes, and shares
# that state between every channel of the process. A server that restarts (its supervisor
# heals it in seconds) must be reachable again at once: a channel of its own, short backoff.
# The message limits are tritonclient's own defaults, which channel_args would otherwise drop.
_GRPC_CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1),
                      ("grpc.max_receive_message_length", 2**31 - 1),
                      ("grpc.use_local_subchannel_pool", 1),
                      ("grpc.initial_reconnect_backoff_ms", 250),
                      ("grpc.min_reconnect_backoff_ms", 250),
                      ("grpc.max_reconnect_backoff_ms", 2000)]


class HeliosClient:
    def __init__(self, url: str = "localhost:8001", protocol: str = "grpc", timeout_s: float = 600):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        if protocol == "grpc":
            import tritonclient.grpc as module  # noqa: PLC0415
            self._client = module.InferenceServerClient(url, channel_args=_GRPC_CHANNEL_ARGS)
        else:
            import tritonclient.http as module  # noqa: PLC0415
            self._client = module.InferenceServerClient(url, network_timeout=timeout_s,
                                                        connection_timeout=10)
        self._module = module

    def check_ready(self) -> None:
        try:
            ready = self._client.is_server_ready()
        except Exception as e:  # connection refused, DNS, TLS: all mean "not there"
            raise ServerUnavailable(f"cannot reach the Triton server at {self.url} "
                                    f"({self.protocol}): {_short(e)}") from None
        if not ready:
            raise ServerUnavailable(f"the Triton server at {self.url} is not ready")

    def stream(self, prompt: str, *, duration_s=None, num_frames=None, fps=None, seed=None,
               temperature=None, top_k=None, top_p=None, image=None,
               session_id=None, video=None, pace_s=None) -> Iterator[Chunk]:
        """gRPC only: yield chunks as the server generates them. Closing the iterator early
        cancels the request on the server (its KV cache blocks are freed). ``session_id``
        (unique, hard to guess: ``new_session_id()``) lets ``update`` change its prompt.
        ``video`` (uint8 [T, H, W, 3], T in [4, 120]): a clip to continue; the chunks are the
        continuation. ``pace_s``: the server stays at most that many seconds of video ahead
        of a player started at the first chunk (for a person who watches and steers)."""
        if self.protocol != "grpc":
            raise ValueError("streaming needs protocol='grpc'; use generate() over HTTP")
        self.check_ready()
        responses: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: responses.put((result, error)),
                                  stream_timeout=self.timeout_s)
        finished = False
        try:
            self._client.async_stream_infer(STREAM_MODEL, _inputs(
                self._module, prompt, duration_s, num_frames, fps, seed, temperature, top_k, top_p,
                image, session_id, video, pace_s), enable_empty_final_response=False)
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise RequestError(f"no response from the server for {self.timeout_s:.0f} s",
                                       False) from None
                if error is not None:
                    finished = True
                    raise RequestError(_message(error), _is_invalid_argument(error))
                final = bool(result.as_numpy("FINAL")[0])
                yield Chunk(result.as_numpy("FRAMES"), int(result.as_numpy("FRAME_OFFSET")[0]), final)
                if final:
                    finished = True
                    return
        finally:
            self._client.stop_stream(cancel_requests=not finished)

    def generate(self, prompt: str, **kwargs) -> np.ndarray:
        """The whole video, uint8 [T, H, W, 3]: one HTTP response, or the gRPC stream joined."""
        if self.protocol == "grpc":
            return np.concatenate([c.frames for c in self.stream(prompt, **kwargs)])
        self.check_ready()
        args = {k: kwargs.get(k) for k in ("duration_s", "num_frames", "fps", "seed", "temperature",
                                           "top_k", "top_p", "image", "session_id", "video")}
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        try:
            result = self._client.infer(VIDEO_MODEL, _inputs(self._module, prompt, **args),
                                        timeout=int(self.timeout_s))
        except InferenceServerException as e:
            raise RequestError(_message(e), _is_invalid_argument(e)) from None
        return result.as_numpy("FRAMES")

    def update(self, session_id: str, prompt: str, at_frame: int | None = None,
               wait_s: float = 0.0, stop: Callable[[], bool] | None = None) -> int:
        """A new prompt for the running stream ``session_id``, from ``at_frame`` on (rounded
        up to a latent-frame boundary) or from the next latent frame not yet generated;
        returns the frame it holds from. RequestError for an unknown session, a bad prompt
        or a frame already generated.

        A stream sent a moment ago may not be known to the server yet: with ``wait_s``, an
        update that names no running stream is sent again every 50 ms for up to ``wait_s``
        seconds, until ``stop()`` turns true, or until the server knows the session; then
        the last answer stands."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._update(session_id, prompt, at_frame)
            except RequestError as e:
                if not is_unknown_session(e) or time.monotonic() >= deadline \
                        or (stop is not None and stop()):
                    raise
            time.sleep(0.05)

    def _update(self, session_id: str, prompt: str, at_frame: int | None) -> int:
        inputs = _inputs(self._module, prompt, session_id=session_id)
        if at_frame is not None:
            inputs.append(self._int32("AT_FRAME", at_frame))
        return self._ask_update(inputs)

    def shown(self, session_id: str, frame: int) -> int:
        """Report that this client's player shows ``frame`` of the stream ``session_id`` now:
        a paced stream (``pace_s``) keeps its lead over that frame rather than over the
        server's model of the player. Send it a few times a second while the video plays.
        Returns the frame; RequestError for an unknown session or a frame outside the video."""
        session = self._module.InferInput("SESSION_ID", [1], "BYTES")
        session.set_data_from_numpy(_text(session_id))
        return self._ask_update([session, self._int32("SHOWN_FRAME", frame)])

    def _int32(self, name: str, value: int):
        t = self._module.InferInput(name, [1], "INT32")
        t.set_data_from_numpy(np.array([value], np.int32))
        return t

    def _ask_update(self, inputs) -> int:
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        try:
            if self.protocol == "grpc":
                result = self._client.infer(UPDATE_MODEL, inputs, client_timeout=self.timeout_s)
            else:  # bounded by the client's network_timeout
                result = self._client.infer(UPDATE_MODEL, inputs)
        except InferenceServerException as e:
            raise RequestError(_message(e), _is_invalid_argument(e)) from None
        return int(result.as_numpy("AT_FRAME")[0])

    def served(self) -> "Served":
        """What the server's ``helios`` model serves: its frame size and longest prompt."""
        self.check_ready()
        config = self._client.get_model_config(STREAM_MODEL, **(
            {"as_json": True} if self.protocol == "grpc" else {}))
        config = config.get("config", config)  # gRPC wraps it, HTTP does not
        dims = next(o["dims"] for o in config["output"] if o["name"] == "FRAMES")
        prompt = config["parameters"]["max_prompt_bytes"]["string_value"]
        return Served(int(dims[1]), int(dims[2]), int(prompt))

    def close(self) -> None:
        self._client.close()


def is_unknown_session(error: RequestError) -> bool:
    """Whether an update was refused because no running stream has its session id: the
    stream has not reached the server yet, or it has ended."""
    return "names no running stream" in str(error)


def new_session_id() -> str:
    """A session id nobody else can guess (128 random bits)."""
    return secrets.token_hex(16)


def _message(error) -> str:
    msg = error.message() if hasattr(error, "message") else str(error)
    return msg.strip()


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]
