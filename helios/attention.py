"""The refiner's custom attention: queries of the noisy tokens over [history K/V, own K/V].

The history (context) keys/values are computed once per latent frame and reused by every
denoising step; the noisy tokens' own keys/values change each step. Attending over both
without building the concatenation is one kernel: ``helios/kernels/context_attention.py`` holds
the Triton-lang version (also wrapped as the TensorRT plugin); this file holds the plain PyTorch
reference and the dispatch between them.

On CUDA the kernel is used whenever the ``triton`` package is there (PyTorch's CUDA wheels
bring it). Without it, or after ``use_kernel(False)``, attention runs through SDPA over the
concatenation, and a warning says so once: never silently.

On a Hopper or Blackwell GPU where FlashAttention-4 is installed (``flash_attn.cute``, the
``flash-attn-4`` package, built on CUTLASS's Python DSL), it runs instead of the kernel: at
the 720p shape on an H200 it reaches 512 TFLOP/s, the concatenation included, where the
Triton-lang kernel reaches 411 (``benchmarks/attention_kernel.py``). It needs the keys and
values in one tensor, so the concatenation is written in the compiled graph, where Inductor
can have the kernels before it (the key norm) write into it. ``use_kernel(True,
flash=False)`` keeps the Triton-lang kernel.

With FlashAttention-4, a refiner block hands over its q/k/v product whole
(``context_attention_packed``): one Triton-lang kernel (``helios/kernels/qkv_pack.py``)
normalizes q and k and writes q and the concatenated keys and values, where Inductor's passes
took three kernels and copied the context's keys and values at every step. ``use_kernel(True,
pack=False)`` keeps Inductor's passes. For one stream (batch 1) the block goes further
(``context_attention_rows``): its q/k/v product is written after the context's rows of the
tensor FlashAttention-4 reads, and a kernel only norms q and k there and copies the context's
keys and values in; ``use_kernel(True, rows=False)`` keeps the product and the pack apart.

The same switches govern the block's other fused kernel: its gated residual adds with the layer
norm and modulation after them (``helios::residual_norm``, ``helios/kernels/residual_norm.py``),
on CUDA wherever ``triton`` is installed; ``use_kernel(True, norms=False)`` keeps Inductor's.
"""

from __future__ import annotations

import importlib.util
import logging
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("helios.attention")
_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
               SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_state = {"enabled": True, "flash": True, "pack": True, "rows": True, "norms": True,
          "kernel": None, "checked": False, "flash_fn": None, "flash_checked": False}


def use_kernel(enabled: bool, flash: bool = True, pack: bool = True, norms: bool = True,
               rows: bool = True) -> None:
    """Switch the fused kernels on or off for this process (off: SDPA and Inductor's kernels),
    e.g. to compare them; ``flash`` allows FlashAttention-4 before the Triton-lang kernel where
    it is installed, ``pack`` its inputs made by one kernel (``context_attention_packed``),
    ``rows`` a single stream's product written into them (``context_attention_rows``) and
    ``norms`` the blocks' residual adds and norms by one (``norms_selected``).
    ``helios.settings`` reads the entry points' defaults from the environment."""
    _state.update(enabled=enabled, flash=flash, pack=pack, rows=rows, norms=norms, kernel=None,
                  checked=False, flash_fn=None, flash_checked=False)


def use_settings(settings) -> None:
    """``use_kernel`` as the environment's switches say (a ``helios.settings.Settings``:
    HELIOS_ATTENTION_KERNEL, HELIOS_FLASH_ATTENTION, HELIOS_QKV_PACK, HELIOS_QKV_ROWS,
    HELIOS_RESIDUAL_NORM); every entry point applies them so."""
    use_kernel(settings.attention_kernel, flash=settings.flash_attention,
               pack=settings.qkv_pack, norms=settings.residual_norm, rows=settings.qkv_rows)


def fast_inference(t: torch.Tensor) -> bool:
    """Whether a tensor is on the path the fused CUDA kernels take: on CUDA, in a 16-bit
    float, in inference (no gradients), neither exported to ONNX nor traced by TorchScript."""
    return (t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)
            and not torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export()
            and not torch.jit.is_tracing())


@torch.compiler.assume_constant_result
def _flash_selected() -> bool:
    """Whether FlashAttention-4 runs the CUDA attention of this process: switched on, the
    ``flash_attn.cute`` package importable and the current GPU a Hopper or Blackwell one
    (compute capability 9 or 10). Decided once; a failed import is logged, and the
    Triton-lang kernel runs instead."""
    if not _state["flash_checked"]:
        _state["flash_checked"] = True
        major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0
        if (_state["enabled"] and _state["flash"] and major in (9, 10)
                and importlib.util.find_spec("flash_attn") is not None):
            _state["flash_fn"] = _import_flash()
    return _state["flash_fn"] is not None


