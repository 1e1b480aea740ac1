"""Refiner: a diffusion transformer (DiT) that renders one latent frame in a few steps.

Conditioning is a *context* of clean tokens: the frame's plan tokens, the first latent frame
(the anchor against drift) and the most recent latent frames, the latter two embedded with a
coarser patch (the compressed history). The context goes through the same blocks once per
latent frame, at timestep 0, and each block keeps its keys/values (``encode_context``).
Every denoising step then runs only the noisy tokens, whose attention reads
[context K/V, own K/V] through ``context_attention`` (one kernel on CUDA, no concatenation).

``forward_reference`` computes the same function the slow way, context and noisy tokens in
one sequence with a block mask, and exists so that tests can prove the cache exact.

Sampling is flow matching with a distilled few-step Euler schedule (3 steps by default, no
classifier-free guidance): x_sigma = (1 - sigma) x0 + sigma * noise, the model predicts the
velocity noise - x0.

On CUDA a whole render (context encoding, every step, the Euler updates) can replay as one
CUDA graph per input shape (``capture_renders``).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .accel import CompiledOrEager
from .attention import (context_attention, context_attention_packed, context_attention_rows,
                        fast_inference, norms_selected, packs, takes_rows)
from .config import RefinerConfig

log = logging.getLogger("helios.refiner")


def timestep_embedding(sigma: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal embedding of sigma in [0, 1] (scaled to 0..1000 like DDPM timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device) / half)
    args = sigma.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def pos_embed_2d(h: int, w: int, dim: int, stride: float, device) -> torch.Tensor:
    """Fixed 2D sin-cos positions [h*w, dim]; a coarse grid (stride > 1) lands on the centres
    of the fine-grid cells it covers, so history tokens line up with the noisy tokens."""
    offset = (stride - 1) / 2
    ys = torch.arange(h, device=device, dtype=torch.float32) * stride + offset
    xs = torch.arange(w, device=device, dtype=torch.float32) * stride + offset
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))

    def enc(c):
        a = c.reshape(-1, 1) * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([enc(gy), enc(gx)], dim=1)


class HeadRMSNorm(nn.Module):
    """RMSNorm over the head dimension of q and k (QK-norm keeps attention logits bounded)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


@torch.library.custom_op("helios::linear_gelu", mutates_args=(), device_types="cuda")
def _linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x W^T + b) for x [N, in], as one cuBLASLt matmul whose epilogue adds the
    bias and applies the GELU (tanh form). An operator of its own, so that Inductor keeps it
    whole instead of splitting it into a matmul and a pointwise kernel."""
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


@_linear_gelu.register_kernel("cpu")
def _(x, weight, bias):
    # PyTorch's CPU _addmm_activation applies the erf GELU; the operator means the tanh one.
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@_linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


# The gated residual add and the layer norm and modulation after it
# (helios/kernels/residual_norm.py); opaque to torch.compile.
@torch.library.custom_op("helios::residual_norm", mutates_args=(), device_types="cuda")
def _residual_norm_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                      scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from .kernels.residual_norm import residual_norm  # noqa: PLC0415 - triton, on CUDA only

    return residual_norm(x, y, gate, shift, scale, eps)


@_residual_norm_op.register_fake
def _(x, y, gate, shift, scale, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def _residual_norm(x, y, gate, norm: nn.LayerNorm, shift, scale):
    """``x + gate * y`` and that sum normed by ``norm`` (a LayerNorm without weights) and
    modulated by ``shift`` and ``scale``. On CUDA in 16-bit floats, in inference, one kernel
    (``helios.attention.norms_selected``): on an H200 at 14b's width Inductor's kernels ran at
    57-72 % of the copy rate and the kernel at 93-99 % (docs/performance.md)."""
    if fast_inference(x) and y.dtype == x.dtype and norm.weight is None and norms_selected():
        return _residual_norm_op(x, y, gate, shift, scale, float(norm.eps))
    x = x + gate * y
    return x, _modulate(norm(x), shift, scale)


def _fc1_gelu(fc1: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The MLP's first projection and its tanh GELU. On CUDA in 16-bit floats, one matmul with
    the GELU in its epilogue: at 14b's 720p shape (3600 x 2048 into 8192) 0.191 ms against
    0.220 for the matmul then Inductor's fused bias and GELU, on an H200 (benchmarks/fusions.py),
    60 of them a render. Training (the operator has no backward), exports (ONNX) and other
    layers (the FP8 option's) take the plain form."""
    if fast_inference(h) and type(fc1) is nn.Linear and fc1.bias is not None:
        return _linear_gelu(h.reshape(-1, h.shape[-1]), fc1.weight, fc1.bias).view(
            *h.shape[:-1], fc1.out_features)
    return F.gelu(fc1(h), approximate="tanh")


