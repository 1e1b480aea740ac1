"""The Helios web gateway: a page that streams and steers a video, OpenAI-style video jobs
(``/v1/videos``) and a realtime WebSocket (``/v1/realtime``), in front of a Triton server
that serves the ``helios`` models. ``create_app`` builds the ASGI application."""

from .app import GatewaySettings, create_app

__all__ = ["GatewaySettings", "create_app"]
