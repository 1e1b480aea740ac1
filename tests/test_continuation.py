"""Video-to-video: a clip's last frames start the video, which continues it. The input's
checks through every interface, the same frames in-process and through Triton, and the
continuation against its clip."""

import subprocess
import sys

import numpy as np
import pytest

from helios.data import ClipSpec, ObjectSpec, render_clip
from helios.errors import HeliosError
from helios.pipeline import HeliosPipeline
from helios.schedule import validate_request
from helios_client.api import HeliosClient, RequestError

PROMPT = "a red circle moving left on a dark background"


def _clip(n=32, size=128, seed=0):
    spec = ClipSpec((ObjectSpec("circle", "red", "left"),), "dark")
    return render_clip(spec, n, size=size, seed=seed)


@pytest.mark.parametrize("video,message", [
    (np.zeros((3, 16, 16, 3), np.uint8), "[4, 120]"),
    (np.zeros((121, 16, 16, 3), np.uint8), "[4, 120]"),
    (np.zeros((8, 7, 16, 3), np.uint8), "[8, 2048]"),
    (np.zeros((8, 16, 2049, 3), np.uint8), "[8, 2048]"),
    (np.zeros((8, 16, 16, 3), np.float32), "float32"),
    (np.zeros((16, 16, 3), np.uint8), "[16, 16, 3]"),
])
def test_a_bad_clip_is_refused_naming_video(tiny_config, video, message):
    with pytest.raises(HeliosError) as e:
        validate_request(tiny_config, PROMPT, num_frames=8, video=video)
    assert str(e.value).startswith("video must be uint8 RGB frames [T, H, W, 3] with T in "
                                   "[4, 120] and H, W in [8, 2048], got ")
    assert message in str(e.value)


def test_a_clip_and_an_image_together_are_refused(tiny_config):
    with pytest.raises(HeliosError, match="^video cannot be given with image"):
        validate_request(tiny_config, PROMPT, num_frames=8, video=_clip(8),
                         image=np.zeros((16, 16, 3), np.uint8))


def test_a_continuation_is_its_own_video_and_depends_on_the_clip(pipe):
    clip = _clip()
    a = pipe.generate_video(PROMPT, num_frames=24, seed=1, video=clip)
    b = pipe.generate_video(PROMPT, num_frames=24, seed=1, video=clip)
    other = pipe.generate_video(PROMPT, num_frames=24, seed=1, video=_clip(seed=5))
    plain = pipe.generate_video(PROMPT, num_frames=24, seed=1)
    assert a.shape == (24, 128, 128, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, other) and not np.array_equal(a, plain)


def test_a_clip_of_another_size_is_cropped_at_its_centre_then_resized(pipe):
    """A 256x192 (wide) clip is cropped to its centre 192x192, then resized: the same video
    as from that centre given alone."""
    wide = np.zeros((16, 192, 256, 3), np.uint8)
    wide[:, :, 32:224] = np.repeat(np.repeat(_clip(16, size=96), 2, axis=1), 2, axis=2)
    wide[:, :, :32] = 255  # outside the centre: must not matter
    centre = wide[:, :, 32:224].copy()
    assert np.array_equal(pipe.generate_video(PROMPT, num_frames=8, seed=0, video=wide),
                          pipe.generate_video(PROMPT, num_frames=8, seed=0, video=centre))


@pytest.mark.parametrize("size,target", [((100, 90), (128, 128)), ((64, 200), (128, 128)),
                                         ((37, 53), (72, 128)), ((128, 128), (720, 1280))])
