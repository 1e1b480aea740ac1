"""The client installs without torch or the helios package, so it keeps its own copies of two
things the package defines: the mp4 writer and the names of the helios model's inputs. These
tests pin each copy to the package's, so that neither can change alone."""

import re

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from conftest import INSTANCES, ROOT
from helios.checkpoint import read_config
from helios.video import Mp4Writer, read_video
from helios_client import api
from helios_client.cli import Mp4Writer as ClientMp4Writer
from helios_triton.contract import HELIOS_INPUT_NAMES
from helios_triton.fill_repository import fill, values


def _frames() -> np.ndarray:
    """12 frames of a red square moving right over a blue-green gradient."""
    y, x = np.mgrid[0:64, 0:96]
    base = np.stack([0 * x, 2 * x, 3 * y], -1).astype(np.uint8)
    frames = np.repeat(base[None], 12, axis=0)
    for t in range(12):
        frames[t, 20:36, 4 * t:4 * t + 16] = (220, 30, 30)
    return frames


def test_the_client_writes_the_mp4_the_package_writes(tmp_path):
    frames = _frames()
    with Mp4Writer(tmp_path / "package.mp4", 24, 96, 64) as writer:
        writer.write(frames[:5])
        writer.write(frames[5:])
    client = ClientMp4Writer(str(tmp_path / "client.mp4"), 24)
    client.write(frames[:5])
    client.write(frames[5:])
    client.close()
    (a, fps_a), (b, fps_b) = read_video(tmp_path / "package.mp4"), read_video(tmp_path / "client.mp4")
    assert a.shape == b.shape == frames.shape and fps_a == fps_b == 24
    # The same encoder settings (x264 writes them into the stream), less its thread counts.
    # Two encodings with them are not always bit-identical (seen in full test runs: a few
    # pixels apart by up to 4 levels), so the pictures are compared on average.
    assert _x264_settings(tmp_path / "package.mp4") == _x264_settings(tmp_path / "client.mp4")
    assert "crf=18.0" in _x264_settings(tmp_path / "package.mp4")
    assert np.abs(a.astype(int) - b).mean() < 0.5
    # Encoded, not copied: the decoded frames differ from the input a little.
    assert 0 < np.abs(a.astype(int) - frames).mean() < 5


def test_the_client_checks_outputs_as_the_package_does(tmp_path):
    from helios.errors import HeliosError  # noqa: PLC0415
    from helios.video import VIDEO_SUFFIXES, check_output, partial_path  # noqa: PLC0415
    from helios_client import cli  # noqa: PLC0415

    assert cli.VIDEO_SUFFIXES == VIDEO_SUFFIXES
    from helios.schedule import MAX_VIDEO_FRAMES  # noqa: PLC0415

    assert cli.MAX_VIDEO_FRAMES == MAX_VIDEO_FRAMES  # the bound on a continued clip
    for bad in ("-", "a.txt", "/nonexistent/dir/a.mp4", str(tmp_path)):
        with pytest.raises(HeliosError) as ours:
            check_output(bad)
        with pytest.raises(cli.BadArgument) as theirs:
            cli._output_path(bad)
        assert str(ours.value) == str(theirs.value)
    good = tmp_path / "v.mp4"
    assert check_output(str(good)) == cli._output_path(str(good)) == good
    assert partial_path(good).name == ".v.partial.mp4"


def _x264_settings(path) -> str:
    data = path.read_bytes()
    start = data.index(b"x264 - core")
    text = data[start:data.index(b"\0", start)].decode()
    return re.sub(r"\b(lookahead_)?threads=\d+ ", "", text)


def test_the_client_sends_the_inputs_the_helios_model_declares(tiny_checkpoint, tmp_path):
    """Every input the client can send is one the package names and the helios model's config
    declares, with the config's dtype; and the client's error pattern knows every name."""
    sent = api._inputs(grpcclient, "a red circle", 2.0, 48, 24, 7, 0.7, 5, 0.9,
                       np.zeros((8, 8, 3), np.uint8), "a1b2c3", np.zeros((4, 8, 8, 3), np.uint8),
                       0.5)
    fill(tmp_path / "repo", values(tiny_checkpoint, "cpu", 1, False, INSTANCES, 0.5),
         ROOT / "model_repository")
    config = text_format.Parse((tmp_path / "repo" / "helios" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    # The longest prompt, which the gateway reads from here (HeliosClient.served).
    assert config.parameters["max_prompt_bytes"].string_value == str(
        read_config(tiny_checkpoint).text_encoder.max_prompt_bytes)
    declared = {i.name: model_config_pb2.DataType.Name(i.data_type).removeprefix("TYPE_")
                for i in config.input}
    names = {t.name(): t.datatype() for t in sent}
    assert set(names) == set(HELIOS_INPUT_NAMES.values()) == set(declared)
    for name, dtype in names.items():
        assert declared[name] == ("STRING" if dtype == "BYTES" else dtype), name
        assert api._INPUT_ERROR.match(f"{name} must be ...")
