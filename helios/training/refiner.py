"""The refiner phase: the plan tokenizer (whose codebook is the refiner's plan embedding)
with the refiner it conditions, trained by flow matching on latent frames in the context
inference gives them, then on the few-step sampler unrolled."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..refiner import euler_sample
from ..schedule import ContextFrames
from .run import PhaseRun


def salience(x0: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, h, w] of latent frames [B, C, h, w], mean 1: pixels far
    from their channel's median over the frame (objects, not background) count more."""
    dev = (x0 - x0.flatten(2).median(-1).values[..., None, None]).abs().mean(1, keepdim=True)
    w = 1 + weight * dev / dev.amax((2, 3), keepdim=True).clamp_min(1e-6)
    return w / w.mean((2, 3), keepdim=True)


def _context(t, latents, i: int, noise_scale: float, gen=None):
    """Anchor and history of latent frame ``i`` exactly as inference keeps them
    (``ContextFrames``), with a little noise: at inference they are the refiner's own
    outputs."""
    def pick(j):
        x = latents[:, j]
        return x + noise_scale * torch.randn(x.shape, generator=gen, device=x.device)
    return context_frames(t, i, pick)


def context_frames(t, i: int, frame):
    """(anchor, history) of latent frame ``i``: the frames ``ContextFrames`` keeps at
    inference, with the configuration's ``history_frames``, each made by ``frame(j)``
    from the index of the frame it holds."""
    context = ContextFrames(t.cfg.refiner.history_frames)
    for j in range(i):
        context.push(j)
    anchor = None if context.anchor is None else frame(context.anchor)
    return anchor, [frame(j) for j in context.history]


@torch.no_grad()
def _rendered_context(t, latents, i: int, gen):
    """Anchor and history of frame ``i`` as the refiner itself renders them: each frame
    from its plan tokens and its own true context, 3 steps from noise."""
    refiner = t.models["refiner"]
    def render(j):
        ids = refiner.plan_tokenizer(latents[:, j], refiner.plan_embed.weight)
        anchor, history = _context(t, latents, j, t.settings.context_noise, gen)
        noise = torch.randn(latents[:, j].shape, generator=gen, device=t.device)
        return refiner.render(noise, ids, anchor, history)
    return context_frames(t, i, render)


def plan_features(t, x0, frozen: bool = False):
    """Straight-through plan embeddings, their token ids and the VQ loss (with a frozen
    codebook: its rows, and no VQ loss)."""
    refiner = t.models["refiner"]
    feats = refiner.plan_tokenizer.features(x0)
    book = refiner.plan_embed.weight
    ids = torch.cdist(feats.detach(), book.detach()[None].expand(x0.shape[0], -1, -1)).argmin(-1)
    q = book[ids]
    ids = torch.cat([ids, refiner.plan_tokenizer.geometry(x0)], dim=1)
    if frozen:
        return q.detach(), ids, feats.new_zeros(())
    vq = F.mse_loss(q, feats.detach()) + t.settings.commitment * F.mse_loss(feats, q.detach())
    return feats + (q - feats).detach(), ids, vq


def refiner_loss(t, latents, rng, fewstep: bool, frozen: bool = False):
    """latents [B, T, C, h, w] -> loss (flow matching, or the unrolled sampler's error).
    ``frozen``: the codebook and plan tokenizer stay as they are (a fine-tuning run)."""
    refiner = t.models["refiner"]
    i = int(rng.integers(latents.shape[1]))
    x0 = latents[:, i]
    gen = torch.Generator(device=t.device).manual_seed(int(rng.integers(2**62)))
    anchor, history = _context(t, latents, i, t.settings.context_noise, gen)
    if rng.random() < t.settings.no_context:  # as for a video's first frame
        anchor, history = None, []
    elif i > 0 and rng.random() < t.settings.rendered_history:
        anchor, history = _rendered_context(t, latents, i, gen)
    plan, ids, vq = plan_features(t, x0, frozen)
    r = refiner.config.region_tokens
    if refiner.config.geometry_bins and i > 0 and rng.random() < t.settings.stale_regions:
        j = i - int(rng.integers(1, min(i, 2) + 1))
        plan, old_ids, _ = plan_features(t, latents[:, j], frozen)
        ids = torch.cat([old_ids[:, :r], ids[:, r:]], dim=1)
    kv = refiner.encode_context(ids, anchor, history, plan_embeds=plan)
    noise = torch.randn(x0.shape, generator=gen, device=t.device)
    weight = salience(x0, t.settings.salient_weight)
    if fewstep:   # the sampler of Refiner.render, unrolled, trained on its final output
        x = euler_sample(lambda x, i, sigma: refiner(x, sigma, kv), noise, refiner.sigmas())
        err = (weight * (x - x0) ** 2).mean()
        return err + vq, err.item(), vq.item(), ids
    # Flow matching at sigmas spread like the shifted schedule's (logit-normal, shifted).
    u = torch.sigmoid(torch.randn(x0.shape[0], generator=gen, device=t.device))
    shift = refiner.config.shift
    sigma = shift * u / (1 + (shift - 1) * u)
    s = sigma[:, None, None, None]
    xt = (1 - s) * x0 + s * noise
    v = refiner(xt, sigma, kv)
    err = (weight * (v - (noise - x0)) ** 2).mean()
    return err + vq, err.item(), vq.item(), ids