class DiTBlock(nn.Module):
    def __init__(self, cfg: RefinerConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm = HeadRMSNorm(cfg.head_dim)
        self.k_norm = HeadRMSNorm(cfg.head_dim)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.modulation = nn.Linear(d, 6 * d)  # adaLN: shift/scale/gate for attention and MLP

    def mods(self, c):
        """c [B, d] -> six [B, 1, d] tensors."""
        return self.split_mods(self.modulation(F.silu(c)))

    @staticmethod
    def split_mods(rows):
        """The modulation's rows [B, 6d] -> six [B, 1, d] tensors."""
        return [m[:, None] for m in rows.chunk(6, dim=-1)]

    def qkv_heads(self, x, mods):
        """q, k (normed) and v [B, H, N, D] of the tokens x."""
        return self.heads(self.qkv_product(x, mods))

    def qkv_product(self, x, mods):
        return self.qkv(self.normed(x, mods))

    def normed(self, x, mods):
        """The tokens x as the attention's product reads them: normed and modulated."""
        return _modulate(self.norm1(x), mods[0], mods[1])

    def heads(self, qkv):
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def attend_normed(self, h, k_ctx, v_ctx):
        """The attention [B, H, N, D] of the tokens whose ``normed`` input is ``h`` over the
        context's keys/values [B, H, Nc, D] and their own, the q/k/v product made here: for
        one stream written straight into FlashAttention-4's inputs where
        ``helios.attention.takes_rows`` holds, else by ``attend``."""
        if takes_rows(h, self.qkv, k_ctx.shape[-1]):
            return context_attention_rows(h, self.qkv, k_ctx, v_ctx, self.q_norm, self.k_norm)
        return self.attend(self.qkv(h), k_ctx, v_ctx)

    def attend(self, qkv, k_ctx, v_ctx):
        """The attention [B, H, N, D] of the tokens of the q/k/v product ``qkv`` over the
        context's keys/values [B, H, Nc, D] and their own; packed into FlashAttention-4's
        inputs by one kernel where ``helios.attention.packs`` holds."""
        if packs(qkv, k_ctx.shape[-1]):
            return context_attention_packed(qkv, k_ctx, v_ctx, self.q_norm, self.k_norm)
        q, k, v = self.heads(qkv)
        return context_attention(q, k_ctx, v_ctx, k, v)

    def finish(self, x, attn, mods):
        return self.finish_into(x, attn, mods)[0]

    def finish_into(self, x, attn, mods, following=None, following_mods=None):
        """The block's output tokens after the attention ``attn`` [B, H, N, D], and the
        ``following`` block's ``normed`` input (None without one): each residual add and the
        norm after it go together (``_residual_norm``)."""
        b, _, n, _ = attn.shape
        x, h = _residual_norm(x, self.proj(attn.transpose(1, 2).reshape(b, n, -1)), mods[2],
                              self.norm2, mods[3], mods[4])
        y = self.fc2(_fc1_gelu(self.fc1, h))
        if following is None:
            return x + mods[5] * y, None
        return _residual_norm(x, y, mods[5], following.norm1, following_mods[0],
                              following_mods[1])


def geometry_tokens(latent: torch.Tensor, bins: tuple, offset: int) -> torch.Tensor:
    """Geometry plan tokens [B, 3] of latent frames [B, C, h, w]: the bin of the salient
    mass's centre row, of its centre column and of its size, as ids from ``offset`` on (row
    bins first, then column bins, then size bins).

    Salience is a latent pixel's distance from its channel's median over the frame, relative
    to the frame's largest: the background is the median, an object stands out. The centre is
    a circular mean (objects wrap around the frame's edges, and one crossing an edge shows on
    both sides). Size is the square root of the salient area, in latent pixels, binned by 0.4
    from 2.4 (a small object is about 3.5 on the tiny VAE, a grown one 5.5). Measured on the
    tiny VAE's latents of synthetic clips, the centre is within 2-3 pixels of the true one
    (docs/training.md, "Geometry tokens").
    """
    by, bx, bs = bins
    b, _, h, w = latent.shape
    z = latent.float()
    dev = (z - z.flatten(2).median(-1).values[..., None, None]).abs().mean(1)    # [B, h, w]
    rel = dev / dev.amax((1, 2), keepdim=True).clamp_min(1e-6)
    weight = (rel - 0.25).clamp_min(0)

    def centre(mass, n):  # mass [B, n] along one axis -> centre in [0, 1)
        ang = 2 * math.pi * (torch.arange(n, device=z.device, dtype=torch.float32) + 0.5) / n
        c = torch.atan2((mass * ang.sin()).sum(-1), (mass * ang.cos()).sum(-1))
        return torch.remainder(c / (2 * math.pi), 1.0)

    def binned(frac, n):
        return (frac * n).long().clamp(0, n - 1)

    row = binned(centre(weight.sum(2), h), by)
    col = binned(centre(weight.sum(1), w), bx)
    area = ((rel - 0.35) / 0.3).clamp(0, 1).sum((1, 2))
    size = ((area.sqrt() - 2.4) / 0.4).floor().long().clamp(0, bs - 1)
    return torch.stack([row + offset, col + offset + by, size + offset + by + bx], dim=1)


class PlanTokenizer(nn.Module):
    """Latent frame -> plan tokens: n learned queries pool the frame, one region each, and
    each is snapped to the nearest row of the refiner's plan-token embedding (the codebook).
    With ``geometry_bins`` the frame's geometry tokens follow (``geometry_tokens``). Used for
    image-to-video (the given image's plan tokens enter the AR context) and for training."""

    def __init__(self, cfg: RefinerConfig):
        super().__init__()
        d = cfg.hidden_size
        p = cfg.patch_size * cfg.history_pool
        self.pool = cfg.history_pool
        self.geometry_bins = cfg.geometry_bins
        self.codebook_size = cfg.codebook_size
        self.patch = nn.Conv2d(cfg.latent_channels, d, p, p)
        self.queries = nn.Parameter(torch.zeros(cfg.region_tokens, d))
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def region_mask(self, gh: int, gw: int, device) -> torch.Tensor:
        """[n, gh*gw] additive mask: plan token j pools only region j of a rows x cols split of
        the frame (2 x 4 for 8 tokens), so each token says what is where in its region."""
        n = self.queries.shape[0]
        rows = 2 if n % 2 == 0 else 1
        cols = n // rows
        y = torch.arange(gh, device=device)[:, None] * rows // gh
        x = torch.arange(gw, device=device)[None, :] * cols // gw
        region = (y * cols + x).flatten()                               # [gh*gw]
        inside = region[None, :] == torch.arange(n, device=device)[:, None]
        return torch.zeros(inside.shape, device=device).masked_fill(~inside, float("-inf"))

    def features(self, latent):
        t = self.patch(latent)
        _, d, gh, gw = t.shape
        # Positions on the refiner's grid, as the history tokens have them: plan tokens can
        # then say where things are, not only what they are.
        pos = pos_embed_2d(gh, gw, d, self.pool, latent.device).to(t.dtype)
        x = t.flatten(2).transpose(1, 2) + pos
        logits = self.queries @ self.key(x).transpose(1, 2) / math.sqrt(d)
        attn = torch.softmax(logits + self.region_mask(gh, gw, latent.device), -1)
        # On the sphere of radius sqrt(d), where training keeps the codebook rows too: the
        # nearest row is then the most similar direction, and no code can win by its norm.
        return F.normalize(self.out(attn @ self.value(x)), dim=-1) * math.sqrt(d)  # [B, n, d]

    def geometry(self, latent) -> torch.Tensor:
        """The frame's geometry token ids [B, len(geometry_bins)] ([B, 0] without)."""
        if not self.geometry_bins:
            return torch.zeros(latent.shape[0], 0, dtype=torch.long, device=latent.device)
        return geometry_tokens(latent, self.geometry_bins, self.codebook_size)

    def forward(self, latent, codebook: torch.Tensor) -> torch.Tensor:
        f = self.features(latent).float()
        regions = torch.cdist(f, codebook.float()[None].expand(f.shape[0], -1, -1)).argmin(-1)
        return torch.cat([regions, self.geometry(latent)], dim=1)


class Refiner(nn.Module):
    # A captured render's modulation rows: made once at its capture (True), or in each
    # replay (False; benchmarks/profile_stages.py's refiner-mods-replayed).
    render_mods_once = True

    def __init__(self, cfg: RefinerConfig):
        super().__init__()
        self.config = cfg
        d, c, p = cfg.hidden_size, cfg.latent_channels, cfg.patch_size
        self.patch_embed = nn.Conv2d(c, d, p, p)
        self.history_embed = nn.Conv2d(c, d, p * cfg.history_pool, p * cfg.history_pool)
        self.slot_embed = nn.Parameter(torch.zeros(cfg.history_frames + 1, d))  # 0: anchor
        self.plan_embed = nn.Embedding(cfg.codebook_size, d)
        # Geometry tokens have rows of their own, so that a fine-tuning run can train them
        # while the codebook stays fixed.
        self.geometry_embed = nn.Embedding(sum(cfg.geometry_bins), d) if cfg.geometry_bins else None
        self.plan_pos = nn.Parameter(torch.zeros(cfg.plan_tokens_per_frame, d))
        self.time_embed = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(d, 2 * d)
        self.final_proj = nn.Linear(d, p * p * c)
        self.plan_tokenizer = PlanTokenizer(cfg)
        self._compiled_step = self._compiled_context = None  # compile_steps() sets them
        self._render_graphs: dict | None = None               # capture_renders() sets it

    def init_weights(self, generator: torch.Generator):
        d = self.config.hidden_size
        for name, prm in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    prm.fill_(1.0)
                elif name.endswith("bias"):
                    prm.zero_()
                else:
                    fan_in = prm[0].numel() if prm.dim() > 1 else d
                    prm.copy_(torch.randn(prm.shape, generator=generator) / math.sqrt(fan_in))
            # Gates open at 1 (not adaLN-zero): an untrained refiner must still use its
            # context, or the cached-vs-recomputed tests would compare near-zero updates.
            if name.endswith("modulation.bias") and "final" not in name:
                with torch.no_grad():
                    prm.view(6, d)[2].fill_(1.0)
                    prm.view(6, d)[5].fill_(1.0)

    @torch.no_grad()
    def init_geometry_embed(self, grid_h: int, grid_w: int) -> None:
        """Start the geometry rows where they point: a row bin's row is the sin-cos code of
        that row on the noisy tokens' grid (``pos_embed_2d``'s first half), a column bin's the
        column's (its second half), so that attention finds the place a token names from the
        first training step. Size rows stay random."""
        if self.geometry_embed is None:
            return
        by, bx, _ = self.config.geometry_bins
        d = self.config.hidden_size
        rows = pos_embed_2d(by, 1, d, grid_h / by, self.plan_pos.device)[:, :d // 2]
        cols = pos_embed_2d(1, bx, d, grid_w / bx, self.plan_pos.device)[:, d // 2:]
        w = self.geometry_embed.weight
        w[:by].zero_()[:, :d // 2] = rows
        w[by:by + bx].zero_()[:, d // 2:] = cols

    # ---- embeddings --------------------------------------------------------------------
    def plan_rows(self, plan_tokens):
        """Embeddings [B, n, d] of plan-token ids: codebook rows, then geometry rows. An id
        of the other kind than its slot (a sampled token can be any plan token) still
        reads a row; no id of the plan vocabulary fails."""
        if self.geometry_embed is None:
            return self.plan_embed(plan_tokens)
        table = torch.cat([self.plan_embed.weight, self.geometry_embed.weight])
        return F.embedding(plan_tokens, table)

    def embed_noisy(self, x):
        """latent [B, C, h, w] -> tokens [B, N, d]."""
        t = self.patch_embed(x)
        _, d, gh, gw = t.shape
        return t.flatten(2).transpose(1, 2) + pos_embed_2d(gh, gw, d, 1, x.device).to(t.dtype)

    def embed_context(self, plan_tokens, anchor=None, history=(), plan_embeds=None):
        """plan_tokens [B, n]; anchor [B, C, h, w] or None; history: recent latent frames, the
        most recent first, at most ``history_frames`` -> context tokens [B, Nc, d].
        ``plan_embeds`` [B, r, d] replaces the codebook rows of the r region tokens
        (training passes the plan tokenizer's straight-through features)."""
        cfg = self.config
        plan = self.plan_rows(plan_tokens)
        if plan_embeds is not None:
            plan = torch.cat([plan_embeds, plan[:, plan_embeds.shape[1]:]], dim=1)
        parts = [plan + self.plan_pos]
        frames = ([(0, anchor)] if anchor is not None else []) + \
            [(1 + j, f) for j, f in enumerate(list(history)[:cfg.history_frames])]
        for slot, f in frames:
            t = self.history_embed(f)
            _, d, gh, gw = t.shape
            pos = pos_embed_2d(gh, gw, d, cfg.history_pool, f.device).to(t.dtype)
            parts.append(t.flatten(2).transpose(1, 2) + pos + self.slot_embed[slot])
        return torch.cat(parts, dim=1)

    def unpatchify(self, tokens, h, w):
        p, c = self.config.patch_size, self.config.latent_channels
        b = tokens.shape[0]
        x = tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    def _out(self, x, final, h, w):
        """Tokens -> the velocity [B, C, h, w]; ``final``: the final layer's modulation rows
        [B, 2d] (shift, scale)."""
        shift, scale = final[:, None].chunk(2, dim=-1)
        return self.unpatchify(self.final_proj(_modulate(self.final_norm(x), shift, scale)), h, w)

    def modulations(self, c):
        """adaLN's rows for the conditioning ``c`` [N, d]: each block's [N, 6d]
        (``DiTBlock.split_mods`` splits them), then the final layer's [N, 2d]."""
        s = F.silu(c)
        return [block.modulation(s) for block in self.blocks], self.final_modulation(s)

    def _render_modulations(self, sig_t, batch: int):
        """The modulation rows of a render, as ``modulations`` gives them but [L, batch, k]:
        level 0 at sigma 0 (the context's), then one level per step. They depend on sigma
        alone, so all of them come from one matrix product per block, which reads the block's
        modulation weights once a render instead of once a step: at 14b, 80 one-row products
        of 2048 x 12288 took 1.6 ms of a render on an H200 (benchmarks/profile_stages.py)."""
        levels = torch.cat([sig_t.new_zeros(1), sig_t[:-1]])
        n = len(levels)
        c = self._cond(levels.repeat_interleave(batch), n * batch, self.plan_embed.weight.dtype,
                       sig_t.device)
        blocks, final = self.modulations(c)
        return [m.view(n, batch, -1) for m in blocks], final.view(n, batch, -1)

    def _cond(self, sigma, batch, dtype, device):
        # A Python float becomes a filled tensor, not a host-to-device copy: CUDA graphs
        # capture a fill, not a copy from pageable memory.
        if torch.is_tensor(sigma):
            sigma = sigma.to(device, torch.float32).expand(batch)
        else:
            sigma = torch.full((batch,), float(sigma), device=device)
        return self.time_embed(timestep_embedding(sigma).to(dtype))

    # ---- the fast path: context K/V once per frame, then a few steps -------------------
    def encode_context(self, plan_tokens, anchor=None, history=(), plan_embeds=None,
                       mods=None):
        """The context's keys/values of every block: a list of (k, v), each [B, H, Nc, D].
        ``mods``: the blocks' modulation rows [B, 6d] at sigma 0 (``_render_modulations``'
        level 0), else computed."""
        x = self.embed_context(plan_tokens, anchor, history, plan_embeds)
        if mods is None:
            mods = self.modulations(self._cond(0.0, x.shape[0], x.dtype, x.device))[0]
        return (self._compiled_context or self._context_kv)(x, mods)

    def _blocks(self, x, block_rows, attention):
        """The tokens x through every block, each block's modulation rows [B, 6d] from
        ``block_rows``; ``attention(i, block, h)`` gives block i's attention [B, H, N, D]
        from its normed input h (``DiTBlock.normed``)."""
        mods = [block.split_mods(rows) for block, rows in zip(self.blocks, block_rows)]
        last = len(self.blocks) - 1
        h = self.blocks[0].normed(x, mods[0])
        for i, block in enumerate(self.blocks):
            following = (self.blocks[i + 1], mods[i + 1]) if i < last else (None, None)
            x, h = block.finish_into(x, attention(i, block, h), mods[i], *following)
        return x

    def _context_kv(self, x, block_rows):
        kv = []

        def attention(i, block, h):
            q, k, v = block.heads(block.qkv(h))
            kv.append((k, v))
            if q.is_cuda:  # the custom kernel with an empty context: full self-attention
                return context_attention(q, k[:, :, :0], v[:, :, :0], k, v)
            return F.scaled_dot_product_attention(q, k, v)

        self._blocks(x, block_rows, attention)
        return kv

    def forward(self, x_t, sigma, context_kv, mods=None):
        """One denoising step: noisy latent [B, C, h, w] at ``sigma`` -> predicted velocity.
        ``mods``: this step's modulation rows (each block's [B, 6d], then the final layer's
        [B, 2d]: one level of ``_render_modulations``), else computed from ``sigma``."""
        b, _, h, w = x_t.shape
        x = self.embed_noisy(x_t)
        if mods is None:
            mods = self.modulations(self._cond(sigma, b, x.dtype, x.device))
        blocks, final = mods
        x = self._blocks(x, blocks, lambda i, block, h: block.attend_normed(h, *context_kv[i]))
        return self._out(x, final, h, w)

    # ---- the slow path: everything in one masked sequence ------------------------------
    def forward_reference(self, x_t, sigma, plan_tokens, anchor=None, history=()):
        b, _, h, w = x_t.shape
        ctx = self.embed_context(plan_tokens, anchor, history)
        own = self.embed_noisy(x_t)
        nc, n = ctx.shape[1], ctx.shape[1] + own.shape[1]
        x = torch.cat([ctx, own], dim=1)
        c0 = self._cond(0.0, b, x.dtype, x.device)
        c = self._cond(sigma, b, x.dtype, x.device)
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device)
        mask[:nc, nc:] = False  # context tokens never see the noisy tokens
        for block in self.blocks:
            m0, m = block.mods(c0), block.mods(c)
            mods = [torch.cat([a.expand(-1, nc, -1), z.expand(-1, n - nc, -1)], 1)
                    for a, z in zip(m0, m)]
            q, k, v = block.qkv_heads(x, mods)
            x = block.finish(x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), mods)
        return self._out(x[:, nc:], self.final_modulation(F.silu(c)), h, w)

    # ---- sampler -----------------------------------------------------------------------
    def sigmas(self, num_steps: int | None = None) -> list[float]:
        steps = num_steps or self.config.num_steps
        shift = self.config.shift
        ts = [1 - i / steps for i in range(steps + 1)]
        return [shift * t / (1 + (shift - 1) * t) for t in ts]

    def compile_steps(self) -> None:
        """Run the context encoding and the denoising steps through torch.compile (used on
        CUDA): the norms, QK-norm, modulation and gates fuse into few kernels around the
        matmuls, and attention stays the custom kernel (an opaque operator,
        ``helios::context_attention``). The first frame compiles; a new context length
        compiles once more, with that length symbolic."""
        self._compiled_step = CompiledOrEager(self.forward, "refiner step", fullgraph=True)
        self._compiled_context = CompiledOrEager(self._context_kv, "refiner context", fullgraph=True)

    def step(self, x_t, sigma, context_kv, mods=None):
        """One denoising step, compiled if ``compile_steps`` was called (``forward`` otherwise)."""
        return (self._compiled_step or self)(x_t, sigma, context_kv, mods)

    def capture_renders(self) -> None:
        """Replay each render as one CUDA graph (CUDA only; call after ``compile_steps``).

        A render is about 400 launches (20 blocks of context encoding, 3 steps of 20 blocks,
        each a handful of fused kernels around the matmuls and the attention kernel). Issued
        from Python they leave the GPU waiting whenever the host is slower than the kernels,
        which the context encoding (884 tokens at 14b) always is: its GPU time varied from 10
        to 30 ms by machine, against a 3.5 ms FLOP floor. A graph is captured per input shape
        (batch, with or without anchor, history length, steps) on its first use; all of them
        share one memory pool, since one refiner renders one frame at a time."""
        self._render_graphs = {}
        self._graph_pool = torch.cuda.graph_pool_handle()

    @torch.no_grad()
    def warm_up(self, latent_shape, dtype, device) -> None:
        """Render once in every context a stream goes through (no anchor for the first latent
        frame, then the anchor with 0 to ``history_frames`` recent frames), so that compiling
        and capturing happen now, not during the first request."""
        z = torch.zeros(latent_shape, dtype=dtype, device=device)
        plan = torch.zeros(latent_shape[0], self.config.plan_tokens_per_frame, dtype=torch.long,
                           device=device)
        self.render(z, plan)
        for n in range(self.config.history_frames + 1):
            self.render(z, plan, z, [z] * n)

    @torch.no_grad()
    def render(self, noise, plan_tokens, anchor=None, history=(), num_steps: int | None = None):
        """Noise [B, C, h, w] -> clean latent frame, conditioned on plan tokens and history."""
        history = list(history)[:self.config.history_frames]
        sig = self.sigmas(num_steps)
        if self._render_graphs is not None and noise.is_cuda:
            key = (tuple(noise.shape), noise.dtype, tuple(plan_tokens.shape), anchor is not None,
                   len(history), len(sig))
            graph = self._render_graphs.get(key)
            if graph is None:
                try:
                    graph = self._render_graphs[key] = _RenderGraph(
                        self, noise, plan_tokens, anchor, history, sig)
                except Exception as e:  # noqa: BLE001 - capture refused: the same numbers eagerly
                    log.warning("refiner render stays uncaptured, CUDA graph capture failed: "
                                "%s: %s", type(e).__name__, e)
                    self._render_graphs = None
            if graph is not None:
                return graph(noise, plan_tokens, anchor, history)
        return self._render(noise, plan_tokens, anchor, history, sig,
                            torch.tensor(sig, device=noise.device))

    def _render(self, noise, plan_tokens, anchor, history, sig: list[float], sig_t, mods=None):
        """``mods``: ``_render_modulations(sig_t, batch)``, else computed here."""
        if mods is None:
            mods = self._render_modulations(sig_t, noise.shape[0])
        kv = self.encode_context(plan_tokens, anchor, history, mods=modulation_level(mods, 0)[0])
        # Sigma goes into the step as a tensor: the compiled step would compile once per Python
        # number. Each step's rows are views of the render's tables, not picked inside the step:
        # an index_select there fused into the layer norms and made them 1.1 ms slower a 14b
        # render on an H200 (docs/performance.md).
        return euler_sample(
            lambda x, i, sigma: self.step(x, sig_t[i], kv, modulation_level(mods, i + 1)),
            noise, sig)


def modulation_level(mods, i: int):
    """One level of a render's modulation tables (``Refiner._render_modulations``): each
    block's rows [B, 6d], then the final layer's [B, 2d], as views."""
    blocks, final = mods
    return [m[i] for m in blocks], final[i]


def euler_sample(velocity, noise, sigmas: list[float]):
    """The few-step flow-matching sampler: from ``noise`` at ``sigmas[0]`` to the clean
    latent at ``sigmas[-1]``, one Euler step ``x += (next sigma - sigma) * velocity(x, i,
    sigma)`` per pair. Every runtime renders with it (the PyTorch refiner, the TensorRT
    flavour's step engine, the unrolled sampler of training), so all take the same steps."""
    x = noise
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = x + (sigma_next - sigma) * velocity(x, i, sigma)
    return x


class _RenderGraph:
    """One render shape captured as a CUDA graph (``Refiner.capture_renders``): the inputs are
    copied into its static buffers, the graph replays, the output is copied out (the next
    replay overwrites it)."""

    def __init__(self, refiner: Refiner, noise, plan_tokens, anchor, history, sig: list[float]):
        self.noise, self.plan = noise.clone(), plan_tokens.clone()
        self.anchor = None if anchor is None else anchor.clone()
        self.history = [h.clone() for h in history]
        # Held by the instance like the buffers above: the graph reads this memory at every
        # replay, and a freed tensor's memory goes to the next allocation.
        self.sig_t = torch.tensor(sig, device=noise.device)
        # The modulation rows depend on the sigmas and the weights alone, so they are made
        # once here, outside the graph: each replay would otherwise redo the time embedding
        # and 21 products, about 30 launches, the same numbers every time. A graph is
        # captured after the weights are loaded and replays on them as they are.
        # (``Refiner.render_mods_once`` False: made in each replay, for benchmarks' A/B.)
        self.mods = refiner._render_modulations(self.sig_t, noise.shape[0]) \
            if refiner.render_mods_once else None

        def run():
            return refiner._render(self.noise, self.plan, self.anchor, self.history, sig,
                                   self.sig_t, self.mods)

        # Warm up on a side stream (compilation, the attention kernel's autotuning, the
        # allocator), then capture.
        stream = torch.cuda.Stream(noise.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=refiner._graph_pool):
            self.out = run()

    def __call__(self, noise, plan_tokens, anchor, history):
        self.noise.copy_(noise)
        self.plan.copy_(plan_tokens)
        if anchor is not None:
            self.anchor.copy_(anchor)
        for buf, h in zip(self.history, history):
            buf.copy_(h)
        self.graph.replay()
        return self.out.clone()


def render_flops(cfg) -> tuple:
    """FLOPs of rendering one latent frame of ``cfg`` (a HeliosConfig): context encoding and
    num_steps denoising steps, as (all of them, the blocks' projections among them, noisy
    tokens, context tokens). The benchmarks divide it by the measured matrix rate: the
    refiner's floor."""
    rf = cfg.refiner
    d, layers = rf.hidden_size, rf.num_layers
    n = (cfg.latent_height // rf.patch_size) * (cfg.latent_width // rf.patch_size)
    hp = rf.patch_size * rf.history_pool
    nc = rf.plan_tokens_per_frame + (1 + rf.history_frames) * (cfg.latent_height // hp) * (cfg.latent_width // hp)
    mlp = int(d * rf.mlp_ratio)
    linear = lambda t: 2 * t * (4 * d * d + 2 * d * mlp)  # noqa: E731  qkv+proj, fc1+fc2
    step = layers * (linear(n) + 4 * n * (n + nc) * d)
    context = layers * (linear(nc) + 4 * nc * nc * d)
    projections = layers * (rf.num_steps * linear(n) + linear(nc))
    return rf.num_steps * step + context, projections, n, nc
