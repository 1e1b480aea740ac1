"""``helios eval``: how well a checkpoint follows its prompts, measured on pixels.

- adherence: videos of held-out prompts (shape, colour, motion combinations training never
  saw); the dominant object's colour, shape and motion direction (helios.metrics) against
  the prompt's;
- flicker: mean absolute change between consecutive frames;
- drift: colour and sharpness of the first vs the last second of a long video, and whether
  an object is still there at the end;
- speculative decoding: the draft tokens the AR backbone accepted while generating.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from .data import ClipSpec, sample_spec
from .metrics import dominant_object, drift, flicker, frame_changes


def held_out_prompts(n: int, seed: int = 0) -> list[ClipSpec]:
    """``n`` distinct single-object clip descriptions made only of held-out combinations."""
    rng = np.random.default_rng([seed, 7])
    specs, seen = [], set()
    for _ in range(50 * n + 1000):  # bounded: there may be fewer combinations than asked for
        if len(specs) == n:
            break
        spec = sample_spec(rng, held_out=True, max_objects=1)
        if spec.caption not in seen:
            seen.add(spec.caption)
            specs.append(spec)
    return specs


def adherence(pipe, specs: list[ClipSpec], num_frames: int = 32, seed: int = 0,
              progress: bool = False) -> dict:
    """Colour / shape / motion accuracy over ``specs`` (one video each), flicker, acceptance."""
    from tqdm import tqdm  # noqa: PLC0415

    stats0 = dict(pipe.ar.stats)
    rows = []
    for i, spec in enumerate(tqdm(specs, desc="adherence", unit="video", disable=not progress)):
        video = pipe.generate_video(spec.caption, num_frames=num_frames, seed=seed + i)
        got, want = dominant_object(video), spec.objects[0]
        rows.append({"prompt": spec.caption, "color": got["color"], "shape": got["shape"],
                     "motion": got["motion"], "color_ok": got["color"] == want.color,
                     "shape_ok": got["shape"] == want.shape,
                     "motion_ok": got["motion"] == want.motion, "flicker": flicker(video)})
    by_motion = _by_motion(specs, [r["motion_ok"] for r in rows])
    drafted = pipe.ar.stats["draft_tokens"] - stats0["draft_tokens"]
    accepted = pipe.ar.stats["accepted_tokens"] - stats0["accepted_tokens"]
    return {"prompts": len(rows),
            "color_adherence": float(np.mean([r["color_ok"] for r in rows])),
            "shape_adherence": float(np.mean([r["shape_ok"] for r in rows])),
            "motion_adherence": float(np.mean([r["motion_ok"] for r in rows])),
            "flicker": float(np.mean([r["flicker"] for r in rows])),
            "speculative_acceptance": accepted / drafted if drafted else float("nan"),
            "draft_tokens": drafted, "motion_by_prompt": by_motion, "videos": rows}


def _by_motion(specs: list[ClipSpec], ok: list[bool]) -> dict:
    """Motion accuracy per motion the prompts ask for."""
    out = {}
    for spec, good in zip(specs, ok):
        n, k = out.get(spec.objects[0].motion, (0, 0))
        out[spec.objects[0].motion] = (n + 1, k + good)
    return {m: k / n for m, (n, k) in sorted(out.items())}


class _TruePlans:
    """A pipeline's stages with the AR backbone replaced by given plan tokens, handed out in
    order whatever segment asks for them."""

    def __init__(self, pipe, tokens: list[int]):
        self.pipe, self.tokens, self.cursor = pipe, tokens, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def ar_stream(self, prefix, draft_prefix, tokens, n, params, bias, speculative):
        yield self.tokens[self.cursor:self.cursor + n]
        self.cursor += n


def true_plan_tokens(pipe, clip: np.ndarray) -> list[int]:
    """The plan tokens of a uint8 [T, H, W, 3] clip (T a multiple of the frames per latent):
    the VAE's latent frames read by the refiner's plan tokenizer."""
    import torch  # noqa: PLC0415

    from .vae import from_uint8  # noqa: PLC0415

    f = pipe.config.frames_per_latent
    with torch.no_grad():
        frames = from_uint8(torch.from_numpy(clip)[None])[0]
        latents = pipe.vae.encode(frames.view(-1, f, *frames.shape[1:]).to(pipe.device, pipe.dtype))
        tokens = pipe.refiner.plan_tokenizer(latents, pipe.refiner.plan_embed.weight)
    return tokens.flatten().tolist()


def true_plan_adherence(pipe, specs: list[ClipSpec], num_frames: int = 32, seed: int = 0,
                        progress: bool = False) -> dict:
    """What the refiner and VAE make of a perfect plan. Each prompt's ground-truth clip is
    rendered, and its plan tokens replace the AR's. The video comes out of the same
    schedule, seeds and refiner history as ``adherence``. This bounds what a better AR
    backbone could reach; the gap to ``adherence`` is the AR's."""
    from tqdm import tqdm  # noqa: PLC0415

    from .data import render_clip  # noqa: PLC0415
    from .orchestrator import stream_video  # noqa: PLC0415
    from .schedule import validate_request  # noqa: PLC0415

    cfg = pipe.config
    truth_ok, color_ok, motion_ok = [], [], []
    for i, spec in enumerate(tqdm(specs, desc="true plans", unit="video", disable=not progress)):
        clip = render_clip(spec, num_frames, size=cfg.height, seed=seed + i)
        want = spec.objects[0]
        truth_ok.append(dominant_object(clip)["motion"] == want.motion)
        req = validate_request(cfg, spec.caption, num_frames=num_frames, seed=seed + i)
        stages = _TruePlans(pipe, true_plan_tokens(pipe, clip))
        got = dominant_object(np.concatenate([c.frames for c in stream_video(cfg, req, stages)]))
        color_ok.append(got["color"] == want.color)
        motion_ok.append(got["motion"] == want.motion)
    return {"prompts": len(specs),
            "ground_truth_motion_adherence": float(np.mean(truth_ok)),
            "color_adherence": float(np.mean(color_ok)),
            "motion_adherence": float(np.mean(motion_ok)),
            "motion_by_prompt": _by_motion(specs, motion_ok)}