def _import_flash():
    """``flash_attn.cute.flash_attn_func``, or None (logged) where it does not import."""
    try:
        from flash_attn.cute import flash_attn_func  # noqa: PLC0415
    except ImportError as e:
        log.warning("context attention: FlashAttention-4 does not import (%s); the "
                    "Triton-lang kernel runs instead", e)
        return None
    log.info("context attention: FlashAttention-4 (flash_attn.cute)")
    return flash_attn_func


def _load_kernel():
    """The Triton-lang kernel, or None where it is switched off or ``triton`` is missing.
    An import error of the kernel module itself is raised, not hidden."""
    if not _state["checked"]:
        _state["checked"] = True
        if not _state["enabled"]:
            log.info("context attention: SDPA (the kernel is switched off)")
        elif importlib.util.find_spec("triton") is None:
            log.warning("context attention: SDPA, the triton package is not installed")
        else:
            from .kernels.context_attention import context_attention as kernel  # noqa: PLC0415
            _state["kernel"] = kernel
    return _state["kernel"]


def backend() -> str:
    """The refiner's attention on CUDA in this process, by name: ``flash_attn.cute``
    (FlashAttention-4), ``triton kernel`` or ``sdpa`` (benchmarks record it)."""
    if _flash_selected():
        return "flash_attn.cute"
    return "triton kernel" if _load_kernel() is not None else "sdpa"


def context_attention_reference(q, k_ctx, v_ctx, k_self, v_self, scale: float | None = None):
    """softmax(q [k_ctx; k_self]^T) [v_ctx; v_self], computed in two parts and merged.

    q: [B, H, Nq, D]; k_ctx, v_ctx: [B, H, Nc, D] (Nc may be 0); k_self, v_self: [B, H, Ns, D].
    The two score blocks share one running maximum and one denominator, which is exactly
    the softmax over the concatenated keys.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = q.dtype
    q = q.float()
    s_self = (q @ k_self.float().transpose(-1, -2)) * scale
    m = s_self.amax(-1, keepdim=True)
    if k_ctx.shape[-2]:
        s_ctx = (q @ k_ctx.float().transpose(-1, -2)) * scale
        m = torch.maximum(m, s_ctx.amax(-1, keepdim=True))
        e_ctx = torch.exp(s_ctx - m)
    e_self = torch.exp(s_self - m)
    num = e_self @ v_self.float()
    den = e_self.sum(-1, keepdim=True)
    if k_ctx.shape[-2]:
        num = num + e_ctx @ v_ctx.float()
        den = den + e_ctx.sum(-1, keepdim=True)
    return (num / den).to(dtype)


# ONNX export: one custom-domain node that TensorRT maps to the plugin (helios/export/onnx_export.py
# sets this), or standard ops (SDPA over the concatenation) when False.
EXPORT_AS_CUSTOM_NODE = False
ONNX_DOMAIN, ONNX_OP, PLUGIN_VERSION = "helios", "ContextAttention", "1"


class _ContextAttentionNode(torch.autograd.Function):
    """Exports as ``helios::ContextAttention`` (the TensorRT plugin's name, namespace and
    version); computes the reference when traced."""

    @staticmethod
    def forward(ctx, q, k_ctx, v_ctx, k_self, v_self, scale):
        return context_attention_reference(q, k_ctx, v_ctx, k_self, v_self, scale)

    @staticmethod
    def symbolic(g, q, k_ctx, v_ctx, k_self, v_self, scale):
        out = g.op(f"{ONNX_DOMAIN}::{ONNX_OP}", q, k_ctx, v_ctx, k_self, v_self, scale_f=scale,
                   plugin_namespace_s=ONNX_DOMAIN, plugin_version_s=PLUGIN_VERSION)
        out.setType(q.type())
        return out


def _sdpa_over_concatenation(q, k_ctx, v_ctx, k_self, v_self, scale: float) -> torch.Tensor:
    """The same attention through SDPA, which needs the keys/values concatenated (one copy)."""
    return F.scaled_dot_product_attention(q, torch.cat([k_ctx, k_self], 2),
                                          torch.cat([v_ctx, v_self], 2), scale=scale)


# One opaque operator for torch.compile: the compiled refiner step fuses everything around
# attention and calls the kernel as it is (dynamo does not trace into the autotuned launch).
# The output is [B, N, H, D] memory viewed as [B, H, N, D]: the block's transpose(1, 2).reshape
# after attention is then free.
@torch.library.custom_op("helios::context_attention", mutates_args=())
def _context_attention_op(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                          k_self: torch.Tensor, v_self: torch.Tensor, scale: float) -> torch.Tensor:
    b, h, n, d = q.shape
    out = q.new_empty(b, n, h, d).transpose(1, 2)
    kernel = _load_kernel()
    if kernel is not None:
        return kernel(q, k_ctx, v_ctx, k_self, v_self, scale, out=out)
    # Without the kernel: SDPA's fused kernels, far faster on a GPU than the reference below;
    # cuDNN's first where it takes the shape (the fastest of them at the refiner's, measured
    # in benchmarks/attention_kernel.py).
    with sdpa_kernel(_SDPA_ORDER, set_priority=True):
        return out.copy_(_sdpa_over_concatenation(q, k_ctx, v_ctx, k_self, v_self, scale))


@_context_attention_op.register_fake
def _(q, k_ctx, v_ctx, k_self, v_self, scale):
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)


# FlashAttention-4 in FlashAttention's own layout: q [B, Nq, H, D], k and v [B, Nk, H, D]
# (last dimension contiguous), out [B, Nq, H, D]; opaque to torch.compile as the kernel is.
@torch.library.custom_op("helios::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> torch.Tensor:
    # A graph traced while FlashAttention-4 was selected runs it even after ``use_kernel``
    # reset the choice (the decision is a constant of the trace).
    fn = _state["flash_fn"] or _import_flash()
    return fn(q, k, v, softmax_scale=scale)[0]


@_flash_attention_op.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _flash_over_concatenation(q, k_ctx, v_ctx, k_self, v_self, scale: float) -> torch.Tensor:
    """FlashAttention-4 over [context; own] keys/values, concatenated along the sequence in
    [B, N, H, D]; the result is [B, N, H, D] memory viewed as [B, H, N, D], as the kernel's."""
    k = torch.cat([k_ctx.transpose(1, 2), k_self.transpose(1, 2)], 1)
    v = torch.cat([v_ctx.transpose(1, 2), v_self.transpose(1, 2)], 1)
    return _flash_attention_op(q.transpose(1, 2), k, v, scale).transpose(1, 2)


