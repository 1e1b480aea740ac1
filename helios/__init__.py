"""Helios: real-time text-to-video generation (AR backbone + few-step diffusion refiner)."""

from .config import CONFIGS, HeliosConfig, get_config
from .errors import CachePoolExhausted, HeliosError

__version__ = "0.1.0"

__all__ = ["CONFIGS", "CachePoolExhausted", "HeliosConfig", "HeliosError", "get_config",
           "HeliosPipeline", "__version__"]


def __getattr__(name):
    # The pipeline pulls in torch; importing the package for its config or errors does not.
    if name == "HeliosPipeline":
        from .pipeline import HeliosPipeline
        return HeliosPipeline
    raise AttributeError(name)
