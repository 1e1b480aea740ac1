"""The CLI writes a decodable H.264 mp4 with the right frames, size and fps."""

import numpy as np

from helios.cli import main
from helios.video import read_video


def test_cli_writes_decodable_mp4(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "video.mp4"
    rc = main(["generate", "--prompt", "a green triangle bouncing", "--duration", "1.5",
               "--fps", "12", "--checkpoint", str(tiny_checkpoint), "--output", str(out),
               "--seed", "4"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "generating" in captured.err  # the progress bar
    assert f"wrote 18 frames (128x128, 12 fps) to {out}" in captured.out
    frames, fps = read_video(out)
    assert frames.shape == (18, 128, 128, 3)
    assert fps == 12
    assert frames.std() > 10  # real content, not a blank stream


def test_cli_mp4_matches_pipeline_frames(tiny_checkpoint, pipe, tmp_path):
    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "a red circle", "--duration", "0.5", "--seed", "9",
                 "--checkpoint", str(tiny_checkpoint), "--output", str(out), "--no-progress"]) == 0
    decoded, _ = read_video(out)
    expected = pipe.generate_video("a red circle", duration_s=0.5, seed=9)
    assert decoded.shape == expected.shape
    # H.264 at crf 18 is lossy; noise video is its worst case, so compare the mean error.
    assert np.abs(decoded.astype(float) - expected.astype(float)).mean() < 20


def test_image_to_video_cli(tiny_checkpoint, tmp_path):
    import av

    img = tmp_path / "first.png"
    with av.open(str(img), "w") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = 64, 48, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 200, np.uint8), format="rgb24")
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    out = tmp_path / "i2v.mp4"
    assert main(["generate", "--prompt", "x", "--duration", "0.5", "--image", str(img),
                 "--checkpoint", str(tiny_checkpoint), "--output", str(out), "--no-progress"]) == 0
    assert read_video(out)[0].shape == (12, 128, 128, 3)


def test_info_14b(capsys):
    assert main(["info", "--config", "14b"]) == 0
    out = capsys.readouterr().out
    assert "ar_backbone" in out and "refiner" in out
    assert "total" in out and "13.988 B" in out
