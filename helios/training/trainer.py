"""A training run: the checkpoint it writes, its phases in order, resumption, and the data
every phase shares (clips, the latent bank, the bank's plan tokens).

Each phase writes its component folders into the output checkpoint as it finishes, so the
folder is a loadable checkpoint all along. Training state (weights, optimiser, step) is saved
under ``<out>/train_state`` every ``save_every`` steps; running the same command again resumes.
Every random draw comes from (seed, phase, step), so a resumed run draws what an
uninterrupted one would have drawn.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import (COMPONENTS, init_checkpoint, load_component, read_config,
                          save_component, write_index)
from ..config import get_config
from ..errors import HeliosError
from ..schedule import sink_frames
from ..vae import from_uint8
from . import ar as ar_phases, refiner as refiner_phase, vae as vae_phases
from .settings import CLIP_LATENTS, PHASES, TrainSettings
from .sources import (FolderClips, SyntheticClips, synthetic_bank_clip, synthetic_long_clip,
                      synthetic_switch_clip)

# The function that trains each phase, and the component each phase leaves in eval mode.
PHASE_RUNNERS = {"vae": vae_phases.train_vae, "refiner": refiner_phase.train_refiner,
                 "decoder": vae_phases.train_decoder, "ar": ar_phases.train_ar,
                 "draft": ar_phases.train_draft}
_OUTPUT = {"vae": "vae", "refiner": "refiner", "decoder": "vae", "ar": "ar_backbone", "draft": "draft"}


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

    def finish(self, phase: str, names: tuple) -> None:
        """Write the components a phase trained into the checkpoint and mark it done."""
        for n in names:
            save_component(self.models[n], self.cfg, n, self.out)
        done = self._done() | {phase}
        (self.state_dir / "done.json").write_text(json.dumps(sorted(done)) + "\n")
        self.log(f"{phase}: done, wrote {', '.join(names)}")

    def run(self, phases=PHASES) -> dict:
        for s in phases:
            if s not in PHASES:
                raise HeliosError("phases", f"must be among {list(PHASES)}, got {s!r}")
        for s in PHASES:
            if s in phases and s not in self._done():
                PHASE_RUNNERS[s](self)
                self.models[_OUTPUT[s]].eval()
        return {s: v for s, v in self.losses.items()}

    def video_batch(self, rng, batch: int, num_frames: int):
        clips, captions = zip(*(self.source.sample(rng, num_frames) for _ in range(batch)))
        return from_uint8(torch.from_numpy(np.stack(clips))).to(self.device), list(captions)

    @torch.no_grad()
    def bank(self) -> tuple[torch.Tensor, list[str]]:
        """Latent frames [N, 12, C, h, w] of N clips and their captions (cached on disk)."""
        path = self.state_dir / "bank.pt"
        if path.is_file():
            b = torch.load(path, weights_only=True)
            return b["latents"].to(self.device), b["captions"]
        f, n = self.cfg.frames_per_latent, self.settings.bank_clips
        if isinstance(self.source, SyntheticClips):
            # Clip i draws from (seed, 99, i) alone, so the bank is the same whatever the
            # number of processes rendering it (numpy rendering is the slow part).
            jobs = [(self.cfg.height, self.seed, i, CLIP_LATENTS * f) for i in range(n)]
            latents, rows = self._encode(synthetic_bank_clip, jobs, "latent bank")
        else:
            rng = np.random.default_rng([self.seed, 99])
            latents, rows = self._encode(None, (self.source.sample(rng, CLIP_LATENTS * f)
                                                for _ in range(n)), "latent bank", n)
        captions = [r[0] for r in rows]
        torch.save({"latents": latents, "captions": captions}, path)
        self.log(f"latent bank: {len(captions)} clips, latent std {latents.std():.3f}")
        return latents.to(self.device), captions

    def _encode(self, worker, jobs, desc: str, n: int | None = None):
        """VAE latents [N, 12, C, h, w] of the clips that ``worker(job)`` renders (in worker
        processes) or, without a worker, of the (clip, ...) tuples ``jobs`` yields; -> the
        latents and each clip's other fields."""
        vae, f = self.models["vae"].eval(), self.cfg.frames_per_latent
        pool = None
        if worker is not None:
            jobs = list(jobs)
            n = len(jobs)
            pool = ProcessPoolExecutor(min(os.cpu_count() or 1, 16))
            jobs = pool.map(worker, jobs, chunksize=8)
        latents, rows = [], []
        try:
            for clip, *rest in tqdm(jobs, total=n, desc=desc, unit="clip",
                                    disable=not self.progress, dynamic_ncols=True):
                frames = from_uint8(torch.from_numpy(clip)[None]).to(self.device)
                latents.append(vae.encode(frames.view(CLIP_LATENTS, f, *frames.shape[2:])).cpu())
                rows.append(rest)
        finally:  # an interrupted bank stops its workers too
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        return torch.stack(latents), rows

    @torch.no_grad()
    def _plan_bank(self, name: str, worker, jobs: list, desc: str):
        """Plan tokens [N, 12, n] of the synthetic clips ``worker`` renders from ``jobs``, and
        each clip's other fields (cached in ``name``.pt)."""
        path = self.state_dir / f"{name}.pt"
        if path.is_file():
            b = torch.load(path, weights_only=True)
            return b["plans"].to(self.device), b["rows"]
        latents, rows = self._encode(worker, jobs, desc)
        refiner = self.models["refiner"].eval()
        plans = torch.stack([refiner.plan_tokenizer(z.to(self.device), refiner.plan_embed.weight)
                             for z in latents])
        rows = [list(r) for r in rows]
        torch.save({"plans": plans.cpu(), "rows": rows}, path)
        self.log(f"{desc}: {len(rows)} clips")
        return plans, rows

    def switch_plans(self) -> tuple[torch.Tensor, list[str], list[int]]:
        """Plan tokens [N, 12, n] of ``switch_clips`` prompt-switch clips, the captions after
        their switches and the latent frames of the switches."""
        f = self.cfg.frames_per_latent
        jobs = [(self.cfg.height, self.seed, i, CLIP_LATENTS * f, f)
                for i in range(self.settings.switch_clips)]
        plans, rows = self._plan_bank("switch_plans", synthetic_switch_clip, jobs, "switch bank")
        return plans, [r[0] for r in rows], [r[1] for r in rows]

    def long_plans(self) -> tuple[torch.Tensor, list[str]]:
        """Plan tokens [N, 12, n] of ``long_clips`` long-session clips and their captions."""
        f = self.cfg.frames_per_latent
        jobs = [(self.cfg.height, self.seed, i, CLIP_LATENTS * f, f,
                 sink_frames(self.cfg.ar_context_frames)) for i in range(self.settings.long_clips)]
        plans, rows = self._plan_bank("long_plans", synthetic_long_clip, jobs, "long-session bank")
        return plans, [r[0] for r in rows]

    @torch.no_grad()
    def plans(self) -> tuple[torch.Tensor, list[str]]:
        """Plan tokens [N, 12, n] of the bank's latent frames and their captions (the AR
        training data), cached in ``plans.pt`` beside the bank for as long as the plan
        tokenizer and codebook stay the same: the AR phases then need neither the bank's
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
        self.record({"phase": "ar", "codebook_used": int(plans.unique().numel())})
        return plans, captions
