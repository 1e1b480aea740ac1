"""The synthetic data is deterministic and the metrics are proven on it first: ground-truth
clips score as correct, clips paired with another clip's caption score as wrong."""

import numpy as np
import pytest

from helios.data import (COLORS, MOTIONS, SHAPES, ObjectSpec, is_held_out, render_clip,
                         render_long_session_clip, sample_spec)
from helios.metrics import dominant_object, drift, flicker


def test_clips_are_deterministic_and_captioned():
    spec = sample_spec(np.random.default_rng(0))
    a, b = render_clip(spec, 16, seed=3), render_clip(spec, 16, seed=3)
    assert a.shape == (16, 128, 128, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, render_clip(spec, 16, seed=4))
    assert spec.caption.startswith("a ") and spec.caption.endswith("background")
    assert len(COLORS) >= 6 and {"circle", "square", "triangle"} <= set(SHAPES)


def test_a_long_session_clip_is_the_video_start_then_its_later_frames():
    spec = sample_spec(np.random.default_rng(4))
    video = render_clip(spec, 80, 32, seed=3)
    clip = render_long_session_clip(spec, 48, 8, 20, 32, seed=3)
    assert np.array_equal(clip, np.concatenate([video[:8], video[28:68]]))
    assert not np.array_equal(clip, video[:48])


def test_held_out_combinations_never_appear_in_training():
    rng = np.random.default_rng(1)
    train = [o for _ in range(300) for o in sample_spec(rng).objects]
    assert not any(is_held_out(o) for o in train)
    held = [ObjectSpec(s, c, m) for s in SHAPES for c in COLORS for m in MOTIONS
            if is_held_out(ObjectSpec(s, c, m))]
    assert 0.05 < len(held) / (len(SHAPES) * len(COLORS) * len(MOTIONS)) < 0.3
    assert all(is_held_out(o) for o in sample_spec(np.random.default_rng(2), held_out=True).objects)


def _single_object_cases(n=60, seed=5, frames=24):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        spec = sample_spec(rng, max_objects=1)
        cases.append((spec, render_clip(spec, frames, seed=len(cases))))
    return cases


@pytest.mark.parametrize("frames", [24, 32])  # 32: helios eval's length, mid-bounce at the end
def test_metrics_score_ground_truth_as_correct(frames):
    cases = _single_object_cases(frames=frames)
    got = [dominant_object(frames) for _, frames in cases]
    truth = [spec.objects[0] for spec, _ in cases]
    color = np.mean([g["color"] == t.color for g, t in zip(got, truth)])
    shape = np.mean([g["shape"] == t.shape for g, t in zip(got, truth)])
    motion = np.mean([g["motion"] == t.motion for g, t in zip(got, truth)])
    assert color >= 0.98 and shape >= 0.9 and motion >= 0.9, (color, shape, motion)


def test_metrics_score_mismatched_captions_as_wrong():
    cases = _single_object_cases(seed=6)
    got = [dominant_object(frames) for _, frames in cases]
    shuffled = [spec.objects[0] for spec, _ in cases[1:] + cases[:1]]
    color = np.mean([g["color"] == t.color for g, t in zip(got, shuffled)])
    motion = np.mean([g["motion"] == t.motion for g, t in zip(got, shuffled)])
    assert color < 0.4 and motion < 0.4, (color, motion)


def test_flicker_and_drift():
    spec = sample_spec(np.random.default_rng(7), max_objects=1)
    clip = render_clip(spec, 48)
    noise = np.random.default_rng(0).integers(0, 256, clip.shape, dtype=np.uint8)
    assert flicker(clip) < 0.02 < flicker(noise)
    d = drift(np.concatenate([clip, clip]))
    assert d["color_shift"] < 0.01
    assert abs(d["sharpness_first"] - d["sharpness_last"]) < 1e-6


def test_held_out_prompts_asked_for_more_than_exist_returns_them_all():
    from helios.data import is_held_out
    from helios.evaluate import held_out_prompts

    every = held_out_prompts(1000)  # used to loop forever
    assert 0 < len(every) < 1000
    assert len({s.caption for s in every}) == len(every)
    assert all(is_held_out(o) for s in every for o in s.objects)
    assert [s.caption for s in held_out_prompts(24)] == [s.caption for s in every[:24]]


def test_caption_dropout_leaves_out_colour_and_shape_words_only():
    from helios.data import drop_attribute_words

    caption = "a red circle moving left and a blue square growing on a dark background"
    rng = np.random.default_rng(0)
    assert drop_attribute_words(caption, rng, 0.0) == caption
    assert drop_attribute_words(caption, rng, 1.0) == \
        "a shape moving left and a shape growing on a dark background"
    some = [drop_attribute_words(caption, np.random.default_rng(s), 0.5) for s in range(20)]
    assert len(set(some)) > 3 and all("moving left" in c and "growing" in c for c in some)
    assert some == [drop_attribute_words(caption, np.random.default_rng(s), 0.5) for s in range(20)]


def test_true_plans_replay_the_tokens_they_are_given(pipe):
    """helios eval --true-plans swaps the AR for given plan tokens. Replaying the tokens the
    AR decoded (across two AR segments) gives the AR's frames exactly."""
    from helios.evaluate import _TruePlans
    from helios.orchestrator import stream_video
    from helios.schedule import validate_request

    cfg = pipe.config
    req = validate_request(cfg, "a red circle moving left on a dark background",
                           num_frames=(cfg.ar_context_frames + 2) * cfg.frames_per_latent, seed=3)
    decoded = []

    class Recording:
        def __getattr__(self, name):
            return getattr(pipe, name)

        def ar_stream(self, *args):
            for tokens in pipe.ar_stream(*args):
                decoded.extend(tokens)
                yield tokens

    want = np.concatenate([c.frames for c in stream_video(cfg, req, Recording())])
    got = np.concatenate([c.frames for c in stream_video(cfg, req, _TruePlans(pipe, list(decoded)))])
    assert len(decoded) == (cfg.ar_context_frames + 2) * cfg.plan_tokens_per_frame
    assert np.array_equal(got, want)


@pytest.mark.parametrize("start", [12, 30, 60])
def test_motion_is_read_from_any_start_of_a_clip(start):
    """A window that starts mid-clip: a growing object has restarted small in it, a moving one
    has crossed an edge and come back at the other, a bouncing one is mid-bounce. Each is
    still read as what it does (the windows after a prompt switch or a continuation start
    there)."""
    cases = _single_object_cases(n=40, seed=8, frames=start + 32)
    got = [dominant_object(frames[start:]) for _, frames in cases]
    truth = [spec.objects[0].motion for spec, _ in cases]
    assert np.mean([g["motion"] == t for g, t in zip(got, truth)]) >= 0.95, \
        [(g["motion"], t) for g, t in zip(got, truth) if g["motion"] != t]
