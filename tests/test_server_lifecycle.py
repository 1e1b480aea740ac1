"""The server launcher (helios_triton.server) as an operator runs it: --run passes SIGTERM on
to its command and never leaves a tritonserver behind."""

import os
import signal
import subprocess
import sys
import time

from conftest import INSTANCES, free_ports
from helios_triton.fill_repository import fill, values
from helios_triton.server import port_in_use


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
