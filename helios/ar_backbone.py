"""AR backbone: a decoder-only transformer in the exact HuggingFace Llama layout.

Module and parameter names equal ``transformers.LlamaForCausalLM``'s
(``model.layers.N.self_attn.q_proj.weight`` ...), so a saved state dict is a Llama checkpoint
that transformers and TensorRT-LLM load as it is. The prompt enters as prefix embeddings
(``inputs_embeds`` rows), the way TensorRT-LLM feeds a prompt-embedding table. The draft model
of speculative decoding is this same class with a smaller ``ARConfig``.

The attention reads and writes keys/values through a cache object (``kv_cache.py``) that
knows where each sequence's positions live; the model itself holds no state.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from .config import ARConfig


# One row (one stream's decode step) of a bf16 projection on CUDA runs through helios::gemv,
# the Triton-lang kernel of helios/kernels/gemv.py with a fixed tile per weight shape, instead
# of nn.Linear (``use_gemv``). At 14b on an H200 the compiled, captured step went from
# 7.40-8.02 ms (Inductor's tuned reductions, whose tiles differ from one compile to the next)
# to 6.91-7.21 (docs/performance.md).
_GEMV = {"on": True, "triton": importlib.util.find_spec("triton") is not None}


def use_gemv(on: bool) -> None:
    """Route one-row bf16 projections on CUDA through ``helios::gemv`` (on by default, where
    triton is installed, as it is with PyTorch's CUDA builds) or through nn.Linear."""
    _GEMV["on"] = on


@torch.library.custom_op("helios::gemv", mutates_args=(), device_types="cuda")
def _gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, K] times weight [N, K] transposed -> [1, N]."""
    from .kernels.gemv import gemv  # noqa: PLC0415 - triton, on CUDA machines only

    return gemv(x, weight)


@_gemv.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``; through ``helios::gemv`` where it is on and x is one row of bf16 on
    CUDA, for a bias-free ``nn.Linear``."""
    if (_GEMV["on"] and x.is_cuda and x.dtype == torch.bfloat16 and type(linear) is nn.Linear
            and linear.bias is None and x.numel() == x.shape[-1] and _GEMV["triton"]):
        return _gemv(x.reshape(1, -1), linear.weight).view(*x.shape[:-1], -1)
    return linear(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like transformers does, then cast back: bf16 variance is too coarse.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape [*positions.shape, head_dim], HF's "rotate_half" layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos/sin: [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ARConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj = None  # q, k and v in one matrix once fused (``fuse_projections``)

    def forward(self, x, cos, sin, cache):
        b, t, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = project(self.q_proj, x), project(self.k_proj, x), project(self.v_proj, x)
        else:
            kv = self.num_kv_heads * self.head_dim
            q, k, v = project(self.qkv_proj, x).split([self.num_heads * self.head_dim, kv, kv],
                                                      dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = cache.attend(self.layer_idx, q, k, v)  # [B, heads, T, D]
        return project(self.o_proj, out.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = None  # gate and up in one matrix once fused (``fuse_projections``)

    def forward(self, x):
        if self.gate_up_proj is None:
            gate, up = project(self.gate_proj, x), project(self.up_proj, x)
        else:
            gate, up = project(self.gate_up_proj, x).chunk(2, dim=-1)
        return project(self.down_proj, F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ARConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ARBackbone(nn.Module):
    """``LlamaForCausalLM`` with prefix embeddings and an external KV cache."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, generator: torch.Generator):
        # Llama's initialisation: normal(0, 0.02) for every matrix, ones for the norms.
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, cache,
                run_layer=None) -> torch.Tensor:
        """inputs_embeds [B, T, hidden], positions [B, T] -> logits [B, T, vocab] (float32).

        ``cache`` must have been prepared for exactly these B sequences and T new positions.
        ``run_layer(i, layer, h, cos, sin)``, if given, runs each decoder layer instead of
        ``layer(h, cos, sin, cache)`` (the compiled decode step, ``ar_runtime``).
        """
        cfg = self.config
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, inputs_embeds.dtype)
        h = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            h = run_layer(i, layer, h, cos, sin) if run_layer else layer(h, cos, sin, cache)
        return self.lm_head(self.model.norm(h)).float()


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One bias-free nn.Linear whose output is the given projections' outputs, concatenated."""
    w = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=linears[0].weight.requires_grad)
    return fused


def fuse_projections(model: ARBackbone) -> ARBackbone:
    """Merge each decoder layer's q/k/v projections into one matrix and its gate/up projections
    into another, in place; returns the model. A decode step then reads the same weight bytes
    in 4 matrix-vector products a layer instead of 7: fewer kernels per step, and the small k
    and v products (a fifth of q's size each) no longer run on their own. The outputs are the
    same products (their rounding may differ). The fused model is for inference: its state dict
    is no longer in Llama's layout. Layers already fused are left as they are."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None:
            attn.qkv_proj = _stacked(attn.q_proj, attn.k_proj, attn.v_proj)
            del attn.q_proj, attn.k_proj, attn.v_proj
        if mlp.gate_up_proj is None:
            mlp.gate_up_proj = _stacked(mlp.gate_proj, mlp.up_proj)
            del mlp.gate_proj, mlp.up_proj
    return model
