"""Training of every stage from scratch on synthetic captioned clips, and fine-tuning of a
checkpoint on a folder of videos, in phases that each train on what the earlier ones made:

    vae       encoder + decoder on windows of 8 frames (two latent frames; the second
              decodes with the first as its previous latent, as in streaming); then the
              latent is rescaled to unit standard deviation inside the weights  (vae.py)
    refiner   the plan tokenizer (its codebook is the refiner's plan-token embedding) with
              the refiner it conditions: flow matching on latent frames with the anchor and
              history the pipeline gives it, then the few-step schedule (the 3-step Euler
              sampler unrolled and trained end to end on the clean frame)   (refiner.py)
    decoder   the VAE decoder again, on the refiner's 3-step renderings (and encoder
              latents)                                                        (vae.py)
    ar        the text encoder with the AR backbone: next plan token after the text prefix,
              on the two kinds of window the pipeline's AR segments show      (ar.py)
    draft     the draft model (and the text encoder's draft projection) distilled from the
              AR backbone's next-token distribution                           (ar.py)

``trainer.Trainer`` runs them (checkpoint, resumption, the latent bank); ``settings`` holds
every number a run uses; ``sources`` the clips; ``run.PhaseRun`` one phase's loop. This
module and ``settings`` import no torch.
"""

from .settings import FINETUNE_STEPS, PHASES, TrainSettings

__all__ = ["FINETUNE_STEPS", "PHASES", "TrainSettings"]
