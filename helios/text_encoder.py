"""Byte-level text encoder: UTF-8 bytes in, prefix embeddings for the AR backbone out.

No vocabulary file: the token ids are the prompt's bytes plus begin/end-of-text
(``helios.tokenizer``). The encoder ends in two projections, one into the AR backbone's
hidden size (the rows of TensorRT-LLM's prompt-embedding table) and one into the draft
model's, so that both runtimes receive ready prefix embeddings from this one stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextEncoderConfig


class EncoderBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, d)

    def forward(self, x, key_mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Parameter(torch.zeros(cfg.max_prompt_bytes + 2, d))
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d)
        self.ar_proj = nn.Linear(d, cfg.ar_hidden_size)
        self.draft_proj = nn.Linear(d, cfg.draft_hidden_size)

    def init_weights(self, generator: torch.Generator):
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor):
        """input_ids [B, T] (padded), lengths [B] -> (ar prefix [B, T, H_ar], draft prefix [B, T, H_d]).

        Rows past a prompt's length are padding; they are neither attended to nor meaningful.
        """
        t = input_ids.shape[1]
        key_mask = torch.arange(t, device=input_ids.device)[None, :] < lengths[:, None]
        x = self.embed(input_ids) + self.pos[:t]
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.norm(x)
        return self.ar_proj(x), self.draft_proj(x)
