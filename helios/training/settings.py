"""What a training run does: its phases, their steps, batches and learning rates, and every
weighting of the losses, each a named setting with the reason it is there (docs/training.md
has the measurements behind them). Importing this module does not import torch."""

from __future__ import annotations

from dataclasses import dataclass, field

# The phases of a run, in the order they train; each trains on what the earlier ones made.
PHASES = ("vae", "refiner", "decoder", "ar", "draft")
# Fine-tuning on a folder of videos takes fewer steps than training from scratch.
FINETUNE_STEPS = {"vae": 200, "refiner": 300, "decoder": 100, "ar": 300, "draft": 100}
CLIP_LATENTS = 12          # latent frames per clip in the latent bank (48 video frames)


@dataclass
class TrainSettings:
    steps: dict = field(default_factory=lambda: {"vae": 1200, "refiner": 2400, "decoder": 500,
                                                 "ar": 2000, "draft": 500})
    batch: dict = field(default_factory=lambda: {"vae": 8, "refiner": 48, "decoder": 8, "ar": 32,
                                                 "draft": 32})
    lr: dict = field(default_factory=lambda: {"vae": 1e-3, "refiner": 5e-4, "decoder": 5e-4,
                                              "ar": 1e-3, "draft": 1e-3})
    bank_clips: int = 1200           # clips encoded into the latent bank
    fewstep_fraction: float = 0.3    # last part of the refiner phase: the unrolled sampler
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
    # Noise (in units of the latent's unit std) on the true anchor and history frames the
    # refiner sees: at inference they are its own renderings, never exact.
    context_noise: float = 0.05
    # VQ commitment weight (the plan tokenizer's features pulled to their codebook rows), as in
    # VQ-VAE.
    commitment: float = 0.25
    # Codebook rows that no frame chose for this many refiner steps move onto the features of
    # random frames (dead-code restart); not in the few-step part, where codes must stay put.
    dead_code_period: int = 25
    # Share of decoder-phase batches decoded from the refiner's renderings rather than from
    # encoder latents.
    decoder_rendered: float = 0.5
    # Share of AR windows that are a video's start (the rest are continuations, which keep the
    # video's first frames and the newest, as helios.schedule.ar_segments does): a video's
    # first AR segment is a start, every later one a continuation.
    ar_start: float = 0.5
    # Share of AR windows taken from prompt-switch clips (sources.synthetic_switch_clip): the
    # context holds the frames before the switch, the caption is the one after it, as a
    # session's switch segment shows them (helios.session); trained without, the AR copied
    # the context's colour and ignored the new prompt (docs/sessions.md).
    switch_windows: float = 0.0
    switch_clips: int = 0            # clips encoded into the switch bank (0: none)
    # Share of continuation windows taken from long-session clips (sources.synthetic_long_clip):
    # the video's first frames and its newest up to 35 latent frames apart, as the later
    # segments of a long video or of the time after a prompt switch show them; the bank's
    # clips only show them 4 apart.
    long_windows: float = 0.0
    long_clips: int = 0              # clips encoded into the long-session bank (0: none)
    change_weight: float = 5.0       # AR loss on plan tokens that change from the last frame
    # AR captions of synthetic clips lose each colour / shape word with this probability
    # (data.drop_attribute_words): motion words then have to work alone (docs/training.md).
    caption_dropout: float = 0.25
    save_every: int = 100
