"""One row times a bf16 weight, y = W x, as a Triton-lang kernel: the AR decode step's
products at one stream.

At one row a product reads its weight once and does two FLOPs a weight, so it is bound by the
weight's bytes. Each program reads BLOCK_N whole rows of W in chunks of BLOCK_K columns (each
chunk one coalesced load per row), multiplies them by the matching chunk of x into a float32
[BLOCK_N, BLOCK_K] accumulator and sums it once at the end. The tile is fixed per weight
shape (``config``), not searched at run time: a search of tiles on timings of tens of
microseconds ends on different tiles from one process to the next.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(X, W, Y, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    w_ptrs = W + offs_n[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(X + k0 + offs_k)
        else:
            k_ok = k0 + offs_k < K
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(X + k0 + offs_k, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    tl.store(Y + offs_n, tl.sum(acc, axis=1).to(Y.dtype.element_ty), mask=n_ok)


def _tile(block_n: int, block_k: int, warps: int) -> dict:
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}


# The tile of each weight shape (N, K) of the 14b AR: the fastest of 41 for that shape,
# each timed as the 40 layers' products in one CUDA graph (`python benchmarks/gemv.py`,
# NVIDIA H200, 2026-12-03): 4.05-4.35 TB/s on the large weights, 3.68 on the 5120 x 5120
# ones, 2.18 on k and v's 1024 x 5120 (cuBLAS: 3.48-4.18, 3.12 and 1.28).
TILES: dict[tuple[int, int], dict] = {
    (5120, 5120): _tile(2, 512, 2),      # q, o
    (1024, 5120): _tile(2, 2048, 8),     # k, v
    (13824, 5120): _tile(16, 256, 4),    # gate, up
    (5120, 13824): _tile(2, 1024, 4),    # down
    (7168, 5120): _tile(4, 1024, 2),     # q/k/v fused
    (27648, 5120): _tile(4, 1024, 2),    # gate/up fused
}
DEFAULT_TILE = _tile(4, 1024, 4)


def config(n: int, k: int) -> dict:
    """The kernel's tile and warps for a weight of n rows and k columns."""
    return TILES.get((n, k), DEFAULT_TILE)


def gemv(x: torch.Tensor, weight: torch.Tensor, tile: dict | None = None) -> torch.Tensor:
    """x [1, K] (or [K]) times weight [N, K] transposed -> [1, N] (or [N]), in x's dtype."""
    n, k = weight.shape
    assert x.shape[-1] == k and x.numel() == k, "one row of K values"
    assert weight.stride(1) == 1, "the weight's rows must be contiguous"
    x = x.contiguous()
    tile = dict(tile or config(n, k))
    y = torch.empty(x.shape[:-1] + (n,), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, tile["BLOCK_N"]),)
    _gemv_kernel[grid](x, weight, y, n, k, weight.stride(0), BLOCK_N=tile["BLOCK_N"],
                       BLOCK_K=tile["BLOCK_K"], EVEN_K=k % tile["BLOCK_K"] == 0,
                       num_warps=tile["num_warps"], num_stages=tile.get("num_stages", 1))
    return y
