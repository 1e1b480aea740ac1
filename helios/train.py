"""Training of every stage, and fine-tuning of a checkpoint on a folder of videos.

The stages train in order, each on what the previous ones produce:

    vae       encoder + decoder on windows of 8 frames (two latent frames; the second
              decodes with the first as its previous latent, as in streaming); then the
              latent is rescaled to unit standard deviation inside the weights
    refiner   the plan tokenizer (its codebook is the refiner's plan-token embedding) with
              the refiner it conditions: flow matching on latent frames with the anchor and
              history the pipeline gives it, then the few-step schedule (the 3-step Euler
              sampler unrolled and trained end to end on the clean frame)
    decoder   the VAE decoder again, on the refiner's 3-step renderings (and encoder latents)
    ar        the text encoder with the AR backbone: next plan token after the text prefix,
              on the two kinds of window the pipeline's AR segments show
    draft     the draft model (and the text encoder's draft projection) distilled from the
              AR backbone's next-token distribution

Each stage writes its component folders into the output checkpoint as it finishes, so the
folder is a loadable checkpoint all along. Training state (weights, optimiser, step) is saved
under ``<out>/train_state`` every ``save_every`` steps; running the same command again resumes.
Every random draw comes from (seed, stage, step), so a resumed run draws what an
uninterrupted one would have drawn.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import (COMPONENTS, init_checkpoint, load_component, read_config,
                         save_component, write_index)
from .config import HeliosConfig, get_config
from .data import drop_attribute_words, render_clip, sample_spec
from .errors import HeliosError
from .refiner import euler_sample
from .schedule import ContextFrames
from .text_encoder import tokenize
from .vae import from_uint8

STAGES = ("vae", "refiner", "decoder", "ar", "draft")
_OUTPUT = {"vae": "vae", "refiner": "refiner", "decoder": "vae", "ar": "ar_backbone", "draft": "draft"}
CLIP_LATENTS = 12          # latent frames per clip in the latent bank (48 video frames)
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


@dataclass
class TrainSettings:
    steps: dict = field(default_factory=lambda: {"vae": 1200, "refiner": 2400, "decoder": 500,
                                                 "ar": 2000, "draft": 500})
    batch: dict = field(default_factory=lambda: {"vae": 8, "refiner": 48, "decoder": 8, "ar": 32,
                                                 "draft": 32})
    lr: dict = field(default_factory=lambda: {"vae": 1e-3, "refiner": 5e-4, "decoder": 5e-4,
                                              "ar": 1e-3, "draft": 1e-3})
    bank_clips: int = 1200           # clips encoded into the latent bank
    fewstep_fraction: float = 0.3    # last part of the refiner stage: the unrolled sampler
    kl_weight: float = 1e-3
    # The refiner's loss weighs each latent pixel by 1 + salient_weight * (how far it is from
    # its channel's median over the frame, relative to the frame's largest such distance):
    # a small object is a few percent of a frame, and an unweighted MSE renders it as a
    # faint ghost over a perfect background (docs/training.md).
    salient_weight: float = 9.0
    # Share of refiner steps that see neither anchor nor history, as a video's first latent
    # frame does: its plan tokens alone must then describe the frame.
    no_context: float = 0.3
    # Share of refiner steps whose history frames are the refiner's own 3-step renderings (of
    # those frames' plan tokens, on true history) instead of encoder latents: at inference the
    # history is its own output, and a refiner trained only on true history copied its
    # rendered history and lost the motion its plan tokens describe (docs/training.md).
    rendered_history: float = 0.5
    # Share of refiner steps (on frames with geometry tokens and a past) whose region tokens
    # are those of one or two frames earlier, the geometry tokens the frame's own: the AR's
    # region tokens can lag behind its geometry tokens, and the refiner should then place
    # the object where the geometry tokens say. Against the same recipe without it: the same
    # held-out motion, a sharper 60 s video (docs/training.md).
    stale_regions: float = 0.3
    change_weight: float = 5.0       # AR loss on plan tokens that change from the last frame
    # AR captions of synthetic clips lose each colour / shape word with this probability
    # (data.drop_attribute_words): motion words then have to work alone (docs/training.md).
    caption_dropout: float = 0.25
    save_every: int = 100


# ---- data ----------------------------------------------------------------------------------
class SyntheticClips:
    """Captioned synthetic clips (helios.data), never the held-out combinations."""

    def __init__(self, cfg: HeliosConfig):
        self.size = cfg.height

    def sample(self, rng: np.random.Generator, num_frames: int) -> tuple[np.ndarray, str]:
        return synthetic_clip(rng, num_frames, self.size)


def synthetic_clip(rng: np.random.Generator, num_frames: int, size: int) -> tuple[np.ndarray, str]:
    """A random captioned clip (uint8 [T, size, size, 3], caption) of a training combination."""
    spec = sample_spec(rng, max_objects=2 if rng.random() < 0.25 else 1)
    return render_clip(spec, num_frames, size, seed=int(rng.integers(2**31))), spec.caption


def _synthetic_bank_clip(job) -> tuple[np.ndarray, str]:
    """Clip ``i`` of a synthetic latent bank (run in a worker process)."""
    size, seed, i, num_frames = job
    return synthetic_clip(np.random.default_rng([seed, 99, i]), num_frames, size)


class FolderClips:
    """Videos of a folder with their captions, resized to the configuration.

    A caption is the sidecar ``<video>.txt``, or a row of ``captions.csv`` (columns ``file``
    and ``caption``). Files that cannot be decoded, have no caption, or are shorter than one
    latent frame are listed in ``rejected`` with the reason and never used.
    """

    def __init__(self, folder: str | Path, cfg: HeliosConfig):
        import av  # noqa: PLC0415

        folder = Path(folder)
        if not folder.is_dir():
            raise HeliosError("data", f"must be a folder of videos, {str(folder)!r} is not one")
        table = {}
        if (folder / "captions.csv").is_file():
            with open(folder / "captions.csv", newline="") as f:
                table = {row["file"]: row["caption"] for row in csv.DictReader(f)}
        self.clips: list[tuple[np.ndarray, str]] = []
        self.names: list[str] = []
        self.rejected: list[tuple[str, str]] = []
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in VIDEO_SUFFIXES:
                continue
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text().strip() if sidecar.is_file() else table.get(path.name)
            if not caption:
                self.rejected.append((path.name, "no caption (.txt sidecar or captions.csv row)"))
                continue
            try:
                tokenize(caption, cfg.text_encoder.max_prompt_bytes)
            except HeliosError as e:
                self.rejected.append((path.name, f"caption: {e}"))
                continue
            try:
                frames = self._read(path, cfg, av)
            except Exception as e:  # PyAV raises many FFmpeg error types: all mean unreadable
                self.rejected.append((path.name, f"cannot decode: {type(e).__name__}: {e}"))
                continue
            if len(frames) < cfg.frames_per_latent:
                self.rejected.append((path.name, f"{len(frames)} frames, fewer than one latent "
                                                 f"frame ({cfg.frames_per_latent})"))
                continue
            self.clips.append((frames, caption))
            self.names.append(path.name)
        if not self.clips:
            raise HeliosError("data", f"has no usable video in {str(folder)!r} "
                                      f"({len(self.rejected)} rejected)")

    @staticmethod
    def _read(path: Path, cfg: HeliosConfig, av) -> np.ndarray:
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24", width=cfg.width, height=cfg.height)
                      for f in c.decode(video=0)]
        if not frames:
            raise ValueError("no video frames")
        return np.stack(frames)

    def sample(self, rng: np.random.Generator, num_frames: int) -> tuple[np.ndarray, str]:
        frames, caption = self.clips[int(rng.integers(len(self.clips)))]
        start = int(rng.integers(max(1, len(frames) - num_frames + 1)))
        window = frames[start:start + num_frames]
        if len(window) < num_frames:  # a short clip holds its last frame
            pad = np.repeat(window[-1:], num_frames - len(window), axis=0)
            window = np.concatenate([window, pad])
        return window, caption


# ---- the loop shared by the stages ---------------------------------------------------------
class _Run:
    """Optimiser, warmup + cosine schedule, resumable state, progress bar and loss log."""

    def __init__(self, trainer: "Trainer", stage: str, modules: dict, params, steps: int,
                 lr: float):
        self.t, self.stage, self.modules, self.steps = trainer, stage, modules, steps
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
        warm = min(50, max(1, steps // 10))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warm) *
            (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
        self.path = trainer.state_dir / f"{stage}.pt"
        self.step = 0
        self.history: list[float] = []
        if self.path.is_file():
            state = torch.load(self.path, map_location=trainer.device, weights_only=True)
            for name, m in modules.items():
                m.load_state_dict(state["modules"][name])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.step = state["step"]
            trainer.log(f"{stage}: resuming at step {self.step} of {steps}")

    def save(self) -> None:
        state = {"modules": {n: m.state_dict() for n, m in self.modules.items()},
                 "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "step": self.step}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.t.seed, STAGES.index(self.stage), self.step])

    def __iter__(self):
        bar = tqdm(total=self.steps, initial=self.step, desc=self.stage, unit="step",
                   disable=not self.t.progress, dynamic_ncols=True)
        while self.step < self.steps:
            yield self.step
            self.step += 1
            if self.step % self.t.settings.save_every == 0 or self.step == self.steps:
                self.save()
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(self.history[-20:]):.4f}")
        bar.close()

    def backward(self, loss: torch.Tensor, **parts: float) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        value = loss.item()
        if not math.isfinite(value):
            raise HeliosError("training", f"{self.stage} loss became {value} at step {self.step}")
        self.history.append(value)
        self.t.losses.setdefault(self.stage, []).append(value)
        if self.step % 10 == 0 or self.step == self.steps - 1:
            self.t.record({"stage": self.stage, "step": self.step, "loss": value,
                           "lr": self.sched.get_last_lr()[0], **parts})


def salience(x0: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, h, w] of latent frames [B, C, h, w], mean 1: pixels far
    from their channel's median over the frame (objects, not background) count more."""
    dev = (x0 - x0.flatten(2).median(-1).values[..., None, None]).abs().mean(1, keepdim=True)
    w = 1 + weight * dev / dev.amax((2, 3), keepdim=True).clamp_min(1e-6)
    return w / w.mean((2, 3), keepdim=True)


