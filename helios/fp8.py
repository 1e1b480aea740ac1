"""FP8 weights for the AR backbone (``--ar-fp8``) and the refiner (``--refiner-fp8``) of the
torch runtime.

**AR backbone.** A decode step reads every weight once for one token per stream, so it is
bound by weight bytes: e4m3 weights (1 byte) with one float32 scale per output channel halve
them against bf16. Activations stay bf16. q/k/v and gate/up are merged into one matrix each
before quantizing (``quantize_ar``). Up to ``KERNEL_MAX_ROWS`` rows a Triton-lang kernel reads
the FP8 weight tile, widens it to float16 in registers and accumulates in float32; the weight
is never materialised in bf16:

- decode steps (up to ``GEMV_MAX_ROWS`` rows): the weight's columns are cut into slices
  (split-K, ``split_k``) so that even the narrow products give every multiprocessor a few
  programs, and the slices' partial sums are added after; one row runs an FMA kernel, more
  rows the tensor cores;
- prefills (up to ``KERNEL_MAX_ROWS``): blocks of 64 rows on the tensor cores, the blocks of
  one weight tile side by side so that they share it in L2.

Larger batches dequantize the weight per call and run the ordinary matmul. Measured on an
H200 (2026-12-01, ``benchmarks/fp8_gemv.py``, the 40 layers' products in one CUDA graph):
3.88 ms at one row against 5.95 in bf16, 4.41 at four rows, 15.5 ms for a 96-row prefill
(86.5 dequantizing per call). ``torch._scaled_mm`` measured no gain at batch 1: it pads the
activation to a full tile and quantizes it.

The per-channel scale is amax / 448 (e4m3's largest normal), so every row uses the full range.

**Refiner.** A denoising step multiplies thousands of tokens (3600 a frame at 14b) by each
weight: it is bound by the tensor cores' rate, which is twice as high for e4m3 as for bf16
on Hopper. ``FP8MatmulLinear`` keeps the weight in e4m3 with per-output-channel scales,
quantizes each activation row on the fly with its own scale (amax / 448), and multiplies
on the FP8 tensor cores through ``torch._scaled_mm`` (row-wise scales, bf16 out; on CUDA
the fast accumulation mode, which skips the periodic promotion of partial sums to float32
registers, as FP8 inference usually does); the bias is added after. Under
torch.compile the activation's amax and cast fuse into the kernel that produced it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ar_backbone import fuse_projections

E4M3_MAX = 448.0
GEMV_MAX_ROWS = 16      # decode steps: split-K, the rows in one block
KERNEL_MAX_ROWS = 256   # prefills up to here: the kernel's row blocks; above, dequantized

try:  # the kernel exists where triton does (CUDA machines); the reference path runs anywhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

if triton is not None:
    # The split-K kernels: the weight's columns cut into SPLIT_K slices, each program one
    # BLOCK_N x slice tile, its partial sums to P[split] (float32) or straight to the output
    # when there is one slice. The weight widens to float16, not bfloat16: Hopper converts
    # two e4m3 values to two float16 in one instruction (cvt.rn.f16x2.e4m3x2), exactly (every
    # e4m3 value is a float16), and the activation rows are cast to float16 as they load.
    # The tiles each kernel's autotuner picked at the 14b's shapes among 14 (H200, 2026-12-01,
    # benchmarks/fp8_gemv.py), and one beside them.
    def _configs(*tiles):
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n, k, w, s in tiles]

    @triton.autotune(_configs((32, 128, 4, 4), (64, 128, 4, 4), (16, 256, 4, 4), (32, 256, 4, 4)),
                     key=["N", "K", "BLOCK_M", "SPLIT_K"])
    @triton.jit
    def _fp8_gemv_dot_kernel(X, W, S, P, M, N, K, K_PER_SPLIT, sxm, swn, spk, spm,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             SPLIT_K: tl.constexpr):
        """P[split, m, n] = sum over the split's k of X[m, k] * W[n, k] * S[n], on the tensor
        cores (the rows padded to BLOCK_M). The row blocks are the grid's first axis, so that
        the programs reading one weight tile run together and share it in L2."""
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(X + offs_m[:, None] * sxm + kk[None, :],
                        mask=(offs_m[:, None] < M) & (kk[None, :] < k_hi), other=0.0)
            w = tl.load(W + offs_n[:, None] * swn + kk[None, :],
                        mask=(offs_n[:, None] < N) & (kk[None, :] < k_hi), other=0.0)
            acc = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
        s = tl.load(S + offs_n, mask=offs_n < N, other=0.0)
        y = acc * s[None, :]
        tl.store(P + pid_k * spk + offs_m[:, None] * spm + offs_n[None, :],
                 y.to(P.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.autotune(_configs((8, 512, 2, 4), (16, 512, 4, 3), (16, 256, 4, 4), (8, 1024, 4, 3),
                              (32, 256, 4, 4)),
                     key=["N", "K", "BLOCK_M", "SPLIT_K"])
    @triton.jit
    def _fp8_gemv_fma_kernel(X, W, S, P, M, N, K, K_PER_SPLIT, sxm, swn, spk, spm,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             SPLIT_K: tl.constexpr):
        """The same partial sums without tensor cores, for one row: a [BLOCK_N, BLOCK_K]
        float32 accumulator of the widened weight times the row, summed over k at the end."""
        pid_n, pid_k = tl.program_id(1), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < k_hi
            w = tl.load(W + offs_n[:, None] * swn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
            x = tl.load(X + kk, mask=k_ok, other=0.0)
            acc += w.to(tl.float16).to(tl.float32) * x.to(tl.float32)[None, :]
        s = tl.load(S + offs_n, mask=n_ok, other=0.0)
        y = tl.sum(acc, axis=1) * s
        tl.store(P + pid_k * spk + offs_n, y.to(P.dtype.element_ty), mask=n_ok)


# One row (one stream's decode step) takes the FMA kernel: over the 40 layers' products of
# the 14b in one CUDA graph, 3.88 ms against 4.56 for the tensor-core kernel (H200,
# 2026-12-01, benchmarks/fp8_gemv.py); more rows take the tensor-core kernel.
FMA_MAX_ROWS = 1
_SMS = {}


def split_k(n: int, k: int, device) -> int:
    """How many slices the split-K kernels cut a weight's columns into: enough that the
    narrowest tile count (n / 16 programs a slice) gives every multiprocessor about four
    programs, in slices of at least 1024 columns."""
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-4 * _SMS[device] // -(-n // 16))
    return max(1, min(want, k // 1024))


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
             splits: int | None = None, fma: bool | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16, M <= KERNEL_MAX_ROWS), weight [N, K] e4m3, scale [N] -> [M, N].
    ``splits``: the K slices (default ``split_k``; one above GEMV_MAX_ROWS rows, where the
    row blocks fill the GPU); ``fma`` picks the kernel (default: the FMA one for one row)."""
    m, k = x.shape
    n = weight.shape[0]
    x = x.contiguous()
    block_m = max(16, triton.next_power_of_2(m)) if m <= GEMV_MAX_ROWS else 64
    splits = splits or (split_k(n, k, x.device) if m <= GEMV_MAX_ROWS else 1)
    per_split = -(-k // splits)
    per_split = -(-per_split // 16) * 16  # a multiple of 16: loads stay 16 bytes wide
    splits = -(-k // per_split)
    if splits == 1:
        p = torch.empty(1, m, n, device=x.device, dtype=x.dtype)
    else:
        p = torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(m, block_m), triton.cdiv(n, meta["BLOCK_N"]), splits)
    fma = m <= FMA_MAX_ROWS if fma is None else fma
    if fma and m > 1:
        raise ValueError(f"the FMA kernel takes one row, not {m}")
    kernel = _fp8_gemv_fma_kernel if fma else _fp8_gemv_dot_kernel
    kernel[grid](x, weight, scale, p, m, n, k, per_split, x.stride(0), weight.stride(0),
                 p.stride(0), p.stride(1), BLOCK_M=block_m, SPLIT_K=splits)
    return p[0] if splits == 1 else p.sum(0).to(x.dtype)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 [N, K], float32 scale [N]) with amax per output channel at 448
    (FP8MatmulLinear quantizes its activation rows the same way)."""
    wf = w.detach().float()
    scale = wf.abs().amax(1).clamp(min=1e-12) / E4M3_MAX
    return (wf / scale[:, None]).to(torch.float8_e4m3fn), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """e4m3 [N, K] and its per-channel scale [N] -> the weight in ``dtype``."""
    return (weight.float() * scale[:, None]).to(dtype)


class FP8Linear(nn.Module):
    """A bias-free nn.Linear with e4m3 weights and per-output-channel scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("FP8Linear takes the AR backbone's bias-free projections")
        q, s = quantize_weight(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", s)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Fixed here, so that a compiled decode step sees a constant.
        self.splits = split_k(*q.shape, q.device) if q.is_cuda else None

    def dequantized(self, dtype) -> torch.Tensor:
        return dequantize(self.weight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.is_cuda and triton is not None and rows <= KERNEL_MAX_ROWS:
            y = fp8_gemv(x.reshape(rows, -1), self.weight, self.scale, self.splits)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized(x.dtype))


def quantize_ar(model: nn.Module, fuse: bool = True) -> int:
    """Replace the projections of every decoder layer (attention q/k/v/o, MLP gate/up/down) by
    FP8Linear, in place; embeddings, norms and the head stay as they are (the head is 0.4 % of
    the 14b AR's bytes and sets the logits directly). With ``fuse``, q/k/v and gate/up are
    first merged into one matrix each (``fuse_projections``; the scales are per output
    channel, so the quantized values are the same): the GEMV kernel then runs 4 products a
    layer, and k and v (a fifth of q each) no longer run as products too small to fill the
    GPU. Returns the bytes saved."""
    if fuse:
        fuse_projections(model)
    saved = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    fp8 = FP8Linear(child).to(child.weight.device)
                    saved += child.weight.numel() * child.weight.element_size() \
                        - fp8.weight.numel() - fp8.scale.numel() * 4
                    setattr(parent, name, fp8)
    return saved


class FP8MatmulLinear(nn.Module):
    """nn.Linear for many rows at a time: e4m3 weight [N, K] with a float32 scale per output
    channel, each activation row quantized to e4m3 with its own scale, one ``_scaled_mm``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, s = quantize_weight(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", s[None])  # [1, N]: _scaled_mm's row-wise layout
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize_weight(x.reshape(-1, self.in_features))  # a scale per row
        sx = sx[:, None]
        if x.is_cuda:  # row-wise scales give bf16 out; fast accumulation is the Hopper FP8 rate
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.scale,
                                 out_dtype=torch.bfloat16, use_fast_accum=True).to(x.dtype)
        else:  # the same product of quantized values (CPU _scaled_mm: per-tensor scales only)
            y = F.linear(xq.float() * sx, self.weight.float() * self.scale.t()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize_refiner(refiner: nn.Module) -> int:
    """Replace the four token-wise projections of every refiner block (qkv, attention out,
    MLP in and out: all but a few per cent of a step's matmul FLOPs) by FP8MatmulLinear, in
    place. The adaLN modulation (one row per frame), patch embeddings, time embedding and
    final projection stay as they are. Returns the bytes saved."""
    saved = 0
    for block in refiner.blocks:
        for name in ("qkv", "proj", "fc1", "fc2"):
            lin = getattr(block, name)
            fp8 = FP8MatmulLinear(lin).to(lin.weight.device)
            saved += lin.weight.numel() * (lin.weight.element_size() - 1) - fp8.scale.numel() * 4
            setattr(block, name, fp8)
    return saved
