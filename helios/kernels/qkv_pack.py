"""A refiner block's q/k/v product to FlashAttention-4's inputs, as one Triton-lang kernel.

The product gives each noisy token's q, k and v side by side ([B, N, 3, H, D]). FlashAttention-4
takes q [B, N, H, D] and the keys and values of the context followed by the noisy tokens',
each as one [B, Nc + N, H, D] tensor; between the two, q and k go through the heads' RMS norm
(QK-norm). Compiled by Inductor that is three passes a block: q's norm, k's norm written into
the keys' concatenation, and the values' concatenation, which copy the context's keys and values
again at every step. This kernel reads the product and the context once and writes the three
tensors once.

Rounding is the eager module's (``helios.refiner.HeadRMSNorm``): the normalized row in float32,
rounded to the input's dtype, then times the weight, rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pack_kernel(QKV, KC, VC, WQ, WK, Q, K, V, n_ctx, n_all, eps_q, eps_k,
                 s_qkv_b, s_qkv_n, s_kc_b, s_kc_n, s_kc_h, s_vc_b, s_vc_n, s_vc_h,
                 H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    # A program takes BLOCK (token, head) rows of one batch element, tokens numbered along the
    # keys' sequence: the context's first, then the noisy tokens.
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tok, head = rows // H, rows % H
    d = tl.arange(0, D)[None, :]
    valid = tok < n_all
    ctx = (valid & (tok < n_ctx))[:, None]
    own = (valid & (tok >= n_ctx))[:, None]
    t = tok - n_ctx  # the noisy token's index (negative, and masked, for the context's rows)

    kc = tl.load(KC + b * s_kc_b + tok[:, None] * s_kc_n + head[:, None] * s_kc_h + d,
                 mask=ctx, other=0.0)
    vc = tl.load(VC + b * s_vc_b + tok[:, None] * s_vc_n + head[:, None] * s_vc_h + d,
                 mask=ctx, other=0.0)
    src = QKV + b * s_qkv_b + t[:, None] * s_qkv_n + head[:, None] * D + d
    q = tl.load(src, mask=own, other=0.0).to(tl.float32)
    k = tl.load(src + H * D, mask=own, other=0.0).to(tl.float32)
    v = tl.load(src + 2 * H * D, mask=own, other=0.0)

    dtype = Q.dtype.element_ty
    q = (q * tl.rsqrt(tl.sum(q * q, 1) / D + eps_q)[:, None]).to(dtype).to(tl.float32)
    k = (k * tl.rsqrt(tl.sum(k * k, 1) / D + eps_k)[:, None]).to(dtype).to(tl.float32)
    q = (q * tl.load(WQ + d).to(tl.float32)).to(dtype)
    k = (k * tl.load(WK + d).to(tl.float32)).to(dtype)

    kv = b * n_all * H * D + rows[:, None] * D + d
    tl.store(K + kv, tl.where(ctx, kc, k), mask=valid[:, None])
    tl.store(V + kv, tl.where(ctx, vc, v), mask=valid[:, None])
    tl.store(Q + (b * (n_all - n_ctx) * H * D) + (t * H + head)[:, None] * D + d, q, mask=own)


# Rows of D values a program: 32 rows of 128 at the 14b's head size (8 KiB of bf16 for each of
# q, k and v), 2,244 programs at its 720p shape.
BLOCK_ROWS = 32


def qkv_pack(qkv: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, q_weight: torch.Tensor,
             k_weight: torch.Tensor, q_eps: float, k_eps: float):
    """qkv [B, N, 3 * H * D] (the product, q then k then v, heads in order); k_ctx, v_ctx
    [B, H, Nc, D] (any strides with D contiguous; Nc may be 0); the norms' weights [D] and
    epsilons ->
    q [B, N, H, D] normed, k and v [B, Nc + N, H, D], the context's rows first, k normed."""
    b, h, n_ctx, d = k_ctx.shape
    n = qkv.shape[1]
    if qkv.shape != (b, n, 3 * h * d) or v_ctx.shape != k_ctx.shape:
        raise ValueError(f"qkv must have shape [{b}, N, {3 * h * d}] and v_ctx "
                         f"{list(k_ctx.shape)}, got {list(qkv.shape)} and {list(v_ctx.shape)}")
    if d & (d - 1):
        raise ValueError(f"the head size must be a power of two, got {d}")
    qkv = qkv if qkv.stride(2) == 1 and qkv.stride(1) == 3 * h * d else qkv.contiguous()
    k_ctx = k_ctx if k_ctx.stride(3) == 1 else k_ctx.contiguous()
    v_ctx = v_ctx if v_ctx.stride(3) == 1 else v_ctx.contiguous()
    q = qkv.new_empty(b, n, h, d)
    k = qkv.new_empty(b, n_ctx + n, h, d)
    v = torch.empty_like(k)
    grid = (triton.cdiv((n_ctx + n) * h, BLOCK_ROWS), b)
    _pack_kernel[grid](qkv, k_ctx, v_ctx, q_weight, k_weight, q, k, v, n_ctx, n_ctx + n,
                       q_eps, k_eps,
                       qkv.stride(0), qkv.stride(1), k_ctx.stride(0), k_ctx.stride(2),
                       k_ctx.stride(1), v_ctx.stride(0), v_ctx.stride(2), v_ctx.stride(1),
                       H=h, D=d, BLOCK=BLOCK_ROWS, num_warps=4)
    return q, k, v
