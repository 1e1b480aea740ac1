"""The streaming pipeline: determinism, streaming, bounded memory, image-to-video."""

import threading
import time

import numpy as np
import pytest
import torch

from helios.schedule import ar_segments, validate_request
from helios.vae import to_uint8

PROMPT = "a red circle moving left on a dark background"


def test_same_seed_same_frames_other_seed_different(pipe):
    a = pipe.generate_video(PROMPT, num_frames=12, seed=7)
    b = pipe.generate_video(PROMPT, num_frames=12, seed=7)
    c = pipe.generate_video(PROMPT, num_frames=12, seed=8)
    assert a.shape == (12, 128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    d = pipe.generate_video("a blue square moving up", num_frames=12, seed=7)
    assert not np.array_equal(a, d)


def test_streamed_chunks_equal_one_shot_run(pipe):
    req = validate_request(pipe.config, PROMPT, num_frames=18, seed=3)
    chunks = list(pipe.run(req))
    assert [c.offset for c in chunks] == [0, 4, 8, 12, 16]
    assert [len(c.frames) for c in chunks] == [4, 4, 4, 4, 2]
    assert chunks[-1].final and not chunks[-2].final
    # One shot: all latent frames first, then one batched decode of the whole video.
    z = torch.cat(list(pipe.latents(req)))
    prev = torch.cat([torch.zeros_like(z[:1]), z[:-1]])
    with torch.no_grad():
        video = to_uint8(pipe.vae.decode(z, prev)).reshape(-1, 128, 128, 3).numpy()[:18]
    streamed = np.concatenate([c.frames for c in chunks])
    # Batched vs per-frame convolutions may differ in the last float bit: allow one level.
    assert np.abs(streamed.astype(int) - video.astype(int)).max() <= 1
    assert (streamed == video).mean() > 0.999


def test_speculative_and_plain_are_both_deterministic(pipe):
    a = pipe.generate_video(PROMPT, num_frames=8, seed=1, speculative=False)
    b = pipe.generate_video(PROMPT, num_frames=8, seed=1, speculative=False)
    c = pipe.generate_video(PROMPT, num_frames=8, seed=1, temperature=0.0, speculative=True)
    d = pipe.generate_video(PROMPT, num_frames=8, seed=1, temperature=0.0, speculative=False)
    assert np.array_equal(a, b)
    assert np.array_equal(c, d)  # greedy: speculative decoding changes nothing


def test_long_video_keeps_memory_bounded(pipe):
    """A video 3x longer than the AR window uses no more KV blocks than one window."""
    cfg = pipe.config
    n_latent = 3 * cfg.ar_context_frames
    req = validate_request(cfg, PROMPT, num_frames=n_latent * 4, seed=0)
    free0 = pipe.ar.cache.num_free_blocks
    bound = -(-(cfg.max_ar_positions() + cfg.num_draft_tokens + 1) // cfg.kv_block_size)
    peak, count = 0, 0
    for _ in pipe.latents(req):
        count += 1
        peak = max(peak, free0 - pipe.ar.cache.num_free_blocks)
        assert len(pipe.ar.seqs) <= 1  # none between two segments
        for seq in pipe.ar.seqs:
            frames = (len(pipe.ar.tokens(seq)) - 1) / cfg.plan_tokens_per_frame
            assert frames <= cfg.ar_context_frames
    assert count == n_latent
    assert 0 < peak <= bound
    assert pipe.ar.cache.num_free_blocks == free0


def test_ar_segments_bound_the_window(tiny_config):
    segs = ar_segments(tiny_config, 20)
    assert [(s.first_frame, s.kept, s.sink, s.new) for s in segs] == \
        [(0, 0, 0, 8), (8, 4, 2, 4), (12, 4, 2, 4), (16, 4, 2, 4)]
    # Image-to-video: the given first frame starts the first segment's context.
    segs = ar_segments(tiny_config, 10, given=1)
    assert [(s.first_frame, s.kept, s.sink, s.new) for s in segs] == [(1, 1, 0, 7), (8, 4, 2, 2)]


class _ReplayAR:
    """Stages whose AR 'generates' a given clip's plan tokens and records each context."""

    def __init__(self, clip):
        self.clip, self.contexts, self.made = clip, [], 0

    def ar_stream(self, prefix, draft_prefix, context, n, params, bias, speculative):
        self.contexts.append(list(context))
        tokens = self.clip.flatten()[self.made:self.made + n].tolist()
        self.made += n
        yield tokens


@pytest.mark.parametrize("given", [0, 1, 5])
def test_segments_keep_the_generation_start_as_training_shows_it(tiny_config, given):
    """Each later segment's context is the generation's first frames (the sink) then the
    newest: a cyan circle drifted to magenta over a minute without it. The AR is trained on
    exactly the windows these segments show (helios.training.ar.ar_batch)."""
    from types import SimpleNamespace

    from helios.orchestrator import plan_stream
    from helios.training.ar import ar_batch

    cfg, n = tiny_config, tiny_config.plan_tokens_per_frame
    bos = cfg.ar_backbone.bos_token_id
    clip = torch.arange(20 * n).reshape(20, n) % cfg.refiner.codebook_size
    stages = _ReplayAR(clip[given:])
    req = validate_request(cfg, PROMPT, num_frames=(20 - given) * cfg.frames_per_latent)
    plans = [list(map(int, p)) for p in clip[:given]]
    kept = min(given, 4)
    out = list(plan_stream(cfg, req, stages, None, None, plans, given, kept, num_latent=20))
    assert torch.equal(torch.tensor(out), clip[given:])
    origin = given - kept
    sink = [origin, origin + 1]
    expected = [list(range(origin, given)), sink + [origin + 6, origin + 7],
                sink + [origin + 10, origin + 11], sink + [origin + 14, origin + 15]]
    expected = [[f for f in frames if f < 20] for frames in expected]
    assert stages.contexts == [[bos] + clip[frames].flatten().tolist() for frames in expected][
        :len(stages.contexts)]
    assert len(stages.contexts) == len(ar_segments(cfg, 20, given, kept))
    if given == 0:  # a video's second segment is the training's continuation window
        t = SimpleNamespace(cfg=cfg, source=None, settings=SimpleNamespace(
            ar_start=0.0, caption_dropout=0.0, switch_windows=0.0))
        _, toks = ar_batch(t, clip[None, :12], [PROMPT], np.random.default_rng(0), 1)
        assert toks[0].tolist() == stages.contexts[1] + clip[8:12].flatten().tolist()
        # The third segment, whose newest frames lie 8 after the sink, is a long-session
        # window: a clip of the first 2 frames, then the video from frame 6 on.
        t.settings.long_windows = 1.0
        long = torch.cat([clip[:2], clip[6:16]])[None]
        _, toks = ar_batch(t, clip[None, :12], ["another prompt"], np.random.default_rng(0), 1,
                           longs=(long, [PROMPT]))
        assert toks[0].tolist() == stages.contexts[2] + clip[12:16].flatten().tolist()


def test_cancelled_stream_returns_its_blocks(pipe):
    free0 = pipe.ar.cache.num_free_blocks
    stream = pipe.generate(PROMPT, num_frames=40, seed=0)
    next(stream)
    assert pipe.ar.cache.num_free_blocks < free0
    stream.close()  # the consumer goes away
    assert pipe.ar.cache.num_free_blocks == free0
    assert not pipe.ar.seqs


def test_image_to_video_starts_from_the_image(pipe):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)  # any size: resized
    video = pipe.generate_video(PROMPT, num_frames=8, seed=0, image=image)
    with torch.no_grad():
        z0, _ = pipe.encode_image(image)
        expected = to_uint8(pipe.vae.decode(z0))[0].numpy()
    assert np.array_equal(video[:4], expected)
    other = pipe.generate_video(PROMPT, num_frames=8, seed=0, image=255 - image)
    assert not np.array_equal(video[:4], other[:4])


def _same_models(pipe, **options):
    """Another pipeline over ``pipe``'s models, with ``options``."""
    from helios.pipeline import HeliosPipeline
    return HeliosPipeline(pipe.config, pipe.text_encoder, pipe.ar_backbone, pipe.draft,
                          pipe.refiner, pipe.vae, **options)


def test_prefetched_plans_give_the_same_video(pipe):
    """The AR running ahead in a thread (prefetch_plans=True) changes no frame, across AR
    segments (44 latent frames: four segments) and for image-to-video."""
    fast = _same_models(pipe, prefetch_plans=True)
    assert fast.prefetch_plans and not pipe.prefetch_plans
    n = 4 * (2 * pipe.config.ar_context_frames + 3)
    assert np.array_equal(fast.generate_video(PROMPT, num_frames=n, seed=5),
                          pipe.generate_video(PROMPT, num_frames=n, seed=5))
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(fast.generate_video(PROMPT, num_frames=40, seed=2, image=image),
                          pipe.generate_video(PROMPT, num_frames=40, seed=2, image=image))


def _counted(n: int, produced: list, closed: list):
    """0 .. n-1, each appended to ``produced`` as it is made; ``closed`` gets True when the
    generator is closed or runs out: a plan source whose progress a test can watch."""
    try:
        for i in range(n):
            produced.append(i)
            yield i
    finally:
        closed.append(True)


def _until_made(produced: list, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(produced) < n:
        assert time.monotonic() < deadline, f"{len(produced)} of {n} made"
        time.sleep(0.01)


def test_the_prefetcher_decodes_ahead_once_the_second_plan_is_asked_for():
    """The AR's thread hands over the first plan, then waits until the consumer asks for the
    second before decoding ahead (so that the first render runs alone), then runs up to its
    depth ahead; closed while it waits, it stops and closes its source."""
    from helios.pipeline import _Prefetch

    produced, closed = [], []
    source = lambda: _counted(10, produced, closed)  # noqa: E731

    ahead = _Prefetch(source(), None, depth=3)
    assert next(ahead) == 0
    time.sleep(0.3)
    assert produced == [0]                # held after the first plan
    assert next(ahead) == 1
    _until_made(produced, 6)              # then 3 queued, and a fourth waiting to be
    time.sleep(0.3)
    assert produced == list(range(6))
    assert list(ahead) == list(range(2, 10)) and closed == [True]
    ahead.close()

    produced.clear(), closed.clear()
    held = _Prefetch(source(), None, depth=3)
    assert next(held) == 0
    held.close()
    assert produced == [0] and closed == [True] and not held.thread.is_alive()


def test_closing_the_prefetcher_stops_a_thread_waiting_for_room_at_once(monkeypatch):
    """A thread that ran ahead and waits for room in its queue (where it spends most of a
    stream, and where a prompt switch finds it) stops when the consumer closes it, without
    waiting for its next look at the stop flag; it decodes nothing more and closes its
    source. The look is made an hour apart here, so only the room close() makes can end it."""
    import helios.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_PUT_POLL_S", 3600.0)
    produced, closed = [], []
    ahead = pipeline._Prefetch(_counted(10, produced, closed), None, depth=1)
    assert [next(ahead), next(ahead)] == [0, 1]
    _until_made(produced, 4)              # 2 queued, 3 made and waiting for room
    time.sleep(0.2)
    closer = threading.Thread(target=ahead.close, daemon=True)
    closer.start()
    closer.join(timeout=20)
    assert not closer.is_alive() and not ahead.thread.is_alive()
    assert produced == [0, 1, 2, 3] and closed == [True]
    with pytest.raises(StopIteration):
        next(ahead)


def test_overlapped_decodes_give_the_same_videos(pipe, monkeypatch):
    """overlap_decode (a latent frame decoded, the next one's render queued behind it, then
    the frames awaited) changes no frame: across AR segments, for image-to-video, for a
    continued clip and across a prompt switch; and it is what runs the loop."""
    over = _same_models(pipe, overlap_decode=True)
    assert pipe.refine_and_decode is None and over.refine_and_decode is not None
    calls = []
    real = over._refine_and_decode
    monkeypatch.setattr(over, "_refine_and_decode", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    clip = rng.integers(0, 256, (16, 96, 80, 3), dtype=np.uint8)
    n = 4 * (2 * pipe.config.ar_context_frames + 3)
    for kwargs in ({"num_frames": n, "seed": 5}, {"num_frames": 40, "seed": 2, "image": image},
                   {"num_frames": 24, "seed": 1, "video": clip},
                   {"num_frames": 48, "seed": 3, "prompt_at": [(0.5, "a blue square")]}):
        before = len(calls)
        assert np.array_equal(over.generate_video(PROMPT, **kwargs),
                              pipe.generate_video(PROMPT, **kwargs)), kwargs
        # Every latent frame but the first (and the first under a new prompt) and the last.
        assert len(calls) - before >= kwargs["num_frames"] // 4 - 3, kwargs


def test_prefetching_stream_closed_early_stops_its_thread_and_frees_blocks(pipe):
    fast = _same_models(pipe, prefetch_plans=True)
    free0 = fast.ar.cache.num_free_blocks
    stream = fast.generate(PROMPT, num_frames=80, seed=0)
    next(stream)
    stream.close()
    assert fast.ar.cache.num_free_blocks == free0 and not fast.ar.seqs
    assert not [t for t in threading.enumerate() if t.name == "helios-ar-prefetch"]


def test_prefetching_ar_error_reaches_the_consumer(pipe, monkeypatch):
    fast = _same_models(pipe, prefetch_plans=True)

    def broken(*args, **kwargs):
        raise RuntimeError("KV cache full")
    monkeypatch.setattr(fast.ar, "decode_round", broken)
    stream = fast.generate(PROMPT, num_frames=8, seed=0)
    with pytest.raises(RuntimeError, match="^KV cache full$"):
        next(stream)
    assert not fast.ar.seqs


class _DecodeBesideRefine:
    """A pipeline's stages with ``refine_and_decode`` (as the Triton helios model has it),
    recording the order of the calls."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def refine(self, plan, index, *rest):
        self.calls.append(("refine", index))
        return self.pipe.refine(plan, index, *rest)

    def refine_and_decode(self, refine, decode):
        self.calls.append(("both", refine[1]))
        return self.pipe.refine(*refine), self.pipe.decode(*decode)


def test_decoding_beside_the_next_rendering_gives_the_same_chunks(pipe):
    """stream_video with refine_and_decode: each latent frame after the first is decoded
    while the next one renders, and every chunk equals the sequential one, for text- and
    image-to-video, to the last (trimmed) chunk."""
    from helios.orchestrator import stream_video

    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for kwargs in ({}, {"image": image}):
        req = validate_request(pipe.config, PROMPT, num_frames=22, seed=4, **kwargs)
        stages = _DecodeBesideRefine(pipe)
        both = list(stream_video(pipe.config, req, stages))
        plain = list(pipe.run(req))
        assert [(c.offset, c.final) for c in both] == [(c.offset, c.final) for c in plain]
        assert all(np.array_equal(a.frames, b.frames) for a, b in zip(both, plain))
        first = 1 if kwargs else 0  # the image is latent frame 0
        assert stages.calls == [("refine", first), ("refine", first + 1)] + \
            [("both", i) for i in range(first + 2, 6)]
