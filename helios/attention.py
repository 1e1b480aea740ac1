"""The refiner's custom attention: queries of the noisy tokens over [history K/V, own K/V].

The history (context) keys/values are computed once per latent frame and reused by every
denoising step; the noisy tokens' own keys/values change each step. Attending over both
without building the concatenation is one kernel: ``helios/kernels/context_attention.py`` holds
the Triton-lang version (also wrapped as the TensorRT plugin); this file holds the plain PyTorch
reference and the dispatch between them.

On CUDA the kernel is used whenever the ``triton`` package is there (PyTorch's CUDA wheels
bring it). Without it, or after ``use_kernel(False)``, attention runs through SDPA over the
concatenation, and a warning says so once: never silently.
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
_state = {"enabled": True, "kernel": None, "checked": False}


def use_kernel(enabled: bool) -> None:
    """Switch the Triton-lang kernel on or off for this process (off: SDPA), e.g. to compare
    the two; ``helios.settings`` reads the entry points' default from the environment."""
    _state.update(enabled=enabled, kernel=None, checked=False)


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
        return _context_attention_op(q, k_ctx, v_ctx, k_self, v_self, float(scale))
    return context_attention_reference(q, k_ctx, v_ctx, k_self, v_self, scale)
