"""The AR phases: the text encoder with the AR backbone (next plan token after the caption's
prefix, ``ar``), then the draft distilled from the AR backbone (``draft``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data import drop_attribute_words
from ..schedule import segment_keep, sink_frames
from ..tokenizer import tokenize
from .run import PhaseRun
from .sources import SyntheticClips


class _CausalAttention:
    """The ``cache`` argument of ARBackbone.forward for training: causal attention over the
    whole (right-padded) sequence, grouped-query heads repeated."""

    def attend(self, layer_idx, q, k, v):
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                              v.repeat_interleave(g, 1), is_causal=True)


def ar_batch(t, plans, captions, rng, batch: int, switches=None, longs=None):
    """Teacher-forcing batch of the windows the pipeline's AR segments show: a video's start
    (begin-of-video, frames 0..7) or a continuation (begin-of-video, the sink frames 0..1,
    the newest kept frames 6..7, then 8..11); with ``longs`` (t.long_plans()), a share
    ``long_windows`` of the continuations cut the same way from long-session clips, whose
    newest frames lie 4 to 35 latent frames after the sink frames; with
    ``switches`` (t.switch_plans()), a share ``switch_windows`` of prompt switches: the
    frames before the switch (up to the newest half of a window) then those after it, under
    the caption after it, as a session's switch segment shows them.
    -> (byte ids, token ids [B, T] after the prefix)."""
    cfg = t.cfg
    window = cfg.ar_context_frames
    keep, sink = segment_keep(window), sink_frames(window)
    idx = rng.integers(plans.shape[0], size=batch)
    starts = np.where(rng.random(batch) < t.settings.ar_start, 0, window - keep)
    starts = np.minimum(starts, plans.shape[1] - window)
    bos = torch.tensor([cfg.ar_backbone.bos_token_id], device=plans.device)

    def cut(clip, st):  # a start, or a continuation: the sink frames, then from st on
        return clip[:window] if st == 0 else torch.cat([clip[:sink], clip[st + sink:st + window]])

    rows = [cut(plans[i], st) for i, st in zip(idx, starts)]
    texts = [captions[i] for i in idx]
    if longs is not None:
        l_plans, l_captions = longs
        for r in np.nonzero((starts > 0) & (rng.random(batch) < t.settings.long_windows))[0]:
            i = int(rng.integers(l_plans.shape[0]))
            rows[r], texts[r] = cut(l_plans[i], starts[r]), l_captions[i]
    if switches is not None:
        s_plans, s_captions, s_at = switches
        for r in np.nonzero(rng.random(batch) < t.settings.switch_windows)[0]:
            i = int(rng.integers(s_plans.shape[0]))
            st = max(0, s_at[i] - keep)  # the switch is at latent frame 1..6 of 12
            rows[r], texts[r] = s_plans[i, st:st + window], s_captions[i]
    toks = torch.stack([torch.cat([bos, frames.flatten()]) for frames in rows])
    p = t.settings.caption_dropout if isinstance(t.source, SyntheticClips) else 0.0
    byte_ids = [tokenize(drop_attribute_words(c, rng, p) if p > 0 else c,
                         cfg.text_encoder.max_prompt_bytes) for c in texts]
    return byte_ids, toks


def _window_banks(t):
    """The prompt-switch and long-session banks the settings ask windows of (each or None)."""
    s = t.settings
    return (t.switch_plans() if s.switch_windows > 0 and s.switch_clips > 0 else None,
            t.long_plans() if s.long_windows > 0 and s.long_clips > 0 else None)


def _prefix(t, byte_ids, draft: bool = False):
    te = t.models["text_encoder"]
    lengths = torch.tensor([len(b) for b in byte_ids], device=t.device)
    ids = torch.zeros(len(byte_ids), int(lengths.max()), dtype=torch.long, device=t.device)
    for r, b in enumerate(byte_ids):
        ids[r, :len(b)] = torch.tensor(b)
    ar, dr = te(ids, lengths)
    return (dr if draft else ar), lengths


def ar_logits(model, prefix, lengths, toks):
    """Logits over each row [prefix_i, toks] (right-padded); -> logits at the positions
    that predict toks[1:], [B, T-1, V]."""
    b, n = toks.shape
    lmax = int(lengths.max())
    total = lmax + n
    emb_tok = model.model.embed_tokens(toks)
    x = torch.stack([torch.cat([prefix[r, :li], emb_tok[r], prefix.new_zeros(lmax - li, prefix.shape[-1])])
                     for r, li in enumerate(lengths.tolist())])
    pos = torch.arange(total, device=toks.device)[None].expand(b, -1)
    logits = model(x, pos, _CausalAttention())
    gather = lengths[:, None] + torch.arange(n - 1, device=toks.device)[None]  # bos.. last-1
    return logits.gather(1, gather[..., None].expand(-1, -1, logits.shape[-1]))


def train_ar(t) -> None:
    s = t.settings
    te, ar = t.models["text_encoder"].train(), t.models["ar_backbone"].train()
    plans, captions = t.plans()
    switches, longs = _window_banks(t)
    params = list(te.parameters()) + list(ar.parameters())
    run = PhaseRun(t, "ar", {"text_encoder": te, "ar_backbone": ar}, params, s.steps["ar"],
                   s.lr["ar"])
    for _ in run:
        byte_ids, toks = ar_batch(t, plans, captions, run.rng(), s.batch["ar"], switches, longs)
        prefix, lengths = _prefix(t, byte_ids)
        logits = ar_logits(ar, prefix, lengths, toks)
        target = toks[:, 1:]
        per_token = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        loss = (change_weights(t, target) * per_token.view(target.shape)).mean()
        run.backward(loss)
    t.finish("ar", ("text_encoder", "ar_backbone"))


def change_weights(t, target: torch.Tensor) -> torch.Tensor:
    """[B, T] weights, mean 1, of the plan tokens after begin-of-video: a token that
    differs from the same slot of the previous frame counts ``change_weight`` times more.
    Motion lives in those few changes (a moving object's region token flips every
    latent frame or two, the other seven stay); unweighted, the AR learned "repeat the
    last frame" and made static videos (docs/training.md)."""
    n = t.cfg.plan_tokens_per_frame
    w = torch.ones(target.shape, device=target.device)
    w[:, n:] += (t.settings.change_weight - 1) * (target[:, n:] != target[:, :-n]).float()
    return w / w.mean()