# q normed [B, N, H, D], and the keys (k normed) and values [B, Nc + N, H, D] of the context
# followed by the noisy tokens', from the block's q/k/v product [B, N, 3 * H * D]
# (helios/kernels/qkv_pack.py); opaque to torch.compile.
@torch.library.custom_op("helios::qkv_pack", mutates_args=(), device_types="cuda")
def _qkv_pack_op(qkv: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                 q_weight: torch.Tensor, k_weight: torch.Tensor, q_eps: float,
                 k_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels.qkv_pack import qkv_pack  # noqa: PLC0415 - triton, on CUDA machines only

    return qkv_pack(qkv, k_ctx, v_ctx, q_weight, k_weight, q_eps, k_eps)


@_qkv_pack_op.register_fake
def _(qkv, k_ctx, v_ctx, q_weight, k_weight, q_eps, k_eps):
    b, h, nc, d = k_ctx.shape
    n = qkv.shape[1]
    return (qkv.new_empty(b, n, h, d), qkv.new_empty(b, nc + n, h, d),
            qkv.new_empty(b, nc + n, h, d))


@torch.compiler.assume_constant_result
def _pack_selected() -> bool:
    """Whether ``context_attention_packed`` packs with the kernel: switched on, where
    FlashAttention-4 runs (``triton`` comes with it: its package needs PyTorch's CUDA wheels)."""
    return _state["pack"] and _flash_selected() and importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result
def norms_selected() -> bool:
    """Whether the refiner's blocks add their residuals and norm the sums with the Triton-lang
    kernel of ``helios/kernels/residual_norm.py``: switched on, and ``triton`` installed."""
    return _state["enabled"] and _state["norms"] and importlib.util.find_spec("triton") is not None


def packs(qkv: torch.Tensor, head_dim: int) -> bool:
    """Whether ``context_attention_packed`` runs for a q/k/v product ``qkv`` of heads of
    ``head_dim``: on CUDA, in 16-bit floats, in inference (``fast_inference``), with
    FlashAttention-4 and the packing switched on, at a head size of a power of two that
    FlashAttention-4 takes."""
    return (fast_inference(qkv) and head_dim & (head_dim - 1) == 0 and 8 <= head_dim <= 256
            and _pack_selected())


@torch.compiler.assume_constant_result
def _rows_selected() -> bool:
    return _state["rows"] and _pack_selected()


def takes_rows(h: torch.Tensor, product: torch.nn.Module, head_dim: int) -> bool:
    """Whether ``context_attention_rows`` runs for a block's normed tokens ``h`` and its
    q/k/v ``product``: where ``packs`` would, for one stream (batch 1: a batch's rows would
    not follow each one's context), the product a plain ``nn.Linear`` with a bias."""
    return (h.shape[0] == 1 and type(product) is torch.nn.Linear and product.bias is not None
            and packs(h, head_dim) and _rows_selected())


def context_attention_packed(qkv, k_ctx, v_ctx, q_norm, k_norm, scale: float | None = None):
    """``context_attention`` from a block's q/k/v product ``qkv`` [B, N, 3 * H * D] (q, k,
    v, heads in order) and the context's keys/values [B, H, Nc, D], the norms ``q_norm`` and
    ``k_norm`` (``helios.refiner.HeadRMSNorm``: ``weight``, ``eps``) applied to q and k
    inside the one kernel that packs FlashAttention-4's inputs. Where ``packs`` holds."""
    d = k_ctx.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = _qkv_pack_op(qkv, k_ctx, v_ctx, q_norm.weight, k_norm.weight, float(q_norm.eps),
                           float(k_norm.eps))
    return _flash_attention_op(q, k, v, float(scale)).transpose(1, 2)


# The q/k/v product of a block's normed tokens written after the context's rows, q and k
# normed there (helios/kernels/qkv_pack.py's qkv_rows): [B, Nc + N, 3 * H * D].
@torch.library.custom_op("helios::qkv_rows", mutates_args=(), device_types="cuda")
def _qkv_rows_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k_ctx: torch.Tensor,
                 v_ctx: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 q_eps: float, k_eps: float) -> torch.Tensor:
    from .kernels.qkv_pack import qkv_rows  # noqa: PLC0415 - triton, on CUDA machines only

    return qkv_rows(h, weight, bias, k_ctx, v_ctx, q_weight, k_weight, q_eps, k_eps)


