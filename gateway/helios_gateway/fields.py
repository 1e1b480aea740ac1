"""The gateway's request fields, checked before anything reaches Triton. Each bad field is
one line that names it and its allowed range, as everywhere in Helios; a message that Triton
sends back about one of its inputs is renamed to the gateway's field (``DURATION_S`` ->
``seconds``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from helios_client.api import Served

SEED_MAX = 2**63 - 1
# Triton's input names, as the gateway calls them.
TRITON_NAMES = {"PROMPT": "prompt", "DURATION_S": "seconds", "NUM_FRAMES": "seconds",
                "SEED": "seed", "FPS": "fps", "PACE_S": "lead_s", "SHOWN_FRAME": "frame"}


class FieldError(ValueError):
    """A bad field: ``str()`` is the one line for the user."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field} {detail}")
        self.field = field


@dataclass(frozen=True)
class VideoSpec:
    prompt: str
    seconds: float
    seed: int


def prompt(value, most: int, field: str = "prompt") -> str:
    """``most``: the served checkpoint's longest prompt in UTF-8 bytes (``Served``)."""
    if not isinstance(value, str):
        raise FieldError(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise FieldError(field, f"must be 1 to {most} UTF-8 bytes of text, got an empty prompt")
    size = len(value.encode("utf-8"))
    if size > most:
        raise FieldError(field, f"must be 1 to {most} UTF-8 bytes of text, got {size} bytes")
    return value


def seconds(value, most: float) -> float:
    number = _number(value)
    if number is None or not math.isfinite(number) or not 0 < number <= most:
        raise FieldError("seconds", f"must be in (0, {most:g}], got {value!r}")
    return number


def seed(value) -> int:
    if isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise FieldError("seed", f"must be an integer in [0, 2**63-1], got {value!r}")
    return value


def frame(value, total: int) -> int:
    """A frame of the playing video (``total`` frames), as the page reports the one it shows."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < total:
        raise FieldError("frame", f"must be an integer in [0, {total - 1}] (a frame of this "
                                  f"video), got {value!r}")
    return value


def size(value, served: Served) -> None:
    """``size`` (WIDTHxHEIGHT, OpenAI's form) must be the served model's: one size is served."""
    if value is not None and value != f"{served.width}x{served.height}":
        raise FieldError("size", f"must be {served.width}x{served.height} (the size this "
                                 f"server generates), got {value!r}")


def video_spec(body: dict, max_seconds: float, default_seconds: float,
               served: Served) -> VideoSpec:
    """A job's or a live session's fields from a JSON object or a form."""
    unknown = sorted(set(body) - {"prompt", "seconds", "seed", "size", "model"})
    if unknown:
        raise FieldError(unknown[0], "is not a field of a video request "
                                     "(prompt, seconds, seed, size, model)")
    if "prompt" not in body:
        raise FieldError("prompt", "is required")
    size(body.get("size"), served)
    return VideoSpec(prompt(body["prompt"], served.max_prompt_bytes), seconds(body.get("seconds", default_seconds),
                                                     max_seconds),
                     seed(body.get("seed", 0)))


def renamed(message: str) -> tuple[str, str | None]:
    """A Triton error message with its input called by the gateway's name; and that name."""
    head, _, rest = message.partition(" ")
    if head in TRITON_NAMES:
        return f"{TRITON_NAMES[head]} {rest}", TRITON_NAMES[head]
    return message, None


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
