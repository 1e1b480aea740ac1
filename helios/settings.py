"""The one place where Helios reads the environment.

Library code takes every switch as an explicit argument; entry points (the ``helios`` CLI, the
Triton stage models through ``helios_triton``, the benchmarks) read them here once and pass
them on. The variables:

| variable | default | what it switches |
|---|---|---|
| ``HELIOS_CHECKPOINT`` | the shipped ``weights/helios-tiny`` | the CLI's default checkpoint folder |
| ``HELIOS_COMPILE`` | ``1`` | torch.compile of the refiner and VAE decoder on CUDA (``0``: eager) |
| ``HELIOS_CUDA_GRAPHS`` | ``1`` | CUDA graphs for AR decode steps and refiner renders (``0``: off) |
| ``HELIOS_ATTENTION_KERNEL`` | ``1`` | the refiner's Triton-lang attention kernel on CUDA (``0``: SDPA) |
| ``HELIOS_FLASH_ATTENTION`` | ``1`` | FlashAttention-4 for the refiner's attention where ``flash_attn.cute`` is installed, on a Hopper or Blackwell GPU (``0``: the Triton-lang kernel) |
| ``HELIOS_QKV_PACK`` | ``1`` | where FlashAttention-4 runs, its inputs (q and k normed, the context's keys and values before the noisy tokens') made by the one Triton-lang kernel of ``helios/kernels/qkv_pack.py`` (``0``: Inductor's passes) |
| ``HELIOS_QKV_ROWS`` | ``1`` | where the packing runs, for one stream (batch 1): each block's q/k/v product written straight after the context's rows of FlashAttention-4's inputs, q and k normed there by ``helios/kernels/qkv_pack.py``'s ``qkv_rows`` (``0``: the product, then the pack) |
| ``HELIOS_RESIDUAL_NORM`` | ``1`` | the refiner blocks' gated residual adds, each with the layer norm and modulation after it, by the one Triton-lang kernel of ``helios/kernels/residual_norm.py`` on CUDA (``0``: Inductor's kernels) |
| ``HELIOS_AR_GEMV`` | ``1`` | the AR decode step's one-row bf16 products on CUDA by the Triton-lang GEMV of ``helios/kernels/gemv.py`` (``0``: nn.Linear) |
| ``TORCHINDUCTOR_COORDINATE_DESCENT_TUNING`` | unset | Inductor's own switch of its tile tuning; the compiled AR decode step tunes only where it is ``1``, as Inductor does (it stopped paying once ``helios::gemv`` took the step's products: docs/performance.md) |
| ``HELIOS_STACKS_DIR`` | unset | Triton stage processes write their thread stacks there on SIGUSR2 |
| ``HELIOS_DRAIN_FILE`` | unset | set by ``helios_triton.supervisor``: while the file exists, the helios model refuses new streams |
| ``HELIOS_SESSIONS_DIR`` | unset | set by ``helios_triton.server``: the folder of the running streams' mailboxes for prompt updates (``helios_triton.sessions``) |
| ``HELIOS_CALLS_DIR`` | unset | set by ``helios_triton.server``: the folder where the helios model marks the stage calls its streams wait on, for the supervisor's stall check (``helios_triton.calls``) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class Settings:
    checkpoint: Path | None = None
    compile: bool = True
    cuda_graphs: bool = True
    attention_kernel: bool = True
    flash_attention: bool = True
    qkv_pack: bool = True
    qkv_rows: bool = True
    residual_norm: bool = True
    ar_gemv: bool = True
    ar_step_tuning: bool = False
    stacks_dir: Path | None = None
    drain_file: Path | None = None
    sessions_dir: Path | None = None
    calls_dir: Path | None = None


def _switch(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "1").strip()
    if value not in ("0", "1"):
        from .errors import HeliosError  # noqa: PLC0415

        raise HeliosError(name, f"must be 0 or 1, got {value!r}")
    return value == "1"


def from_environment(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    return Settings(
        checkpoint=Path(env["HELIOS_CHECKPOINT"]) if env.get("HELIOS_CHECKPOINT") else None,
        compile=_switch(env, "HELIOS_COMPILE"),
        cuda_graphs=_switch(env, "HELIOS_CUDA_GRAPHS"),
        attention_kernel=_switch(env, "HELIOS_ATTENTION_KERNEL"),
        flash_attention=_switch(env, "HELIOS_FLASH_ATTENTION"),
        qkv_pack=_switch(env, "HELIOS_QKV_PACK"),
        qkv_rows=_switch(env, "HELIOS_QKV_ROWS"),
        residual_norm=_switch(env, "HELIOS_RESIDUAL_NORM"),
        ar_gemv=_switch(env, "HELIOS_AR_GEMV"),
        ar_step_tuning=env.get("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", "0") == "1",
        stacks_dir=Path(env["HELIOS_STACKS_DIR"]) if env.get("HELIOS_STACKS_DIR") else None,
        drain_file=Path(env["HELIOS_DRAIN_FILE"]) if env.get("HELIOS_DRAIN_FILE") else None,
        sessions_dir=Path(env["HELIOS_SESSIONS_DIR"]) if env.get("HELIOS_SESSIONS_DIR") else None,
        calls_dir=Path(env["HELIOS_CALLS_DIR"]) if env.get("HELIOS_CALLS_DIR") else None,
    )