class _CausalAttention:
    """The ``cache`` argument of ARBackbone.forward for training: causal attention over the
    whole (right-padded) sequence, grouped-query heads repeated."""

    def attend(self, layer_idx, q, k, v):
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                              v.repeat_interleave(g, 1), is_causal=True)


class Trainer:
    def __init__(self, out: str | Path, config: str | None = None, init: str | Path | None = None,
                 data: str | Path | None = None, device: str = "cpu", seed: int = 0,
                 settings: TrainSettings | None = None, progress: bool = True):
        self.out = Path(out)
        self.device = torch.device(device)
        self.seed = seed
        self.settings = settings or TrainSettings()
        self.progress = progress
        self.state_dir = self.out / "train_state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.losses: dict[str, list[float]] = {}
        if (self.out / "model_index.json").is_file():      # resuming: the output is the state
            self.cfg = read_config(self.out)
        elif init is not None and config is None:           # fine-tuning from a checkpoint
            self.cfg = read_config(init)
            for name in COMPONENTS:
                save_component(load_component(init, name, self.cfg), self.cfg, name, self.out)
            write_index(self.cfg, self.out)
        else:
            self.cfg = get_config(config or "tiny")
            init_checkpoint(self.cfg, self.out, seed=seed)
            self._start(init)
        self.source = FolderClips(data, self.cfg) if data is not None else SyntheticClips(self.cfg)
        if data is not None:  # a few videos: a bank of windows of them, not 1200 clips
            self.settings.bank_clips = min(self.settings.bank_clips, max(16, 8 * len(self.source.clips)))
        for name, why in getattr(self.source, "rejected", []):
            self.log(f"skipped {name}: {why}")
        self.models = {n: load_component(self.out, n, self.cfg, self.device, torch.float32)
                       for n in COMPONENTS}

    def _start(self, init: str | Path | None) -> None:
        """Finish a new checkpoint: its geometry rows start on the grid places they name, and
        with ``init``, a checkpoint of another config, every tensor whose name and shape match
        is copied from it, the rest keep their fresh values (for example a refiner that gains
        geometry tokens keeps its trained blocks, codebook and plan tokenizer). A tensor that
        differs only in its number of rows takes the rows both have: the region tokens'
        positions of a refiner with more plan tokens a frame, the codebook's rows of an AR
        whose vocabulary grew. Each component is read and written once, and only if it
        changes."""
        other = None if init is None else read_config(init)
        for name in COMPONENTS:
            geometry = name == "refiner" and bool(self.cfg.refiner.geometry_bins)
            if other is None and not geometry:
                continue
            module = load_component(self.out, name, self.cfg)
            if geometry:
                p = self.cfg.refiner.patch_size
                module.init_geometry_embed(self.cfg.latent_height // p, self.cfg.latent_width // p)
            if other is not None:
                self._load_matching(module, name, init, other)
            save_component(module, self.cfg, name, self.out)

    def _load_matching(self, module, name: str, init: str | Path, other) -> None:
        src = load_component(init, name, other).state_dict()
        own = module.state_dict()
        fits, rows = {}, []
        for k, v in src.items():
            if k not in own:
                continue
            if own[k].shape == v.shape:
                fits[k] = v
            elif own[k].dim() == v.dim() >= 1 and own[k].shape[1:] == v.shape[1:]:
                n = min(len(v), len(own[k]))
                fits[k] = torch.cat([v[:n], own[k][n:]])
                rows.append(f"{k} (rows 0..{n - 1})")
        module.load_state_dict(fits, strict=False)
        fresh = sorted(set(own) - set(fits))
        self.log(f"init {name}: {len(fits)} of {len(own)} tensors from {init}"
                 + (f"; partly: {', '.join(rows)}" if rows else "")
                 + (f"; fresh: {', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''}"
                    if fresh else ""))

    # ---- bookkeeping -------------------------------------------------------------------
    def log(self, line: str) -> None:
        tqdm.write(line) if self.progress else None
        self.record({"message": line})

    def record(self, entry: dict) -> None:
        with open(self.state_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"time": round(time.time(), 1), **entry}) + "\n")

    def _done(self) -> set:
        p = self.state_dir / "done.json"
        return set(json.loads(p.read_text())) if p.is_file() else set()

    def _finish(self, stage: str, names: tuple) -> None:
        for n in names:
            save_component(self.models[n], self.cfg, n, self.out)
        done = self._done() | {stage}
        (self.state_dir / "done.json").write_text(json.dumps(sorted(done)) + "\n")
        self.log(f"{stage}: done, wrote {', '.join(names)}")

    def run(self, stages=STAGES) -> dict:
        for s in stages:
            if s not in STAGES:
                raise HeliosError("stages", f"must be among {list(STAGES)}, got {s!r}")
        for s in STAGES:
            if s in stages and s not in self._done():
                getattr(self, f"train_{s}")()
                self.models[_OUTPUT[s]].eval()
        return {s: v for s, v in self.losses.items()}

    # ---- stage 1: the VAE --------------------------------------------------------------
    def vae_loss(self, frames: torch.Tensor, gen: torch.Generator | None = None):
        """frames [B, 8, 3, H, W] in [-1, 1] -> (loss, reconstruction, kl)."""
        vae, f = self.models["vae"], self.cfg.frames_per_latent
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
        loss = rec + self.settings.kl_weight * kl
        return loss, rec.item(), kl.item()

    def _video_batch(self, rng, batch: int, num_frames: int):
        clips, captions = zip(*(self.source.sample(rng, num_frames) for _ in range(batch)))
        return from_uint8(torch.from_numpy(np.stack(clips))).to(self.device), list(captions)

    def train_vae(self) -> None:
        s = self.settings
        vae = self.models["vae"].train()
        run = _Run(self, "vae", {"vae": vae}, vae.parameters(), s.steps["vae"], s.lr["vae"])
        for _ in run:
            rng = run.rng()
            frames, _ = self._video_batch(rng, s.batch["vae"], 2 * self.cfg.frames_per_latent)
            gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**62)))
            loss, rec, kl = self.vae_loss(frames, gen)
            run.backward(loss, reconstruction=rec, kl=kl)
        self._unit_latent(np.random.default_rng([self.seed, 98]))
        self._finish("vae", ("vae",))

    @torch.no_grad()
    def _unit_latent(self, rng) -> None:
        """Rescale the latent to unit standard deviation (the role of diffusers' VAE
        ``scaling_factor``), inside the weights: the encoder's mean output times s, its
        log-variance plus 2 ln s, the decoder's input weights over s; the VAE computes the same
        frames. The refiner's flow matching assumes data on the scale of its unit noise; the
        latent came out at std 0.65 without this, and at 0.18 under a roughness penalty, where
        an object is a signal small enough for a low error to erase it."""
        vae, f = self.models["vae"].eval(), self.cfg.frames_per_latent
        frames, _ = self._video_batch(rng, 16, f)
        scale = 1.0 / float(vae.encode(frames).std())
        c = self.cfg.vae.latent_channels
        out = vae.encoder.conv_out
        out.weight[:c] *= scale
        out.bias[:c] *= scale
        out.bias[c:] += 2 * math.log(scale)
        vae.decoder.conv_in.weight /= scale
        self.log(f"vae: latent rescaled by {scale:.3f} to unit standard deviation")

    # ---- the latent bank: clips encoded once for the later stages ----------------------
    @torch.no_grad()
    def bank(self) -> tuple[torch.Tensor, list[str]]:
        """Latent frames [N, 12, C, h, w] of N clips and their captions (cached on disk)."""
        path = self.state_dir / "bank.pt"
        if path.is_file():
            b = torch.load(path, weights_only=True)
            return b["latents"].to(self.device), b["captions"]
        vae, f = self.models["vae"].eval(), self.cfg.frames_per_latent
        n = self.settings.bank_clips
        if isinstance(self.source, SyntheticClips):
            # Clip i draws from (seed, 99, i) alone, so the bank is the same whatever the
            # number of processes rendering it (numpy rendering is the slow part).
            jobs = [(self.cfg.height, self.seed, i, CLIP_LATENTS * f) for i in range(n)]
            pool = ProcessPoolExecutor(min(os.cpu_count() or 1, 16))
            clips = pool.map(_synthetic_bank_clip, jobs, chunksize=8)
        else:
            rng = np.random.default_rng([self.seed, 99])
            pool, clips = None, (self.source.sample(rng, CLIP_LATENTS * f) for _ in range(n))
        latents, captions = [], []
        try:
            for clip, caption in tqdm(clips, total=n, desc="latent bank", unit="clip",
                                      disable=not self.progress, dynamic_ncols=True):
                frames = from_uint8(torch.from_numpy(clip)[None]).to(self.device)
                latents.append(vae.encode(frames.view(CLIP_LATENTS, f, *frames.shape[2:])).cpu())
                captions.append(caption)
        finally:  # an interrupted bank stops its workers too
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        latents = torch.stack(latents)
        torch.save({"latents": latents, "captions": captions}, path)
        self.log(f"latent bank: {len(captions)} clips, latent std {latents.std():.3f}")
        return latents.to(self.device), captions

    # ---- stage 2: plan tokenizer + refiner, then the few-step schedule -----------------
    def _context(self, latents, i: int, noise_scale: float, gen=None):
        """Anchor and history of latent frame ``i`` exactly as inference keeps them
        (``ContextFrames``), with a little noise: at inference they are the refiner's own
        outputs."""
        def pick(j):
            x = latents[:, j]
            return x + noise_scale * torch.randn(x.shape, generator=gen, device=x.device)
        return self.context_frames(i, pick)

    def context_frames(self, i: int, frame):
        """(anchor, history) of latent frame ``i``: the frames ``ContextFrames`` keeps at
        inference, with the configuration's ``history_frames``, each made by ``frame(j)``
        from the index of the frame it holds."""
        context = ContextFrames(self.cfg.refiner.history_frames)
        for j in range(i):
            context.push(j)
        anchor = None if context.anchor is None else frame(context.anchor)
        return anchor, [frame(j) for j in context.history]

    @torch.no_grad()
    def _rendered_context(self, latents, i: int, gen):
        """Anchor and history of frame ``i`` as the refiner itself renders them: each frame
        from its plan tokens and its own true context, 3 steps from noise."""
        refiner = self.models["refiner"]
        def render(j):
            ids = refiner.plan_tokenizer(latents[:, j], refiner.plan_embed.weight)
            anchor, history = self._context(latents, j, 0.05, gen)
            noise = torch.randn(latents[:, j].shape, generator=gen, device=self.device)
            return refiner.render(noise, ids, anchor, history)
        return self.context_frames(i, render)

    def plan_features(self, x0, frozen: bool = False):
        """Straight-through plan embeddings, their token ids and the VQ loss (with a frozen
        codebook: its rows, and no VQ loss)."""
        refiner = self.models["refiner"]
        feats = refiner.plan_tokenizer.features(x0)
        book = refiner.plan_embed.weight
        ids = torch.cdist(feats.detach(), book.detach()[None].expand(x0.shape[0], -1, -1)).argmin(-1)
        q = book[ids]
        ids = torch.cat([ids, refiner.plan_tokenizer.geometry(x0)], dim=1)
        if frozen:
            return q.detach(), ids, feats.new_zeros(())
        vq = F.mse_loss(q, feats.detach()) + 0.25 * F.mse_loss(feats, q.detach())
        return feats + (q - feats).detach(), ids, vq

    def refiner_loss(self, latents, rng, fewstep: bool, frozen: bool = False):
        """latents [B, T, C, h, w] -> loss (flow matching, or the unrolled sampler's error).
        ``frozen``: the codebook and plan tokenizer stay as they are (a fine-tuning run)."""
        refiner = self.models["refiner"]
        i = int(rng.integers(latents.shape[1]))
        x0 = latents[:, i]
        gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**62)))
        anchor, history = self._context(latents, i, 0.05, gen)
        if rng.random() < self.settings.no_context:  # as for a video's first frame
            anchor, history = None, []
        elif i > 0 and rng.random() < self.settings.rendered_history:
            anchor, history = self._rendered_context(latents, i, gen)
        plan, ids, vq = self.plan_features(x0, frozen)
        r = refiner.config.region_tokens
        if refiner.config.geometry_bins and i > 0 and rng.random() < self.settings.stale_regions:
            j = i - int(rng.integers(1, min(i, 2) + 1))
            plan, old_ids, _ = self.plan_features(latents[:, j], frozen)
            ids = torch.cat([old_ids[:, :r], ids[:, r:]], dim=1)
        kv = refiner.encode_context(ids, anchor, history, plan_embeds=plan)
        noise = torch.randn(x0.shape, generator=gen, device=self.device)
        weight = salience(x0, self.settings.salient_weight)
        if fewstep:   # the sampler of Refiner.render, unrolled, trained on its final output
            x = euler_sample(lambda x, i, sigma: refiner(x, sigma, kv), noise, refiner.sigmas())
            err = (weight * (x - x0) ** 2).mean()
            return err + vq, err.item(), vq.item(), ids
        # Flow matching at sigmas spread like the shifted schedule's (logit-normal, shifted).
        u = torch.sigmoid(torch.randn(x0.shape[0], generator=gen, device=self.device))
        shift = refiner.config.shift
        sigma = shift * u / (1 + (shift - 1) * u)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        v = refiner(xt, sigma, kv)
        err = (weight * (v - (noise - x0)) ** 2).mean()
        return err + vq, err.item(), vq.item(), ids

    def train_refiner(self) -> None:
        s = self.settings
        refiner = self.models["refiner"].train()
        latents, _ = self.bank()
        steps = s.steps["refiner"]
        switch = int(steps * (1 - s.fewstep_fraction))
        # Fine-tuning (the checkpoint's codebook is trained): the plan tokenizer and codebook
        # stay fixed, so that the AR backbone's and the draft's tokens keep their meaning.
        # Asked before _Run restores a resumed state, which is on the sphere either way.
        frozen = self._codebook_trained()
        for m in (refiner.plan_tokenizer, refiner.plan_embed):
            m.requires_grad_(not frozen)
        if frozen:
            self.log("refiner: codebook and plan tokenizer frozen (fine-tuning)")
        run = _Run(self, "refiner", {"refiner": refiner}, refiner.parameters(), steps,
                   s.lr["refiner"])
        used = torch.zeros(refiner.config.codebook_size, device=self.device)
        for step in run:
            rng = run.rng()
            idx = torch.from_numpy(rng.integers(latents.shape[0], size=s.batch["refiner"]))
            loss, err, vq, ids = self.refiner_loss(latents[idx.to(self.device)], rng, step >= switch,
                                                   frozen)
            if step == 0 and not frozen:  # rows start on real features
                self._restart_dead_codes(torch.zeros_like(used), latents, rng)
            run.backward(loss, error=err, vq=vq, fewstep=step >= switch)
            if frozen:
                continue
            self._normalize_codebook()
            regions = ids[:, :refiner.config.region_tokens].flatten()
            used.index_add_(0, regions, torch.ones(regions.numel(), device=self.device))
            if step % 25 == 24 and step < switch:
                self._restart_dead_codes(used, latents, rng)
                used.zero_()
        for m in (refiner.plan_tokenizer, refiner.plan_embed):
            m.requires_grad_(True)
        self._finish("refiner", ("refiner",))

    def _codebook_trained(self) -> bool:
        """A trained codebook lives on the features' sphere; a random one does not."""
        book = self.models["refiner"].plan_embed.weight
        return bool(torch.allclose(book.norm(dim=-1), torch.full_like(book[:, 0], book.shape[1] ** 0.5),
                                   rtol=1e-3))

    @torch.no_grad()
    def _normalize_codebook(self) -> None:
        """Codebook rows on the sphere the plan tokenizer's features live on."""
        book = self.models["refiner"].plan_embed.weight
        book.copy_(F.normalize(book, dim=-1) * math.sqrt(book.shape[1]))

    @torch.no_grad()
    def _restart_dead_codes(self, used, latents, rng) -> None:
        """Codebook rows no frame chose lately move onto features of random frames."""
        refiner = self.models["refiner"]
        dead = (used == 0).nonzero().flatten()
        if len(dead) == 0:
            return
        n = max(64, len(dead) // 4)
        idx = torch.from_numpy(rng.integers(latents.shape[0], size=n))
        frames = latents[idx.to(self.device), torch.from_numpy(rng.integers(latents.shape[1], size=n))]
        feats = refiner.plan_tokenizer.features(frames).flatten(0, 1)
        pick = torch.from_numpy(rng.integers(feats.shape[0], size=len(dead))).to(self.device)
        jitter = 0.05 * torch.randn(len(dead), feats.shape[1], device=self.device)
        refiner.plan_embed.weight[dead] = feats[pick] + jitter
        self._normalize_codebook()
        self.record({"stage": "refiner", "restarted_codes": len(dead)})

    # ---- stage 3: the VAE decoder on what it decodes at inference -----------------------
    def decoder_loss(self, frames: torch.Tensor, rng) -> torch.Tensor:
        """frames [B, 8, 3, H, W]: two latent frames, decoded as in streaming from the
        refiner's 3-step renderings of them (half the batches) or from encoder latents."""
        vae, refiner, f = self.models["vae"], self.models["refiner"], self.cfg.frames_per_latent
        b = frames.shape[0]
        gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**62)))
        with torch.no_grad():
            z = vae.encode(frames.reshape(-1, f, *frames.shape[2:]))
            z = z.view(b, 2, *z.shape[1:])
            if rng.random() < 0.5:
                ids = refiner.plan_tokenizer(z.flatten(0, 1), refiner.plan_embed.weight).view(b, 2, -1)
                noise = torch.randn(z.shape, generator=gen, device=self.device)
                first = refiner.render(noise[:, 0], ids[:, 0])
                second = refiner.render(noise[:, 1], ids[:, 1], anchor=first)
                z = torch.stack([first, second], dim=1)
        recon = torch.cat([vae.decoder(z[:, 0], torch.zeros_like(z[:, 0])),
                           vae.decoder(z[:, 1], z[:, 0])], dim=1)
        return (recon - frames).abs().mean() + F.mse_loss(recon, frames)

    def train_decoder(self) -> None:
        """The refiner's few steps give the conditional mean of a latent frame, smoother than
        the encoder's latents; the decoder learns to render those sharply (the encoder, and so
        the latents the refiner and AR were trained on, stay as they are)."""
        s = self.settings
        vae = self.models["vae"]
        self.models["refiner"].eval()
        vae.encoder.eval(), vae.decoder.train()
        run = _Run(self, "decoder", {"vae": vae}, vae.decoder.parameters(), s.steps["decoder"],
                   s.lr["decoder"])
        for _ in run:
            rng = run.rng()
            frames, _ = self._video_batch(rng, s.batch["decoder"], 2 * self.cfg.frames_per_latent)
            run.backward(self.decoder_loss(frames, rng))
        self._finish("decoder", ("vae",))

    @torch.no_grad()
    def plans(self) -> tuple[torch.Tensor, list[str]]:
        """Plan tokens [N, 12, n] of the bank's latent frames and their captions (the AR
        training data), cached in ``plans.pt`` beside the bank for as long as the plan
        tokenizer and codebook stay the same: the AR stages then need neither the bank's
        latents nor their tokenisation again."""
        refiner = self.models["refiner"].eval()
        tokenizer = [refiner.plan_embed.weight, *refiner.plan_tokenizer.parameters()]
        key = [round(float(t.double().sum()), 6) for t in tokenizer]
        path = self.state_dir / "plans.pt"
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            if cached["tokenizer"] == key:
                return cached["plans"].to(self.device), cached["captions"]
        latents, captions = self.bank()
        out = [refiner.plan_tokenizer(latents[i], refiner.plan_embed.weight)
               for i in range(latents.shape[0])]
        plans = torch.stack(out)
        torch.save({"plans": plans.cpu(), "captions": captions, "tokenizer": key}, path)
        self.record({"stage": "ar", "codebook_used": int(plans.unique().numel())})
        return plans, captions

    # ---- stage 4: text encoder + AR backbone -------------------------------------------
    def ar_batch(self, plans, captions, rng, batch: int):
        """Teacher-forcing batch of the two windows the pipeline's AR segments show: a video's
        start (begin-of-video, frames 0..7) or a continuation (begin-of-video, frames 4..11).
        -> (byte ids, byte lengths, token ids [B, T] after the prefix)."""
        cfg = self.cfg
        window, n = cfg.ar_context_frames, cfg.plan_tokens_per_frame
        keep = window - max(1, window // 2)
        idx = rng.integers(plans.shape[0], size=batch)
        starts = np.where(rng.random(batch) < 0.5, 0, window - keep)
        starts = np.minimum(starts, plans.shape[1] - window)
        bos = cfg.ar_backbone.bos_token_id
        toks = torch.stack([torch.cat([torch.tensor([bos], device=plans.device),
                                       plans[i, st:st + window].flatten()])
                            for i, st in zip(idx, starts)])
        p = self.settings.caption_dropout if isinstance(self.source, SyntheticClips) else 0.0
        byte_ids = [tokenize(drop_attribute_words(captions[i], rng, p) if p > 0 else captions[i],
                             cfg.text_encoder.max_prompt_bytes) for i in idx]
        return byte_ids, toks

    def _prefix(self, byte_ids, draft: bool = False):
        te = self.models["text_encoder"]
        lengths = torch.tensor([len(b) for b in byte_ids], device=self.device)
        ids = torch.zeros(len(byte_ids), int(lengths.max()), dtype=torch.long, device=self.device)
        for r, b in enumerate(byte_ids):
            ids[r, :len(b)] = torch.tensor(b)
        ar, dr = te(ids, lengths)
        return (dr if draft else ar), lengths

    def ar_logits(self, model, prefix, lengths, toks):
        """Logits over each row [prefix_i, toks] (right-padded); -> logits at the positions
        that predict toks[1:], [B, T-1, V]."""
        b, t = toks.shape
        lmax = int(lengths.max())
        total = lmax + t
        emb_tok = model.model.embed_tokens(toks)
        x = torch.stack([torch.cat([prefix[r, :li], emb_tok[r], prefix.new_zeros(lmax - li, prefix.shape[-1])])
                         for r, li in enumerate(lengths.tolist())])
        pos = torch.arange(total, device=self.device)[None].expand(b, -1)
        logits = model(x, pos, _CausalAttention())
        gather = lengths[:, None] + torch.arange(t - 1, device=self.device)[None]  # bos.. last-1
        return logits.gather(1, gather[..., None].expand(-1, -1, logits.shape[-1]))

    def train_ar(self) -> None:
        s = self.settings
        te, ar = self.models["text_encoder"].train(), self.models["ar_backbone"].train()
        plans, captions = self.plans()
        params = list(te.parameters()) + list(ar.parameters())
        run = _Run(self, "ar", {"text_encoder": te, "ar_backbone": ar}, params, s.steps["ar"],
                   s.lr["ar"])
        for _ in run:
            byte_ids, toks = self.ar_batch(plans, captions, run.rng(), s.batch["ar"])
            prefix, lengths = self._prefix(byte_ids)
            logits = self.ar_logits(ar, prefix, lengths, toks)
            target = toks[:, 1:]
            per_token = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            loss = (self.change_weights(target) * per_token.view(target.shape)).mean()
            run.backward(loss)
        self._finish("ar", ("text_encoder", "ar_backbone"))

    def change_weights(self, target: torch.Tensor) -> torch.Tensor:
        """[B, T] weights, mean 1, of the plan tokens after begin-of-video: a token that
        differs from the same slot of the previous frame counts ``change_weight`` times more.
        Motion lives in those few changes (a moving object's region token flips every
        latent frame or two, the other seven stay); unweighted, the AR learned "repeat the
        last frame" and made static videos (docs/training.md)."""
        n = self.cfg.plan_tokens_per_frame
        w = torch.ones(target.shape, device=target.device)
        w[:, n:] += (self.settings.change_weight - 1) * (target[:, n:] != target[:, :-n]).float()
        return w / w.mean()

    # ---- stage 5: the draft, distilled -------------------------------------------------
    def train_draft(self) -> None:
        s = self.settings
        te, ar, draft = (self.models[n] for n in ("text_encoder", "ar_backbone", "draft"))
        te.eval(), ar.eval(), draft.train()
        for p in list(te.parameters()) + list(ar.parameters()):
            p.requires_grad_(False)
        te.draft_proj.requires_grad_(True)
        plans, captions = self.plans()
        run = _Run(self, "draft", {"draft": draft, "draft_proj": te.draft_proj},
                   list(draft.parameters()) + list(te.draft_proj.parameters()), s.steps["draft"],
                   s.lr["draft"])
        k = self.cfg.ar_backbone.codebook_size
        for _ in run:
            byte_ids, toks = self.ar_batch(plans, captions, run.rng(), s.batch["draft"])
            with torch.no_grad():
                prefix, lengths = self._prefix(byte_ids)
                teacher = self.ar_logits(ar, prefix, lengths, toks)[..., :k]
            dprefix, _ = self._prefix(byte_ids, draft=True)
            student = self.ar_logits(draft, dprefix, lengths, toks)[..., :k]
            loss = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1),
                            log_target=True, reduction="batchmean") / toks.shape[1]
            run.backward(loss)
        for p in list(te.parameters()) + list(ar.parameters()):
            p.requires_grad_(True)
        self._finish("draft", ("draft", "text_encoder"))
