"""The refiner's custom attention as one Triton-lang kernel.

softmax(q [k_ctx; k_self]^T * scale) [v_ctx; v_self] for q [B, H, Nq, D], without building
the concatenation: one flash-attention pass (online softmax, float32 accumulators) walks the
context keys/values, then the noisy tokens' own, with a single running maximum and
denominator. Standalone (no import of the helios package) because the TensorRT plugin loads
it on its own; the helios package imports it on CUDA (helios/attention.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _fold(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
          start, n_keys, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
          HEAD_DIM: tl.constexpr):
    """Fold one block of BLOCK_N keys/values from ``start`` into the running softmax state.
    Only the last block of a source is MASKED (its keys past ``n_keys`` are not read)."""
    keys = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = k_base + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASKED:
        valid = keys < n_keys
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)                 # [BLOCK_N, D]
        s = tl.where(valid[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
    else:
        k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k))
    # The scale goes into the exponent (log2 domain), one multiply-add per score.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # every block has a valid key: finite
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)                 # [BLOCK_N, D]
    else:
        v = tl.load(v_ptrs)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            n_keys, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Fold the keys/values [0, n_keys) of one source into the running softmax state: whole
    blocks without masks, then the partial last one."""
    n_whole = (n_keys // BLOCK_N) * BLOCK_N
    for start in range(0, n_whole, BLOCK_N):
        acc, m_i, l_i = _fold(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd,
                              stride_vn, stride_vd, start, n_keys, qk_scale, False, BLOCK_N,
                              HEAD_DIM)
    if n_whole < n_keys:
        acc, m_i, l_i = _fold(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd,
                              stride_vn, stride_vd, n_whole, n_keys, qk_scale, True, BLOCK_N,
                              HEAD_DIM)
    return acc, m_i, l_i


_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
                                (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4))]


@triton.jit
def _tile(Q, KC, VC, KS, VS, O, b, h, pid_m,
          sqb, sqh, sqn, sqd, skcb, skch, skcn, skcd, svcb, svch, svcn, svcd,
          sksb, sksh, sksn, sksd, svsb, svsh, svsn, svsd, sob, soh, son, sod,
          NQ, NC, NS, qk_scale,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One BLOCK_M tile of queries of one (batch, head): context keys, then its own."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < NQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=rows, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, KC + b * skcb + h * skch, VC + b * svcb + h * svch,
                            skcn, skcd, svcn, svcd, NC, qk_scale, BLOCK_N, HEAD_DIM)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, KS + b * sksb + h * sksh, VS + b * svsb + h * svsh,
                            sksn, sksd, svsn, svsd, NS, qk_scale, BLOCK_N, HEAD_DIM)
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=rows)