def test_the_fitted_last_frame_is_the_fitted_clips_within_one(size, target):
    """The frame a continuation dissolves from is fitted in numpy (the helios model over the
    stage models has no torch), as the clip itself is fitted by torch for the encoder: the
    same centre crop, the same bilinear taps, each value within 1 after rounding."""
    import torch  # noqa: PLC0415

    from helios.orchestrator import fitted_frame
    from helios.vae import fit_frames

    frame = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    ours = fitted_frame(frame, *target)
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    theirs = fit_frames(x, *target)[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    diff = np.abs(ours.astype(int) - theirs.numpy().astype(int))
    assert ours.shape == (*target, 3) and ours.dtype == np.uint8
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert fitted_frame(ours, *target) is ours  # the size already: as it is


def test_a_continuation_dissolves_in_from_the_clips_last_frame(pipe):
    """The continuation's first frames blend the clip's last frame into the model's own, the
    model's weight growing a step a frame (switch_fade_s, 12 frames at 24 fps); from the end
    of the fade on they are the model's frames (the model never sees the blend)."""
    import dataclasses

    shipped, clip = pipe.config, _clip()
    videos = {}
    try:
        for name, seconds in (("fade", 0.5), ("cut", 0.0)):
            pipe.config = dataclasses.replace(shipped, switch_fade_s=seconds)
            videos[name] = pipe.generate_video(PROMPT, num_frames=24, seed=1, video=clip)
    finally:
        pipe.config = shipped
    faded, plain, base = videos["fade"].astype(int), videos["cut"].astype(int), clip[-1].astype(int)
    assert np.array_equal(faded[12:], plain[12:])
    for k in range(1, 13):
        assert np.array_equal(faded[k - 1], (base * (13 - k) + plain[k - 1] * k) // 13), k
    assert np.abs(faded[0] - base).mean() < np.abs(plain[0] - base).mean() / 4


def test_the_trained_model_continues_a_held_out_clip():
    """The shipped checkpoint on held-out clips: what `helios eval --continuations` scores."""
    from helios.evaluate import continuation_adherence, held_out_prompts

    pipe = HeliosPipeline.from_checkpoint("weights/helios-tiny")
    result = continuation_adherence(pipe, held_out_prompts(6, 1))
    assert result["clips"] == 6
    assert result["color_kept"] >= 0.9
    # The model's first frame comes on from the clip's last as closely as the VAE can render
    # it, and the dissolve from the clip's last frame brings the first frame sent within
    # twice the clip's own median frame change.
    assert result["seam_over_reconstruction_median"] <= 2
    assert result["seam_median"] <= 2


def test_the_same_continuation_in_process_and_through_triton(server, pipe):
    clip = _clip(20)
    client = HeliosClient(f"127.0.0.1:{server.grpc}")
    got = np.concatenate([c.frames for c in client.stream(PROMPT, num_frames=16, seed=4,
                                                          video=clip)])
    assert np.array_equal(got, pipe.generate_video(PROMPT, num_frames=16, seed=4, video=clip))
    with pytest.raises(RequestError) as e:
        client.generate(PROMPT, num_frames=4, video=clip[:3])
    assert str(e.value).startswith("VIDEO must be uint8 RGB frames [T, H, W, 3] with T in "
                                   "[4, 120]") and e.value.invalid_argument


def _write(path, frames):
    from helios.video import Mp4Writer

    with Mp4Writer(path, 24, frames.shape[2], frames.shape[1]) as w:
        w.write(frames)


@pytest.mark.parametrize("cli", ["helios", "helios-client"])
def test_both_clis_continue_a_clip_and_refuse_bad_ones(cli, server, tiny_checkpoint, tmp_path):
    good, short, text = tmp_path / "clip.mp4", tmp_path / "short.mp4", tmp_path / "notes.mp4"
    _write(good, _clip(16))
    _write(short, _clip(3))
    text.write_text("not a video")
    base = ([sys.executable, "-m", "helios.cli", "generate", "--checkpoint", str(tiny_checkpoint)]
            if cli == "helios" else [sys.executable, "-m", "helios_client.cli", "generate", "--url",
                                     f"127.0.0.1:{server.grpc}"])
    out = tmp_path / "out.mp4"
    run = subprocess.run(base + ["--prompt", PROMPT, "--duration", "1", "--video", str(good),
                                 "--output", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "wrote 24 frames" in run.stdout
    for path, message in ((text, "video must be a readable video file, cannot decode"),
                          (tmp_path / "none.mp4", "does not exist"),
                          (short, "3")):
        bad = subprocess.run(base + ["--prompt", PROMPT, "--duration", "1", "--video",
                                     str(path), "--output", str(out)],
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr, bad.stderr