def train_refiner(t) -> None:
    s = t.settings
    refiner = t.models["refiner"].train()
    latents, _ = t.bank()
    steps = s.steps["refiner"]
    switch = int(steps * (1 - s.fewstep_fraction))
    # Fine-tuning (the checkpoint's codebook is trained): the plan tokenizer and codebook
    # stay fixed, so that the AR backbone's and the draft's tokens keep their meaning.
    # Asked before PhaseRun restores a resumed state, which is on the sphere either way.
    frozen = _codebook_trained(t)
    for m in (refiner.plan_tokenizer, refiner.plan_embed):
        m.requires_grad_(not frozen)
    if frozen:
        t.log("refiner: codebook and plan tokenizer frozen (fine-tuning)")
    run = PhaseRun(t, "refiner", {"refiner": refiner}, refiner.parameters(), steps,
                   s.lr["refiner"])
    used = torch.zeros(refiner.config.codebook_size, device=t.device)
    for step in run:
        rng = run.rng()
        idx = torch.from_numpy(rng.integers(latents.shape[0], size=s.batch["refiner"]))
        loss, err, vq, ids = refiner_loss(t, latents[idx.to(t.device)], rng, step >= switch,
                                          frozen)
        if step == 0 and not frozen:  # rows start on real features
            _restart_dead_codes(t, torch.zeros_like(used), latents, rng)
        run.backward(loss, error=err, vq=vq, fewstep=step >= switch)
        if frozen:
            continue
        _normalize_codebook(t)
        regions = ids[:, :refiner.config.region_tokens].flatten()
        used.index_add_(0, regions, torch.ones(regions.numel(), device=t.device))
        period = s.dead_code_period
        if step % period == period - 1 and step < switch:
            _restart_dead_codes(t, used, latents, rng)
            used.zero_()
    for m in (refiner.plan_tokenizer, refiner.plan_embed):
        m.requires_grad_(True)
    t.finish("refiner", ("refiner",))


def _codebook_trained(t) -> bool:
    """A trained codebook lives on the features' sphere; a random one does not."""
    book = t.models["refiner"].plan_embed.weight
    return bool(torch.allclose(book.norm(dim=-1), torch.full_like(book[:, 0], book.shape[1] ** 0.5),
                               rtol=1e-3))


@torch.no_grad()
def _normalize_codebook(t) -> None:
    """Codebook rows on the sphere the plan tokenizer's features live on."""
    book = t.models["refiner"].plan_embed.weight
    book.copy_(F.normalize(book, dim=-1) * math.sqrt(book.shape[1]))


@torch.no_grad()
def _restart_dead_codes(t, used, latents, rng) -> None:
    """Codebook rows no frame chose lately move onto features of random frames."""
    refiner = t.models["refiner"]
    dead = (used == 0).nonzero().flatten()
    if len(dead) == 0:
        return
    n = max(64, len(dead) // 4)
    idx = torch.from_numpy(rng.integers(latents.shape[0], size=n))
    frames = latents[idx.to(t.device), torch.from_numpy(rng.integers(latents.shape[1], size=n))]
    feats = refiner.plan_tokenizer.features(frames).flatten(0, 1)
    pick = torch.from_numpy(rng.integers(feats.shape[0], size=len(dead))).to(t.device)
    jitter = 0.05 * torch.randn(len(dead), feats.shape[1], device=t.device)
    refiner.plan_embed.weight[dead] = feats[pick] + jitter
    _normalize_codebook(t)
    t.record({"phase": "refiner", "restarted_codes": len(dead)})