@triton.autotune(_CONFIGS, key=["NQ", "NC", "NS", "HEAD_DIM"])
@triton.jit
def _context_attention_kernel(
        Q, KC, VC, KS, VS, O,
        sqb, sqh, sqn, sqd, skcb, skch, skcn, skcd, svcb, svch, svcn, svcd,
        sksb, sksh, sksn, sksd, svsb, svsh, svsn, svsd, sob, soh, son, sod,
        H, NQ, NC, NS, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Any strides (the PyTorch runtime passes views)."""
    bh = tl.program_id(1)
    _tile(Q, KC, VC, KS, VS, O, bh // H, bh % H, tl.program_id(0),
          sqb, sqh, sqn, sqd, skcb, skch, skcn, skcd, svcb, svch, svcn, svcd,
          sksb, sksh, sksn, sksd, svsb, svsh, svsn, svsd, sob, soh, son, sod,
          NQ, NC, NS, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM)


@triton.jit
def context_attention_aot_kernel(
        Q, KC, VC, KS, VS, NQ, NC, NS, O,
        H: tl.constexpr, QK_SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The TensorRT plugin's entry point: TensorRT launches a compiled kernel with its
    parameters ordered inputs, scalars, outputs, and hands it dense tensors, so the strides
    follow from the sizes; heads, scale and tiles are compile-time constants."""
    bh = tl.program_id(1)
    d = HEAD_DIM
    _tile(Q, KC, VC, KS, VS, O, bh // H, bh % H, tl.program_id(0),
          H * NQ * d, NQ * d, d, 1, H * NC * d, NC * d, d, 1, H * NC * d, NC * d, d, 1,
          H * NS * d, NS * d, d, 1, H * NS * d, NS * d, d, 1, H * NQ * d, NQ * d, d, 1,
          NQ, NC, NS, QK_SCALE, BLOCK_M, BLOCK_N, HEAD_DIM)


# The tile the AOT kernel is compiled with: the autotuner's pick at all three measured shapes on
# the H100 (docs/performance.md), 14b at 720p included.
AOT_BLOCK_M, AOT_BLOCK_N, AOT_NUM_WARPS, AOT_NUM_STAGES = 64, 64, 4, 3


def context_attention_dense(q, k_ctx, v_ctx, k_self, v_self, scale: float) -> torch.Tensor:
    """The AOT kernel launched from PyTorch with the plugin's argument order and tile: what
    the TensorRT engine runs, testable without TensorRT (dense inputs only)."""
    b, h, nq, d = q.shape
    o = torch.empty_like(q)
    grid = (triton.cdiv(nq, AOT_BLOCK_M), b * h)
    context_attention_aot_kernel[grid](
        q.contiguous(), k_ctx.contiguous(), v_ctx.contiguous(), k_self.contiguous(),
        v_self.contiguous(), nq, k_ctx.shape[2], k_self.shape[2], o,
        H=h, QK_SCALE=scale * LOG2E, BLOCK_M=AOT_BLOCK_M, BLOCK_N=AOT_BLOCK_N, HEAD_DIM=d,
        num_warps=AOT_NUM_WARPS, num_stages=AOT_NUM_STAGES)
    return o


def context_attention(q, k_ctx, v_ctx, k_self, v_self, scale: float | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, Nq, D]; k_ctx, v_ctx [B, H, Nc, D] (Nc may be 0); k_self, v_self [B, H, Ns, D]
    (Ns >= 1). CUDA tensors of one dtype (bf16 / fp16 / fp32); D a power of two >= 16."""
    b, h, nq, d = q.shape
    for name, t, n in (("k_ctx", k_ctx, None), ("v_ctx", v_ctx, k_ctx.shape[2]),
                       ("k_self", k_self, None), ("v_self", v_self, k_self.shape[2])):
        if t.dim() != 4 or t.shape[:2] != (b, h) or t.shape[3] != d or (n is not None and t.shape[2] != n):
            raise ValueError(f"{name} must have shape [{b}, {h}, N, {d}], got {list(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
    if not q.is_cuda:
        raise ValueError("context_attention runs on CUDA tensors")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")
    if k_self.shape[2] < 1:
        raise ValueError("k_self must hold at least one key")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    o = torch.empty_like(q) if out is None else out
    grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * h)  # noqa: E731
    # Tiles are autotuned per shape on first use (the refiner has a handful of shapes).
    _context_attention_kernel[grid](
        q, k_ctx, v_ctx, k_self, v_self, o,
        *q.stride(), *k_ctx.stride(), *v_ctx.stride(), *k_self.stride(), *v_self.stride(),
        *o.stride(), h, nq, k_ctx.shape[2], k_self.shape[2], scale * LOG2E, HEAD_DIM=d)
    return o


def compile_aot(dtype: str, heads: int, head_dim: int, scale: float):
    """The AOT kernel compiled to PTX for the TensorRT plugin: (compiled kernel, entry name).
    dtype is Triton's name ("bf16", "fp16", "fp32")."""
    ptr = f"*{dtype}"
    src = triton.compiler.ASTSource(
        fn=context_attention_aot_kernel,
        signature={"Q": ptr, "KC": ptr, "VC": ptr, "KS": ptr, "VS": ptr,
                   "NQ": "i32", "NC": "i32", "NS": "i32", "O": ptr},
        constexprs={"H": heads, "QK_SCALE": scale * LOG2E, "BLOCK_M": AOT_BLOCK_M,
                    "BLOCK_N": AOT_BLOCK_N, "HEAD_DIM": head_dim})
    compiled = triton.compile(src, options={"num_warps": AOT_NUM_WARPS,
                                            "num_stages": AOT_NUM_STAGES})
    # TensorRT passes exactly the parameters above; a kernel that wanted Triton's scratch
    # buffers would read garbage pointers.
    for key in ("global_scratch_size", "profile_scratch_size"):
        if getattr(compiled.metadata, key, 0):
            raise RuntimeError(f"the AOT kernel needs {key}, which TensorRT does not provide")
    return compiled, compiled.metadata.name
