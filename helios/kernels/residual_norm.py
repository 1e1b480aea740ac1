"""A refiner block's gated residual add, layer norm and modulation, as one Triton-lang kernel.

Twice a block the refiner adds a branch to the residual stream under a gate and normalizes the
sum for the next product: ``x = x + gate * y``, then ``h = LayerNorm(x) * (1 + scale) + shift``
(no affine weights; the modulation's rows are per batch element). Compiled by Inductor it is
one looped reduction that reads each row twice, at 62-68 % of the copy rate at 14b's 720p shape
on an H200 (docs/performance.md). This kernel holds a program's rows in registers: it
reads x and y once and writes the new x and h once.

Rounding is the compiled graph's: the sum in float32 rounded once to the input's dtype (the
residual stream as stored), its statistics and the modulated row in float32 from that stored
value, rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _residual_norm_kernel(X, Y, G, SH, SC, XO, HO, n, eps, s_g, s_sh, s_sc,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    # A program takes ROWS tokens of one batch element; the modulation's rows are read once.
    b = tl.program_id(1)
    tok = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK_D)
    in_d = col < D
    mask = (tok < n)[:, None] & in_d[None, :]
    at = (b * n + tok)[:, None] * D + col[None, :]

    gate = tl.load(G + b * s_g + col, mask=in_d, other=0.0).to(tl.float32)
    x = tl.load(X + at, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + at, mask=mask, other=0.0).to(tl.float32)
    x = (x + gate[None, :] * y).to(XO.dtype.element_ty)
    tl.store(XO + at, x, mask=mask)

    xf = x.to(tl.float32)
    mean = tl.sum(xf, 1) / D
    diff = tl.where(mask, xf - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(diff * diff, 1) / D + eps)
    shift = tl.load(SH + b * s_sh + col, mask=in_d, other=0.0).to(tl.float32)
    scale = tl.load(SC + b * s_sc + col, mask=in_d, other=0.0).to(tl.float32)
    h = diff * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(HO + at, h.to(HO.dtype.element_ty), mask=mask)


# Tokens a program and its warps: the defaults are the fastest of benchmarks/fusions.py's sweep
# at 14b's width (2048) on an H200 (docs/performance.md).
ROWS, WARPS = 1, 8


def residual_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                  scale: torch.Tensor, eps: float, rows: int = ROWS, warps: int = WARPS):
    """x, y [B, N, D]; gate, shift, scale [B, 1, D] (any batch stride, D contiguous) ->
    (x + gate * y, LayerNorm(x + gate * y) * (1 + scale) + shift), each [B, N, D] in x's
    dtype; the norm without weights, over D, with ``eps``."""
    b, n, d = x.shape
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {list(x.shape)}, got {list(y.shape)}")
    for name, m in (("gate", gate), ("shift", shift), ("scale", scale)):
        if m.shape != (b, 1, d) or m.stride(2) != 1:
            raise ValueError(f"{name} must have shape [{b}, 1, {d}] with its last dimension "
                             f"contiguous, got {list(m.shape)} strides {list(m.stride())}")
    x, y = x.contiguous(), y.contiguous()
    x_out, h = torch.empty_like(x), torch.empty_like(x)
    grid = (triton.cdiv(n, rows), b)
    _residual_norm_kernel[grid](x, y, gate, shift, scale, x_out, h, n, eps,
                                gate.stride(0), shift.stride(0), scale.stride(0),
                                D=d, BLOCK_D=triton.next_power_of_2(d), ROWS=rows,
                                num_warps=warps)
    return x_out, h
