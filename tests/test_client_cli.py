"""helios-client's arguments: every bad one is one line naming it and exit code 2, before any
server is asked; an error leaves no partial mp4 under the requested name."""

import pytest

from conftest import free_ports
from helios_client.cli import main


def _run(tmp_path, *extra):
    (port,) = free_ports(1)  # nothing listens there: a good argument set gets exit code 3
    return main(["generate", "--url", f"127.0.0.1:{port}", "--prompt", "a red circle",
                 "--no-progress", *extra])


@pytest.mark.parametrize("argv,message", [
    (["--seed", "99999999999999999999"],
     "argument --seed: seed must be an integer in [0, 9223372036854775807], got 99999999999999999999"),
    (["--seed", "-1"], "argument --seed: seed must be an integer in [0, 9223372036854775807], got -1"),
    (["--seed", "x"], "argument --seed: seed must be an integer, got 'x'"),
    (["--num-frames", "0"], "argument --num-frames: num_frames must be an integer in [1, 2147483647], got 0"),
    (["--top-k", "4294967296"],
     "argument --top-k: top_k must be an integer in [0, 2147483647], got 4294967296"),
    (["--output", "-"], "output must be a file name ending in .mp4, .mkv, .mov, got '-'"),
    (["--output", "a.txt"], "output must be a file name ending in .mp4, .mkv, .mov, got 'a.txt'"),
    (["--output", "/nonexistent/dir/a.mp4"],
     "output must be in an existing folder, '/nonexistent/dir' is not one"),
    (["--timeout", "0"], "argument --timeout: timeout must be a number of seconds > 0, got 0"),
    (["--timeout", "nan"], "argument --timeout: timeout must be a number of seconds > 0, got nan"),
    (["--timeout", "x"], "argument --timeout: timeout must be a number, got 'x'"),
])
def test_a_bad_argument_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert _run(tmp_path, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(message), err


def test_a_bad_image_is_one_line_and_exit_2(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert _run(tmp_path, "--image", str(text), "--output", str(tmp_path / "a.mp4")) == 2
    assert capsys.readouterr().err == (f"helios-client: error: image must be a readable image "
                                       f"file, cannot decode {str(text)!r}: InvalidDataError\n")
    assert _run(tmp_path, "--image", str(tmp_path / "none.png"),
                "--output", str(tmp_path / "a.mp4")) == 2
    assert "image must be a readable image file" in capsys.readouterr().err


def test_a_failed_request_leaves_no_file_under_the_output_name(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert _run(tmp_path, "--output", str(out)) == 3  # no server
    assert list(tmp_path.iterdir()) == []
