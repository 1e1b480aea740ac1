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
    # Times the reciprocal, not divided: CUDA divides by a scalar that way anyway, and
    # ``sample_rows`` (whose temperatures are a tensor) then computes the same numbers.
    logits = logits * (1.0 / params.temperature)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        # Stable: among equal probabilities (bf16 logits tie often) the lower token ids come
        # first, so that the nucleus is the same set on every device. An unstable sort, the
        # CPU's as the GPU's, kept an arbitrary one of the tied tokens at the nucleus's edge.
        sorted_p, idx = probs.sort(dim=-1, descending=True, stable=True)
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
    # Token i takes the draws in [cdf[i-1], cdf[i]) (right=True): a draw of exactly 0 lands on
    # the first token with any probability, not on token 0.
    idx = int(torch.searchsorted(cdf, torch.tensor([u * cdf[-1].item()], dtype=torch.float64),
                                 right=True))
    idx = min(idx, probs.shape[0] - 1)
    while probs[idx] == 0 and idx > 0:  # never land on a zero-probability token at the edge
        idx -= 1
    return idx


def row_settings(params: list[SamplingParams]) -> dict[str, torch.Tensor]:
    """``sample_rows``'s settings of these rows, on the host: ``inv_temperature`` (1 for a
    greedy row), ``greedy``, ``top_k`` (the vocabulary size standing for "off" is filled in
    by ``sample_rows``: 0 here) and ``top_p``."""
    return {"inv_temperature": torch.tensor([1.0 if p.greedy else 1.0 / p.temperature
                                             for p in params], dtype=torch.float32),
            "greedy": torch.tensor([p.greedy for p in params]),
            "top_k": torch.tensor([p.top_k for p in params], dtype=torch.long),
            "top_p": torch.tensor([p.top_p for p in params], dtype=torch.float32)}


def uses_filters(params: list[SamplingParams], vocab: int) -> bool:
    """Whether any of these rows filters its distribution by top-k or top-p (``sample_rows``'
    ``filters``)."""
    return any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params)


def sample_rows(logits: torch.Tensor, inv_temperature: torch.Tensor, greedy: torch.Tensor,
                top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor,
                filters: bool = True) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (biased), each row with its own settings
    (``row_settings``) and its own uniform draw ``u`` [B] (float64): the token ``draw`` picks
    from ``probabilities`` with that draw, in fixed shapes and with no value read on the host,
    so that a CUDA graph can hold the sampling of a decode step. Returns [B] (long).

    Each step is the one ``probabilities`` takes for a row; the filters a row does not use
    are computed and not applied. ``filters=False`` leaves top-k and top-p out altogether
    (their two sorts of the vocabulary), for rows of which none uses them (``uses_filters``):
    the same tokens. On CUDA the cumulative sum is a parallel scan rather than the host's
    sequential one: a draw within a rounding error (about 1e-16) of a boundary may take the
    neighbour."""
    logits = logits.float()
    vocab = logits.shape[-1]
    pos = torch.arange(vocab, device=logits.device)
    scaled = logits * inv_temperature[:, None]
    if filters:
        k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
        kth = scaled.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
        probs = torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1)
        nucleus = top_p < 1.0
        sorted_p, idx = probs.sort(dim=-1, descending=True, stable=True)  # as probabilities()
        drop = ((sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]) & nucleus[:, None]
        kept = torch.zeros_like(probs).scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
        probs = torch.where(nucleus[:, None], kept / kept.sum(-1, keepdim=True), probs)
    else:
        probs = torch.softmax(scaled, dim=-1)
    top1 = torch.zeros_like(probs).scatter(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.where(greedy[:, None], top1, probs)
    cdf = probs.double().cumsum(-1)
    at = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # as draw(): right=True
    at = at.clamp(max=vocab - 1)  # [B, 1]
    # As ``draw``: never a zero-probability token, so the last nonzero one at or before it.
    return torch.where((probs > 0) & (pos[None] <= at), pos[None], 0).amax(-1)


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