def train_draft(t) -> None:
    s = t.settings
    te, ar, draft = (t.models[n] for n in ("text_encoder", "ar_backbone", "draft"))
    te.eval(), ar.eval(), draft.train()
    for p in list(te.parameters()) + list(ar.parameters()):
        p.requires_grad_(False)
    te.draft_proj.requires_grad_(True)
    plans, captions = t.plans()
    switches, longs = _window_banks(t)
    params = list(draft.parameters()) + list(te.draft_proj.parameters())
    run = PhaseRun(t, "draft", {"draft": draft, "draft_proj": te.draft_proj}, params,
                   s.steps["draft"], s.lr["draft"])
    k = t.cfg.ar_backbone.plan_vocab_size
    for _ in run:
        byte_ids, toks = ar_batch(t, plans, captions, run.rng(), s.batch["draft"], switches, longs)
        with torch.no_grad():
            prefix, lengths = _prefix(t, byte_ids)
            teacher = ar_logits(ar, prefix, lengths, toks)[..., :k]
        dprefix, _ = _prefix(t, byte_ids, draft=True)
        student = ar_logits(draft, dprefix, lengths, toks)[..., :k]
        loss = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1),
                        log_target=True, reduction="batchmean") / toks.shape[1]
        run.backward(loss)
    for p in list(te.parameters()) + list(ar.parameters()):
        p.requires_grad_(True)
    t.finish("draft", ("draft", "text_encoder"))