def held_out_switches(n: int, seed: int = 0) -> list[tuple[ClipSpec, ClipSpec]]:
    """``n`` (before, after) pairs of distinct held-out prompts: colour, shape, motion and
    background change as the two prompts happen to differ."""
    specs = held_out_prompts(2 * n, seed)
    return [(specs[i], specs[i + len(specs) // 2]) for i in range(len(specs) // 2)]


def switch_adherence(pipe, pairs: list[tuple[ClipSpec, ClipSpec]], num_frames: int = 120,
                     switch_s: float = 2.0, seed: int = 0, progress: bool = False) -> dict:
    """Prompt switches in a running video (helios.session): each pair's first prompt, then its
    second from ``switch_s`` on. Scored on the frames from 0.5 s after the switch against the
    second prompt (colour, shape, motion as ``adherence`` scores them); the frames before the
    switch against the same video without it (identical?); and the largest frame-to-frame
    change from just before the switch to 1 s after it (the configuration's fade and the
    frames after it) over the video's median change, apart for pairs that keep their
    background and pairs that change it, beside the same for the video without the switch
    over the same frames (what the model's own motion gives there)."""
    from tqdm import tqdm  # noqa: PLC0415

    fps = pipe.config.fps
    at = round(switch_s * fps)

    def jump(frames):
        change = frame_changes(frames)
        return float(change[at - 2:at + fps].max() / max(np.median(change), 1e-6))

    rows = []
    for i, (a, b) in enumerate(tqdm(pairs, desc="switches", unit="video", disable=not progress)):
        video = np.concatenate([c.frames for c in pipe.generate(
            a.caption, num_frames=num_frames, seed=seed + i, prompt_at=[(switch_s, b.caption)])])
        plain = np.concatenate([c.frames for c in pipe.generate(  # the same without the switch
            a.caption, num_frames=num_frames, seed=seed + i)])
        got, want = dominant_object(video[at + fps // 2:]), b.objects[0]
        rows.append({"before": a.caption, "after": b.caption, "color": got["color"],
                     "motion": got["motion"], "color_ok": got["color"] == want.color,
                     "shape_ok": got["shape"] == want.shape,
                     "motion_ok": got["motion"] == want.motion,
                     "same_background": a.background == b.background,
                     "identical_before": bool(np.array_equal(plain[:at], video[:at])),
                     "jump": jump(video), "jump_without_switch": jump(plain)})
    same = [r["jump"] for r in rows if r["same_background"]]
    unswitched = [r["jump_without_switch"] for r in rows if r["same_background"]]
    other = [r["jump"] for r in rows if not r["same_background"]]
    return {"pairs": len(rows), "switch_s": switch_s,
            "color_adherence": float(np.mean([r["color_ok"] for r in rows])),
            "shape_adherence": float(np.mean([r["shape_ok"] for r in rows])),
            "motion_adherence": float(np.mean([r["motion_ok"] for r in rows])),
            "identical_before": float(np.mean([r["identical_before"] for r in rows])),
            "jump_same_background_median": float(np.median(same)) if same else float("nan"),
            "jump_same_background_max": float(np.max(same)) if same else float("nan"),
            "jump_without_switch_median": float(np.median(unswitched)) if same else float("nan"),
            "jump_without_switch_max": float(np.max(unswitched)) if same else float("nan"),
            "jump_new_background_median": float(np.median(other)) if other else float("nan"),
            "videos": rows}


def continuation_adherence(pipe, specs: list[ClipSpec], clip_frames: int = 32,
                           num_frames: int = 48, seed: int = 0, progress: bool = False) -> dict:
    """Video-to-video: each held-out prompt's ground-truth clip (``clip_frames``) continued
    under its own caption for ``num_frames``. Scored: the continuation's object colour and
    motion against the clip's (as ``adherence`` reads them), and its first frame's change
    from the clip's last over the clip's own median frame-to-frame change: as sent (the
    continuation dissolves in from the clip's last frame over ``switch_fade_s``), and the
    model's own first frame before that dissolve; beside them, the same for the VAE's
    reconstruction of the clip's last frame (what no model's frame can undercut) and the
    model's first frame's change over that reconstruction's."""
    from tqdm import tqdm  # noqa: PLC0415

    from .data import render_clip  # noqa: PLC0415
    from .schedule import validate_request  # noqa: PLC0415

    rows = []
    for i, spec in enumerate(tqdm(specs, desc="continuations", unit="video", disable=not progress)):
        clip = render_clip(spec, clip_frames, size=pipe.config.height, seed=seed + i)
        video = pipe.generate_video(spec.caption, num_frames=num_frames, seed=seed + i, video=clip)
        want, got = dominant_object(clip), dominant_object(video)
        clip_change = np.median(frame_changes(clip))
        seam = np.abs(video[0].astype(np.int16) - clip[-1]).mean()
        # The floor: the VAE's own reconstruction of the clip's last frame, as far from it
        # as the model's first frame could be expected to come.
        latents, _ = pipe.encode_video(clip)
        decoded = pipe.decode(latents[-1], latents[-2] if len(latents) > 1 else None)
        floor = np.abs(decoded[-1].astype(np.int16) - clip[-1]).mean()
        # The model's own first frame: the first latent frame of the same request, decoded
        # after the clip's last (the generator stops after it).
        req = validate_request(pipe.config, spec.caption, num_frames=num_frames, seed=seed + i,
                               video=clip)
        first = pipe.latents(req)
        own = pipe.decode(next(first), latents[-1])[0]
        first.close()
        own_seam = np.abs(own.astype(np.int16) - clip[-1]).mean()
        rows.append({"prompt": spec.caption, "clip": want, "continuation": got,
                     "color_ok": got["color"] == want["color"],
                     "motion_ok": got["motion"] == want["motion"],
                     "seam": float(seam / max(clip_change, 1e-6)),
                     "seam_model": float(own_seam / max(clip_change, 1e-6)),
                     "seam_over_reconstruction": float(own_seam / max(floor, 1e-6)),
                     "reconstruction": float(floor / max(clip_change, 1e-6))})
    return {"clips": len(rows), "clip_frames": clip_frames, "frames": num_frames,
            "color_kept": float(np.mean([r["color_ok"] for r in rows])),
            "motion_kept": float(np.mean([r["motion_ok"] for r in rows])),
            "seam_median": float(np.median([r["seam"] for r in rows])),
            "seam_within_2x": float(np.mean([r["seam"] <= 2 for r in rows])),
            "seam_model_median": float(np.median([r["seam_model"] for r in rows])),
            "reconstruction_median": float(np.median([r["reconstruction"] for r in rows])),
            "seam_over_reconstruction_median": float(np.median(
                [r["seam_over_reconstruction"] for r in rows])),
            "videos": rows}


def long_video_drift(pipe, prompt: str, seconds: float, seed: int = 0,
                     progress: bool = False, color: str | None = None) -> dict:
    """Drift statistics of one long video, read a second at a time (only the first and the
    last second's frames are kept): colour and sharpness of the first vs the last second;
    with ``color``, the share of its seconds whose dominant object has that colour; and
    whether the session stays flat: the time each second took to generate and the process's
    resident memory, first minute against last."""
    from tqdm import tqdm  # noqa: PLC0415

    fps = pipe.config.fps
    first, last, second = [], [], []
    colored, times, rss = [], [], []
    bar = tqdm(total=round(seconds * fps), desc="long video", unit="frame", disable=not progress)
    t0 = time.perf_counter()
    for chunk in pipe.generate(prompt, duration_s=seconds, seed=seed):
        if sum(len(f) for f in first) < fps:
            first.append(chunk.frames)
        last = (last + [chunk.frames])[-(fps // len(chunk.frames) + 1):]
        second.append(chunk.frames)
        if sum(len(f) for f in second) >= fps:  # a whole second: read it, then drop it
            frames = np.concatenate(second)
            second = [frames[fps:]] if len(frames) > fps else []
            if color is not None:
                colored.append(dominant_object(frames[:fps])["color"] == color)
            now = time.perf_counter()
            times.append(now - t0)
            t0 = now
            rss.append(_resident_mib())
        bar.update(len(chunk.frames))
    bar.close()
    a, b = np.concatenate(first)[:fps], np.concatenate(last)[-fps:]
    out = drift(np.concatenate([a, b]), chunk=fps)
    minute = min(60, max(1, len(times) // 2))
    out.update(seconds=seconds, prompt=prompt,
               object_first=dominant_object(a)["color"], object_last=dominant_object(b)["color"],
               flicker_first=flicker(a), flicker_last=flicker(b),
               seconds_with_color=float(np.mean(colored)) if colored else float("nan"),
               second_s_first_minute=float(np.median(times[:minute])),
               second_s_last_minute=float(np.median(times[-minute:])),
               resident_mib_first=rss[0], resident_mib_last=rss[-1])
    return out


def _resident_mib() -> float:
    """This process's resident memory (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def evaluate(pipe, prompts: int = 24, num_frames: int = 32, long_seconds: float = 60.0,
             seed: int = 0, progress: bool = False, true_plans: bool = False,
             switches: int = 0, continuations: int = 0) -> dict:
    specs = held_out_prompts(prompts, seed)
    result = {"adherence": adherence(pipe, specs, num_frames, seed, progress)}
    if switches > 0:
        result["switches"] = switch_adherence(pipe, held_out_switches(switches, seed),
                                              seed=seed, progress=progress)
    if continuations > 0:
        result["continuations"] = continuation_adherence(
            pipe, held_out_prompts(continuations, seed + 1), seed=seed, progress=progress)
    if true_plans:
        result["true_plans"] = true_plan_adherence(pipe, specs, num_frames, seed, progress)
    if long_seconds > 0:
        result["drift"] = long_video_drift(pipe, specs[0].caption, long_seconds, seed, progress,
                                           color=specs[0].objects[0].color)
    return result


def table(result: dict) -> str:
    a = result["adherence"]
    acc = a["speculative_acceptance"]
    lines = ["| metric | value |", "|---|---|",
             f"| held-out prompts | {a['prompts']} |",
             f"| colour adherence | {a['color_adherence']:.1%} |",
             f"| shape adherence | {a['shape_adherence']:.1%} |",
             f"| motion adherence | {a['motion_adherence']:.1%} |",
             f"| flicker (mean abs frame change) | {a['flicker']:.4f} |",
             f"| speculative acceptance | {'n/a' if math.isnan(acc) else f'{acc:.2f}'} "
             f"({a['draft_tokens']} draft tokens) |",
             "| motion adherence by prompt motion | "
             + ", ".join(f"{m} {v:.0%}" for m, v in a["motion_by_prompt"].items()) + " |"]
    if "true_plans" in result:
        t = result["true_plans"]
        lines += [f"| ground-truth clips: motion adherence | {t['ground_truth_motion_adherence']:.1%} |",
                  f"| true plan tokens (no AR): colour / motion adherence | "
                  f"{t['color_adherence']:.1%} / {t['motion_adherence']:.1%} |",
                  "| true plan tokens: motion by prompt motion | "
                  + ", ".join(f"{m} {v:.0%}" for m, v in t["motion_by_prompt"].items()) + " |"]
    if "switches" in result:
        w = result["switches"]
        lines += [f"| prompt switches at {w['switch_s']:g} s ({w['pairs']} held-out pairs): colour / "
                  f"shape / motion from 0.5 s after | {w['color_adherence']:.1%} / "
                  f"{w['shape_adherence']:.1%} / {w['motion_adherence']:.1%} |",
                  f"| switches: frames before identical to the video without | "
                  f"{w['identical_before']:.0%} |",
                  f"| switches: largest frame change from the switch to 1 s after / median "
                  f"change, same background (median, max) | "
                  f"{w['jump_same_background_median']:.1f}, {w['jump_same_background_max']:.1f} |",
                  f"| switches: the same, new background (median) | "
                  f"{w['jump_new_background_median']:.1f} |",
                  f"| switches: the same frames of the videos without the switch, same "
                  f"background (median, max) | {w['jump_without_switch_median']:.1f}, "
                  f"{w['jump_without_switch_max']:.1f} |"]
    if "continuations" in result:
        c = result["continuations"]
        lines += [f"| continuations of {c['clips']} held-out clips ({c['clip_frames']} frames): colour "
                  f"/ motion kept | {c['color_kept']:.1%} / {c['motion_kept']:.1%} |",
                  f"| continuations: first frame's change from the clip's last / the clip's "
                  f"median change, as sent (median; share within 2x) | {c['seam_median']:.2f}; "
                  f"{c['seam_within_2x']:.0%} |",
                  f"| continuations: the same for the model's first frame, before the dissolve; "
                  f"for the VAE's reconstruction of the clip's last frame; the model's over the "
                  f"reconstruction's (medians) | {c['seam_model_median']:.2f}; "
                  f"{c['reconstruction_median']:.2f}; {c['seam_over_reconstruction_median']:.2f} |"]
    if "drift" in result:
        d = result["drift"]
        lines += [f"| drift over {d['seconds']:g} s: colour shift first vs last second | "
                  f"{d['color_shift']:.4f} |",
                  f"| sharpness first / last second | {d['sharpness_first']:.1f} / "
                  f"{d['sharpness_last']:.1f} |",
                  f"| dominant object first / last second | {d['object_first']} / "
                  f"{d['object_last']} |",
                  f"| seconds whose object has the prompt's colour | "
                  f"{d['seconds_with_color']:.1%} |",
                  f"| seconds to generate a second of video, first / last minute (median) | "
                  f"{d['second_s_first_minute']:.2f} / {d['second_s_last_minute']:.2f} |",
                  f"| resident memory after the first / last second | "
                  f"{d['resident_mib_first']:.0f} / {d['resident_mib_last']:.0f} MiB |"]
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=float) + "\n")
