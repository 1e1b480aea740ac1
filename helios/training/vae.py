"""The VAE phases: the encoder and decoder together (``vae``), then the decoder alone on the
refiner's renderings (``decoder``)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .run import PhaseRun


def vae_loss(t, frames: torch.Tensor, gen: torch.Generator | None = None):
    """frames [B, 8, 3, H, W] in [-1, 1] -> (loss, reconstruction, kl)."""
    vae, f = t.models["vae"], t.cfg.frames_per_latent
    mean, logvar = vae.encoder(frames.reshape(-1, f, *frames.shape[2:]))
    logvar = logvar.clamp(-10, 4)
    eps = torch.randn(mean.shape, generator=gen, device=mean.device)
    z = mean + eps * (0.5 * logvar).exp()
    z = z.view(frames.shape[0], 2, *z.shape[1:])
    first = vae.decoder(z[:, 0], torch.zeros_like(z[:, 0]))
    second = vae.decoder(z[:, 1], z[:, 0])
    recon = torch.cat([first, second], dim=1)
    rec = (recon - frames).abs().mean() + F.mse_loss(recon, frames)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    loss = rec + t.settings.kl_weight * kl
    return loss, rec.item(), kl.item()


def train_vae(t) -> None:
    s = t.settings
    vae = t.models["vae"].train()
    run = PhaseRun(t, "vae", {"vae": vae}, vae.parameters(), s.steps["vae"], s.lr["vae"])
    for _ in run:
        rng = run.rng()
        frames, _ = t.video_batch(rng, s.batch["vae"], 2 * t.cfg.frames_per_latent)
        gen = torch.Generator(device=t.device).manual_seed(int(rng.integers(2**62)))
        loss, rec, kl = vae_loss(t, frames, gen)
        run.backward(loss, reconstruction=rec, kl=kl)
    unit_latent(t, np.random.default_rng([t.seed, 98]))
    t.finish("vae", ("vae",))


@torch.no_grad()
def unit_latent(t, rng) -> None:
    """Rescale the latent to unit standard deviation (the role of diffusers' VAE
    ``scaling_factor``), inside the weights: the encoder's mean output times s, its
    log-variance plus 2 ln s, the decoder's input weights over s; the VAE computes the same
    frames. The refiner's flow matching assumes data on the scale of its unit noise; the
    latent came out at std 0.65 without this, and at 0.18 under a roughness penalty, where
    an object is a signal small enough for a low error to erase it."""
    vae, f = t.models["vae"].eval(), t.cfg.frames_per_latent
    frames, _ = t.video_batch(rng, 16, f)
    scale = 1.0 / float(vae.encode(frames).std())
    c = t.cfg.vae.latent_channels
    out = vae.encoder.conv_out
    out.weight[:c] *= scale
    out.bias[:c] *= scale
    out.bias[c:] += 2 * math.log(scale)
    vae.decoder.conv_in.weight /= scale
    t.log(f"vae: latent rescaled by {scale:.3f} to unit standard deviation")


def decoder_loss(t, frames: torch.Tensor, rng) -> torch.Tensor:
    """frames [B, 8, 3, H, W]: two latent frames, decoded as in streaming from the
    refiner's 3-step renderings of them (half the batches) or from encoder latents."""
    vae, refiner, f = t.models["vae"], t.models["refiner"], t.cfg.frames_per_latent
    b = frames.shape[0]
    gen = torch.Generator(device=t.device).manual_seed(int(rng.integers(2**62)))
    with torch.no_grad():
        z = vae.encode(frames.reshape(-1, f, *frames.shape[2:]))
        z = z.view(b, 2, *z.shape[1:])
        if rng.random() < t.settings.decoder_rendered:
            ids = refiner.plan_tokenizer(z.flatten(0, 1), refiner.plan_embed.weight).view(b, 2, -1)
            noise = torch.randn(z.shape, generator=gen, device=t.device)
            first = refiner.render(noise[:, 0], ids[:, 0])
            second = refiner.render(noise[:, 1], ids[:, 1], anchor=first)
            z = torch.stack([first, second], dim=1)
    recon = torch.cat([vae.decoder(z[:, 0], torch.zeros_like(z[:, 0])),
                       vae.decoder(z[:, 1], z[:, 0])], dim=1)
    return (recon - frames).abs().mean() + F.mse_loss(recon, frames)


def train_decoder(t) -> None:
    """The refiner's few steps give the conditional mean of a latent frame, smoother than
    the encoder's latents; the decoder learns to render those sharply (the encoder, and so
    the latents the refiner and AR were trained on, stay as they are)."""
    s = t.settings
    vae = t.models["vae"]
    t.models["refiner"].eval()
    vae.encoder.eval(), vae.decoder.train()
    run = PhaseRun(t, "decoder", {"vae": vae}, vae.decoder.parameters(), s.steps["decoder"],
                   s.lr["decoder"])
    for _ in run:
        rng = run.rng()
        frames, _ = t.video_batch(rng, s.batch["decoder"], 2 * t.cfg.frames_per_latent)
        run.backward(decoder_loss(t, frames, rng))
    t.finish("decoder", ("vae",))
