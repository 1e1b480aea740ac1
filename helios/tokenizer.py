"""The byte-level tokenizer: a prompt's UTF-8 bytes between begin- and end-of-text ids.

No vocabulary file and no torch: the processes that only check or forward prompts (the
Triton front models) import this and nothing heavier.
"""

from __future__ import annotations

from .errors import HeliosError

BOT, EOT = 256, 257


def tokenize(prompt: str, max_bytes: int) -> list[int]:
    """Prompt -> [begin-of-text, UTF-8 bytes..., end-of-text]; validates the prompt."""
    if not isinstance(prompt, str):
        raise HeliosError("prompt", f"must be a string, got {type(prompt).__name__}")
    data = prompt.encode("utf-8")
    if not prompt.strip():
        raise HeliosError("prompt", f"must be 1 to {max_bytes} UTF-8 bytes of text, got an empty prompt")
    if len(data) > max_bytes:
        raise HeliosError("prompt", f"must be 1 to {max_bytes} UTF-8 bytes of text, got {len(data)} bytes")
    return [BOT, *data, EOT]
