"""A refiner block's q/k/v product to FlashAttention-4's inputs, as one Triton-lang kernel.

The product gives each noisy token's q, k and v side by side ([B, N, 3, H, D]). FlashAttention-4
takes q [B, N, H, D] and the keys and values of the context followed by the noisy tokens',
each as one [B, Nc + N, H, D] tensor; between the two, q and k go through the heads' RMS norm
(QK-norm). Compiled by Inductor that is three passes a block: q's norm, k's norm written into
the keys' concatenation, and the values' concatenation, which copy the context's keys and values
again at every step. This kernel reads the product and the context once and writes the three
tensors once.

``qkv_rows`` goes one step further for a single stream: the product itself is written after
the context's rows of one [B, Nc + N, 3 * H * D] tensor, and its kernel copies the context's
keys and values into the rows before and norms q and k in place, leaving the values where the
product wrote them. FlashAttention-4 reads q, k and v as strided views of that tensor. Per
block at 14b's 720p shape that moves about 73 MB where ``qkv_pack`` moves 103.

Rounding is the eager module's (``helios.refiner.HeadRMSNorm``): the normalized row in float32,
rounded to the input's dtype, then times the weight, rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _program_rows(n_ctx, n_all, H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    # A program takes BLOCK (token, head) rows of one batch element, tokens numbered along the
    # keys' sequence: the context's first, then the noisy tokens. Returns the batch element,
    # the rows, their tokens and heads, the head's columns, and the masks of the rows in
    # range, of the context's rows and of the noisy tokens' rows ([BLOCK, 1]).
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tok, head = rows // H, rows % H
    valid = tok < n_all
    ctx = (valid & (tok < n_ctx))[:, None]
    own = (valid & (tok >= n_ctx))[:, None]
    return b, rows, tok, head, tl.arange(0, D)[None, :], valid, ctx, own


@triton.jit
def _context_row(C, b, tok, head, d, ctx, s_b, s_n, s_h):
    # The context's key or value rows ([B, H, Nc, D] at the given strides), zero elsewhere.
    return tl.load(C + b * s_b + tok[:, None] * s_n + head[:, None] * s_h + d, mask=ctx,
                   other=0.0)


@triton.jit
def _head_norm(x, W, d, eps, D: tl.constexpr, dtype: tl.constexpr):
    # HeadRMSNorm's rounding: the normalized row in float32 rounded to dtype, then times the
    # weight, rounded again.
    x = x.to(tl.float32)
    x = (x * tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]).to(dtype).to(tl.float32)
    return (x * tl.load(W + d).to(tl.float32)).to(dtype)


@triton.jit
def _pack_kernel(QKV, KC, VC, WQ, WK, Q, K, V, n_ctx, n_all, eps_q, eps_k,
                 s_qkv_b, s_qkv_n, s_kc_b, s_kc_n, s_kc_h, s_vc_b, s_vc_n, s_vc_h,
                 H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    b, rows, tok, head, d, valid, ctx, own = _program_rows(n_ctx, n_all, H, D, BLOCK)
    t = tok - n_ctx  # the noisy token's index (negative, and masked, for the context's rows)
    kc = _context_row(KC, b, tok, head, d, ctx, s_kc_b, s_kc_n, s_kc_h)
    vc = _context_row(VC, b, tok, head, d, ctx, s_vc_b, s_vc_n, s_vc_h)
    src = QKV + b * s_qkv_b + t[:, None] * s_qkv_n + head[:, None] * D + d
    dtype = Q.dtype.element_ty
    q = _head_norm(tl.load(src, mask=own, other=0.0), WQ, d, eps_q, D, dtype)
    k = _head_norm(tl.load(src + H * D, mask=own, other=0.0), WK, d, eps_k, D, dtype)
    v = tl.load(src + 2 * H * D, mask=own, other=0.0)

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


@triton.jit
def _rows_kernel(R, KC, VC, WQ, WK, n_ctx, n_all, eps_q, eps_k, s_r_b,
                 s_kc_b, s_kc_n, s_kc_h, s_vc_b, s_vc_n, s_vc_h,
                 H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    # The rows of R [B, Nc + N, 3, H, D]: a context row gets the context's key and value, a
    # noisy token's row its q and k normed in place.
    b, rows, tok, head, d, valid, ctx, own = _program_rows(n_ctx, n_all, H, D, BLOCK)
    at = R + b * s_r_b + tok[:, None] * (3 * H * D) + head[:, None] * D + d
    tl.store(at + H * D, _context_row(KC, b, tok, head, d, ctx, s_kc_b, s_kc_n, s_kc_h),
             mask=ctx)
    tl.store(at + 2 * H * D, _context_row(VC, b, tok, head, d, ctx, s_vc_b, s_vc_n, s_vc_h),
             mask=ctx)
    dtype = R.dtype.element_ty
    q = _head_norm(tl.load(at, mask=own, other=0.0), WQ, d, eps_q, D, dtype)
    k = _head_norm(tl.load(at + H * D, mask=own, other=0.0), WK, d, eps_k, D, dtype)
    tl.store(at, q, mask=own)
    tl.store(at + H * D, k, mask=own)


def qkv_rows(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k_ctx: torch.Tensor,
             v_ctx: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_eps: float,
             k_eps: float) -> torch.Tensor:
    """A block's q/k/v product of its normed tokens h [B, N, C] (``weight`` [3 * H * D, C],
    ``bias`` [3 * H * D]) after the context's rows (k_ctx, v_ctx [B, H, Nc, D], any strides
    with D contiguous; Nc may be 0) -> [B, Nc + N, 3 * H * D]: row Nc + t is token t's q, k
    (each normed by its weight and epsilon) and v; row c < Nc holds the context's key and
    value in the k and v places, its q place unwritten. One product per batch element."""
    b, heads, n_ctx, d = k_ctx.shape
    n, width = h.shape[1], 3 * heads * d
    if (h.dim() != 3 or h.shape[0] != b or weight.shape != (width, h.shape[2])
            or bias.shape != (width,) or v_ctx.shape != k_ctx.shape):
        raise ValueError(f"h must have shape [{b}, N, C], weight [{width}, C], bias [{width}] "
                         f"and v_ctx {list(k_ctx.shape)}, got {list(h.shape)}, "
                         f"{list(weight.shape)}, {list(bias.shape)} and {list(v_ctx.shape)}")
    if d & (d - 1):
        raise ValueError(f"the head size must be a power of two, got {d}")
    k_ctx = k_ctx if k_ctx.stride(3) == 1 else k_ctx.contiguous()
    v_ctx = v_ctx if v_ctx.stride(3) == 1 else v_ctx.contiguous()
    rows = h.new_empty(b, n_ctx + n, width)
    for i in range(b):
        torch.addmm(bias, h[i], weight.t(), out=rows[i, n_ctx:])
    grid = (triton.cdiv((n_ctx + n) * heads, BLOCK_ROWS), b)
    _rows_kernel[grid](rows, k_ctx, v_ctx, q_weight, k_weight, n_ctx, n_ctx + n, q_eps, k_eps,
                       rows.stride(0), k_ctx.stride(0), k_ctx.stride(2), k_ctx.stride(1),
                       v_ctx.stride(0), v_ctx.stride(2), v_ctx.stride(1),
                       H=heads, D=d, BLOCK=BLOCK_ROWS, num_warps=4)
    return rows
