"""GPU speed switches shared by the in-process pipeline and the Triton stage models.

On CUDA, with ``compile`` on: cuDNN times its convolution algorithms per shape and
keeps the fastest (the VAE decoder is all convolutions), and torch.compile fuses the
elementwise work of the refiner's context encoding and denoising steps and of the VAE decoder
(norms, modulation, activations) into few kernels around the matmuls and convolutions. Shapes
are fixed per configuration, so each compiles on its first call (the servers' warm-up
request) and stays. With ``cuda_graphs`` on too, each refiner render then replays as one CUDA
graph per input shape. The switches come from the caller (``helios.settings`` reads them from
the environment at the entry points).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("helios.accel")


class CompiledOrEager:
    """``fn`` through torch.compile; if compiling fails (usually at the first call; in a
    process with an ASCII locale already when torch.compile loads Inductor's templates), a
    warning names the piece and ``fn`` runs eagerly from then on: same numbers, less speed."""

    def __init__(self, fn, name: str, **compile_kw):
        self.fn, self.name = fn, name
        self.compiled = True
        try:
            self.run = torch.compile(fn, **compile_kw)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        log.warning("%s stays eager, torch.compile failed: %s: %s", self.name,
                    type(e).__name__, e)
        self.compiled = False

    def __call__(self, *args, **kwargs):
        if self.compiled:
            try:
                return self.run(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure; eager is exact
                self._fail(e)
        return self.fn(*args, **kwargs)


def accelerate(device, refiner=None, vae=None, compile: bool = True,
               cuda_graphs: bool = True) -> list[str]:
    """Switch the speed-ups on for whichever stages are given; returns what was switched on.
    Nothing changes on a CPU or with ``compile`` off."""
    if torch.device(device).type != "cuda" or not compile:
        return []
    torch.backends.cudnn.benchmark = True
    done = ["cudnn.benchmark"]
    if refiner is not None:
        refiner.compile_steps()
        done.append("refiner steps compiled")
        if cuda_graphs:
            refiner.capture_renders()
            done.append("refiner renders captured as CUDA graphs")
    if vae is not None:
        # Wrapped through the instance's forward, so the module's state_dict keys stay as they are.
        vae.decoder.forward = CompiledOrEager(vae.decoder.forward, "VAE decoder")
        done.append("vae decoder compiled")
    return done