@_qkv_rows_op.register_fake
def _(h, weight, bias, k_ctx, v_ctx, q_weight, k_weight, q_eps, k_eps):
    return h.new_empty(h.shape[0], k_ctx.shape[2] + h.shape[1], weight.shape[0])


# FlashAttention-4 over such rows: q the noisy tokens' q, the keys and values every row's,
# read in place as strided views -> [B, N, H, D].
@torch.library.custom_op("helios::flash_attention_rows", mutates_args=())
def _flash_rows_op(rows: torch.Tensor, n_ctx: int, heads: int, scale: float) -> torch.Tensor:
    b, total, width = rows.shape
    t = rows.view(b, total, 3, heads, width // (3 * heads))
    return _flash_attention_op(t[:, n_ctx:, 0], t[:, :, 1], t[:, :, 2], scale)


@_flash_rows_op.register_fake
def _(rows, n_ctx, heads, scale):
    b, total, width = rows.shape
    return rows.new_empty(b, total - n_ctx, heads, width // (3 * heads))


def context_attention_rows(h, product, k_ctx, v_ctx, q_norm, k_norm, scale: float | None = None):
    """``context_attention`` of a block's normed tokens ``h`` [1, N, C] through its q/k/v
    ``product`` (an ``nn.Linear``), over the context's keys/values [1, H, Nc, D]: the product
    is written after the context's rows and FlashAttention-4 reads it there. Where
    ``takes_rows`` holds."""
    b, heads, n_ctx, d = k_ctx.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = _qkv_rows_op(h, product.weight, product.bias, k_ctx, v_ctx, q_norm.weight,
                        k_norm.weight, float(q_norm.eps), float(k_norm.eps))
    return _flash_rows_op(rows, n_ctx, heads, float(scale)).transpose(1, 2)


def context_attention(q, k_ctx, v_ctx, k_self, v_self, scale: float | None = None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if torch.onnx.is_in_onnx_export():
        if EXPORT_AS_CUSTOM_NODE:
            return _ContextAttentionNode.apply(q, k_ctx, v_ctx, k_self, v_self, float(scale))
        return _sdpa_over_concatenation(q, k_ctx, v_ctx, k_self, v_self, scale)
    if q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
        # Training: the kernel has no backward; SDPA has one.
        return _sdpa_over_concatenation(q, k_ctx, v_ctx, k_self, v_self, scale)
    if q.is_cuda:
        if (_flash_selected() and q.dtype in (torch.bfloat16, torch.float16)
                and q.shape[-1] % 8 == 0 and 8 <= q.shape[-1] <= 256):
            return _flash_over_concatenation(q, k_ctx, v_ctx, k_self, v_self, float(scale))
        return _context_attention_op(q, k_ctx, v_ctx, k_self, v_self, float(scale))
    return context_attention_reference(q, k_ctx, v_ctx, k_self, v_self, scale)
