"""Sampling of plan tokens: temperature, top-k, top-p, seeded; and the speculative rule.

Every function takes one row's logits and one ``torch.Generator`` so that a stream's tokens
depend only on its own seed, never on which other streams share its batch. The settings
themselves, ``SamplingParams``, live in ``helios.sampling_params``.
"""

from __future__ import annotations

import torch

from .sampling_params import SamplingParams


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from: logits [..., V] -> probs [..., V] (float32).

    Greedy (temperature 0) is the one-hot distribution of the argmax, which lets speculative
    decoding use one accept/reject rule for both cases.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a 1-D distribution, by inverse CDF on one uniform draw."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    cdf = probs.double().cpu().cumsum(0)
    idx = int(torch.searchsorted(cdf, torch.tensor([u * cdf[-1].item()], dtype=torch.float64)))
    idx = min(idx, probs.shape[0] - 1)
    while probs[idx] == 0 and idx > 0:  # never land on a zero-probability token at the edge
        idx -= 1
    return idx


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft_tokens: list[int],
                       generator: torch.Generator) -> tuple[list[int], int]:
    """The accept/reject rule of speculative sampling (Leviathan et al., Chen et al. 2023).

    p: target distributions [k+1, V] at the k draft positions and one past them;
    q: draft distributions [k, V] the draft tokens were drawn from.
    Returns (emitted tokens, number of accepted draft tokens). The emitted tokens follow the
    target distribution exactly: each draft token x is kept with probability
    min(1, p(x)/q(x)); the first rejected one is replaced by a draw from norm(max(0, p - q));
    if all k are kept, one more token is drawn from p at the last position.
    """
    p, q = p.double().cpu(), q.double().cpu()
    out = []
    for i, x in enumerate(draft_tokens):
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        if q[i, x] > 0 and u < min(1.0, (p[i, x] / q[i, x]).item()):
            out.append(x)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if residual.sum() <= 0:  # p == q: any draw from p is exact
            residual = p[i]
        out.append(draw(residual / residual.sum(), generator))
        return out, i
    out.append(draw(p[len(draft_tokens)], generator))
    return out, len(draft_tokens)
