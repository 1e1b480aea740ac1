"""The server launcher (helios_triton.server) as an operator runs it: --run passes SIGTERM on
to its command and never leaves a tritonserver behind."""

import os
import signal
import subprocess
import sys
import time

from conftest import INSTANCES, free_ports
from helios_triton.fill_repository import fill, values
from helios_triton.server import is_ready, port_in_use


def test_sigterm_to_run_reaches_the_command_and_stops_the_server(tiny_checkpoint, tmp_path):
    fill(tmp_path / "repo", values(tiny_checkpoint, "cpu", 1, False, INSTANCES, 0.5))
    http, grpc, metrics = free_ports(3)
    marker = tmp_path / "command-ended"
    command = (f"import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: "
               f"(open({str(marker)!r}, 'w').write('sigterm'), sys.exit(3))); time.sleep(300)")
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "helios_triton.server", "--repository", str(tmp_path / "repo"),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
         "--address", "127.0.0.1", "--log-file", str(tmp_path / "server.log"),
         "--run", sys.executable, "-c", command],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for line in wrapper.stderr:  # wait for the server, then for the command to start
            if "tritonserver ready" in line:
                break
        assert port_in_use(http)
        time.sleep(2)
        t0 = time.monotonic()
        wrapper.send_signal(signal.SIGTERM)
        rc = wrapper.wait(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert marker.read_text() == "sigterm"          # the command got the signal
    assert rc == 3 and elapsed < 60                   # and its exit code is the wrapper's
    for port in (http, grpc, metrics):                # no server left holding the ports
        assert not port_in_use(port), port
    stubs = subprocess.run(["pgrep", "-f", str(tmp_path / "repo")], capture_output=True, text=True)
    assert stubs.stdout.strip() == "", f"processes left behind: {stubs.stdout}"
    assert os.path.exists(tmp_path / "server.log")


def test_the_image_entrypoint_serves_and_writes_only_its_state_dir(tmp_path):
    """build/entrypoint.sh on a copy of what the image holds (templates, the tiny checkpoint):
    it fills the repository, serves a stream, and writes nothing outside HELIOS_STATE_DIR,
    which is what lets the pod run with a read-only root filesystem. (Run as root here, so
    the copy's permissions cannot prove it; the check is that no file appears outside.)"""
    import shutil

    from conftest import ROOT
    from helios_client import HeliosClient

    home = tmp_path / "opt-helios"
    shutil.copytree(ROOT / "model_repository", home / "model_repository")
    shutil.copytree(ROOT / "weights" / "helios-tiny", home / "weights" / "helios-tiny")
    before = sorted(p for p in home.rglob("*"))
    http, grpc, metrics = free_ports(3)
    state = tmp_path / "state"
    env = dict(os.environ, HELIOS_HOME=str(home), HELIOS_STATE_DIR=str(state),
               HELIOS_PORTS=f"{http} {grpc} {metrics}", HELIOS_EXIT_TIMEOUT_S="5",
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    work = tmp_path / "cwd"
    work.mkdir()
    server = subprocess.Popen(["sh", str(ROOT / "build" / "entrypoint.sh")], env=env, cwd=work,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        client = HeliosClient(f"127.0.0.1:{grpc}", timeout_s=120)
        deadline = time.monotonic() + 180
        while not is_ready(http):
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(1)
        video = client.generate("a red circle moving left", num_frames=8, seed=0)
        assert video.shape == (8, 128, 128, 3)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    assert sorted(p for p in home.rglob("*")) == before
    assert list(work.iterdir()) == []
    assert (state / "model_repository" / "helios" / "config.pbtxt").is_file()
    assert (state / "backends" / "python").is_dir()  # the server logs to stdout, for the pod
