"""One phase's optimisation loop: optimiser, warmup + cosine schedule, resumable state,
progress bar and loss log."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from ..errors import HeliosError
from .settings import PHASES


class PhaseRun:
    """Optimiser, warmup + cosine schedule, resumable state, progress bar and loss log."""

    def __init__(self, trainer, phase: str, modules: dict, params, steps: int,
                 lr: float):
        self.t, self.phase, self.modules, self.steps = trainer, phase, modules, steps
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
        warm = min(50, max(1, steps // 10))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warm) *
            (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
        self.path = trainer.state_dir / f"{phase}.pt"
        self.step = 0
        self.history: list[float] = []
        if self.path.is_file():
            state = torch.load(self.path, map_location=trainer.device, weights_only=True)
            for name, m in modules.items():
                m.load_state_dict(state["modules"][name])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.step = state["step"]
            trainer.log(f"{phase}: resuming at step {self.step} of {steps}")

    def save(self) -> None:
        state = {"modules": {n: m.state_dict() for n, m in self.modules.items()},
                 "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "step": self.step}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.t.seed, PHASES.index(self.phase), self.step])

    def __iter__(self):
        bar = tqdm(total=self.steps, initial=self.step, desc=self.phase, unit="step",
                   disable=not self.t.progress, dynamic_ncols=True)
        while self.step < self.steps:
            yield self.step
            self.step += 1
            if self.step % self.t.settings.save_every == 0 or self.step == self.steps:
                self.save()
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(self.history[-20:]):.4f}")
        bar.close()

    def backward(self, loss: torch.Tensor, **parts: float) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        value = loss.item()
        if not math.isfinite(value):
            raise HeliosError("training", f"{self.phase} loss became {value} at step {self.step}")
        self.history.append(value)
        self.t.losses.setdefault(self.phase, []).append(value)
        if self.step % 10 == 0 or self.step == self.steps - 1:
            self.t.record({"phase": self.phase, "step": self.step, "loss": value,
                           "lr": self.sched.get_last_lr()[0], **parts})
