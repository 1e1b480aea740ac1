"""Every bad input gives one line naming the field and the allowed range: the library raises
HeliosError with it, the CLI prints it and exits 2 without a traceback."""

import subprocess
import sys

import numpy as np
import pytest

from helios.cli import main
from helios.errors import HeliosError
from helios.schedule import validate_request

CASES = [
    # (library kwargs, CLI args, message)
    (dict(prompt=""), ["--prompt", ""],
     "prompt must be 1 to 256 UTF-8 bytes of text, got an empty prompt"),
    (dict(prompt="é" * 200), ["--prompt", "é" * 200],
     "prompt must be 1 to 256 UTF-8 bytes of text, got 400 bytes"),
    (dict(duration_s=0.0), ["--duration", "0"], "duration must be in (0, 600] seconds, got 0.0"),
    (dict(duration_s=-1.0), ["--duration", "-1"], "duration must be in (0, 600] seconds, got -1.0"),
    (dict(duration_s=601.0), ["--duration", "601"],
     "duration must be in (0, 600] seconds, got 601.0"),
    (dict(temperature=-0.1), ["--temperature", "-0.1"],
     "temperature must be a finite number >= 0, got -0.1"),
    (dict(temperature=float("nan")), ["--temperature", "nan"],
     "temperature must be a finite number >= 0, got nan"),
    (dict(top_p=0.0), ["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), ["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (dict(top_k=-1), ["--top-k", "-1"], "top_k must be an integer >= 0 (0 disables it), got -1"),
    (dict(fps=0), ["--fps", "0"], "fps must be an integer in [1, 60], got 0"),
    (dict(seed=-1), ["--seed", "-1"], "seed must be an integer in [0, 2**63-1], got -1"),
    (dict(seed=2**64), ["--seed", str(2**64)],
     "seed must be an integer in [0, 2**63-1], got 18446744073709551616"),
    # Checked even where num_frames decides the length.
    (dict(duration_s=float("nan"), num_frames=8), ["--duration", "nan"],
     "duration must be in (0, 600] seconds, got nan"),
]


@pytest.mark.parametrize("kwargs,argv,message", CASES, ids=[c[2][:30] for c in CASES])
def test_bad_input_library_and_cli(kwargs, argv, message, tiny_checkpoint, tmp_path, capsys,
                                   tiny_config):
    call = dict(prompt="a red circle", duration_s=1.0)
    call.update(kwargs)
    prompt = call.pop("prompt")
    with pytest.raises(HeliosError) as e:
        validate_request(tiny_config, prompt, **call)
    assert str(e.value) == message

    base = ["generate", "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "o.mp4"),
            "--no-progress"]
    if "--prompt" not in argv:
        base += ["--prompt", "a red circle"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert err == f"helios: error: {message}\n"
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("output,message", [
    ("-", "output must be a file name ending in .mp4, .mkv, .mov, got '-'"),
    ("a.txt", "output must be a file name ending in .mp4, .mkv, .mov, got 'a.txt'"),
    ("/nonexistent/dir/a.mp4", "output must be in an existing folder, '/nonexistent/dir' is not one"),
])
def test_bad_output_is_named_before_any_work(tiny_checkpoint, capsys, output, message):
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a red circle",
                 "--output", output, "--no-progress"]) == 2
    assert capsys.readouterr().err == f"helios: error: {message}\n"


def test_unreadable_image(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    base = ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--no-progress",
            "--output", str(tmp_path / "o.mp4")]
    assert main(base + ["--image", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"helios: error: image must be a readable image file, cannot decode '{bad}'")
    assert main(base + ["--image", str(tmp_path / "missing.png")]) == 2
    assert capsys.readouterr().err == (f"helios: error: image must be a readable image file, "
                                       f"'{tmp_path / 'missing.png'}' does not exist\n")


def test_bad_image_array(tiny_config):
    with pytest.raises(HeliosError, match=r"^image must be a uint8 RGB array of shape \[H, W, 3\] "
                                          r"with H, W >= 8, got float32 \[4, 4\]$"):
        validate_request(tiny_config, "x", num_frames=4, image=np.zeros((4, 4), np.float32))


def test_missing_and_mismatched_checkpoint(tiny_checkpoint, tmp_path, capsys):
    assert main(["generate", "--prompt", "x", "--checkpoint", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == (f"helios: error: checkpoint must be a checkpoint folder, "
                                       f"'{tmp_path / 'none'}' does not exist\n")
    assert main(["generate", "--prompt", "x", "--checkpoint", str(tiny_checkpoint),
                 "--config", "14b"]) == 2
    assert capsys.readouterr().err == ("helios: error: config must match the checkpoint's "
                                       "configuration 'tiny', got '14b'\n")
    assert main(["info", "--config", "huge"]) == 2
    assert capsys.readouterr().err == ("helios: error: config must be one of ['14b', '14b-384p', 'tiny'], "
                                       "got 'huge'\n")


def test_cli_process_prints_one_line_without_traceback(tiny_checkpoint):
    r = subprocess.run([sys.executable, "-m", "helios", "generate", "--prompt", "x",
                        "--checkpoint", str(tiny_checkpoint), "--top-p", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == "helios: error: top_p must be in (0, 1], got 2.0\n"
    r = subprocess.run([sys.executable, "-m", "helios", "generate", "--prompt", "x",
                        "--duration", "soon"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == \
        "helios generate: error: argument --duration: duration must be a number, got 'soon'"
    assert "Traceback" not in r.stderr
