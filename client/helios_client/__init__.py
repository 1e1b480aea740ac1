"""Client of the Helios Triton server: ``HeliosClient(url).stream(prompt, ...)``."""

from .api import Chunk, HeliosClient, RequestError, ServerUnavailable

__all__ = ["Chunk", "HeliosClient", "RequestError", "ServerUnavailable"]
