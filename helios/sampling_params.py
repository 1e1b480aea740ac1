"""A stream's sampling settings (temperature, top-k, top-p, seed) and their checks.

Kept apart from ``helios.sampling``, which draws with them, so that the processes that only
check a request (the Triton front models) need no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import HeliosError

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 0          # 0: no top-k filter
    top_p: float = 1.0      # 1.0: no nucleus filter
    seed: int = 0

    def validate(self) -> "SamplingParams":
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise HeliosError("temperature", f"must be a finite number >= 0, got {t}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise HeliosError("top_k", f"must be an integer >= 0 (0 disables it), got {self.top_k}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise HeliosError("top_p", f"must be in (0, 1], got {p}")
        if not isinstance(self.seed, int) or not (0 <= self.seed <= INT64_MAX):
            raise HeliosError("seed", f"must be an integer in [0, 2**63-1], got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
