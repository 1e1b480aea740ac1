"""The server launcher (helios_triton.server) as an operator runs it: --run passes SIGTERM on
to its command and never leaves a tritonserver behind; the image's entrypoint runs as the pod
runs it."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import INSTANCES, ROOT, free_ports
from helios_triton.fill_repository import fill, values
from helios_triton.server import end_group, group_members, is_ready, main, port_in_use


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
    # Every model unloaded, and no stub crashed on its way out (that is a fault too).
    log = (tmp_path / "server.log").read_text()
    assert "Fatal Python error" not in log, log[log.index("Fatal Python error"):][:2000]
    assert "Timeout 0:" not in log and "failed to stop server" not in log


@pytest.mark.parametrize("executable", ["python", "triton_python_backend_stub"])
def test_only_a_stub_process_skips_the_teardown_at_its_exit(tmp_path, executable):
    """skip_teardown ends a stub at its first exit handler (the handlers registered before it,
    and the interpreter's teardown, never run; the process exits 0 after its finalize); any
    other process keeps its handlers and its exit code. The stub is this Python under the
    stub's name, as /proc/self/exe shows it."""
    binary = tmp_path / executable
    shutil.copy2(Path(sys.executable).resolve(), binary)
    marker = tmp_path / "earlier-handler-ran"
    code = (f"import atexit, sys; atexit.register(lambda: open({str(marker)!r}, 'w').close()); "
            "from helios_triton.stub import in_stub, skip_teardown; "
            "print(in_stub()); skip_teardown(); sys.exit(3)")
    env = dict(os.environ, PYTHONHOME=sys.base_prefix,
               PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path[1:]]))
    done = subprocess.run([str(binary), "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    stub = executable == "triton_python_backend_stub"
    assert done.stdout.strip() == str(stub), done.stderr
    assert done.returncode == (0 if stub else 3), done.stderr
    assert marker.exists() != stub


def test_what_outlives_the_server_in_its_process_group_is_killed_after_the_grace():
    # The leader exits on SIGTERM as tritonserver does; a child that ignores it (as a stub
    # stuck in its teardown does) stays in the group until end_group kills it.
    leader = subprocess.Popen(["bash", "-c", "(trap '' TERM; exec sleep 120) & sleep 120"],
                              start_new_session=True)
    pgid = leader.pid
    deadline = time.monotonic() + 10
    while len(group_members(pgid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGTERM)
    leader.wait(10)
    time.sleep(0.5)
    left = group_members(pgid)
    assert len(left) == 1, left  # the child that ignored SIGTERM
    t = time.monotonic()
    assert end_group(pgid, grace=1) == left
    assert time.monotonic() - t >= 1
    deadline = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(pgid) == []
    assert end_group(pgid, grace=1) == []  # nothing left: returns at once


def _pod_like(command: list[str], uid: int, keep: list[Path]) -> str:
    """A shell script that runs ``command`` as the pods run it: in a mount namespace of its own
    where the root filesystem is read-only, /tmp and /root are empty tmpfs (the pod's /tmp is
    an emptyDir), /dev/shm is writable, and the process has user ``uid``. The folders in
    ``keep`` (this tree, the interpreter) stay readable where they are, even under /tmp or
    /root (mode 700 for others)."""
    hold = f"/dev/shm/helios-pod-{uid}-{os.getpid()}"
    lines = ["set -eu", "mount --make-rprivate /"]
    for i, path in enumerate(keep):
        lines += [f"mkdir -p {hold}/{i}", f"mount --bind {shlex.quote(str(path))} {hold}/{i}"]
    lines += ["mount -t tmpfs tmpfs /tmp", "mount -t tmpfs -o mode=755 tmpfs /root"]
    for i, path in enumerate(keep):
        q = shlex.quote(str(path))
        lines += [f"mkdir -p {q}", f"mount --bind {hold}/{i} {q}", f"mount -o remount,bind,ro {q}"]
    lines += [f"umount {hold}/{i}" for i in range(len(keep))] + [f"rm -rf {hold}"]
    lines += ["mount -o remount,ro /root", "mount -o remount,bind,ro /",
              f"exec setpriv --reuid {uid} --regid {uid} --clear-groups "
              + " ".join(map(shlex.quote, command))]
    return "\n".join(lines)


@pytest.mark.parametrize("args,line", [
    (["--http-port", "70000"], "http-port must be in [1, 65535], got 70000"),
    (["--grpc-port", "8000", "--http-port", "8000"],
     "http-port, grpc-port and metrics-port must differ, got 8000, 8000, 8002"),
    (["--ready-timeout", "-1"], "ready-timeout must be > 0 seconds, got -1"),
    (["--stall-timeout-s", "nan"], "stall-timeout-s must be > 0 seconds, got nan"),
    (["--exit-timeout-secs", "-3"], "exit-timeout-secs must be >= 0, got -3")])
def test_options_out_of_range_are_refused_before_tritonserver_starts(tmp_path, capsys, args,
                                                                      line):
    """Each in one line naming the option, exit code 2, and no tritonserver launched (it
    would refuse some of them only after starting, with an exit code and no reason)."""
    repo = tmp_path / "repo"
    fill(repo, values(ROOT / "weights" / "helios-tiny", "cpu", 1, False, INSTANCES, 0.5))
    assert main(["--repository", str(repo), "--state-dir", str(tmp_path), *args,
                 "--run", "true"]) == 2
    assert capsys.readouterr().err == f"helios_triton.server: error: {line}\n"
    assert not (tmp_path / "server.log").exists()


def test_a_repository_without_models_is_refused_with_the_command_that_fills_one(tmp_path, capsys):
    assert main(["--repository", str(tmp_path / "none"), "--state-dir", str(tmp_path),
                 "--run", "true"]) == 2
    assert capsys.readouterr().err == (
        f"helios_triton.server: error: repository '{tmp_path / 'none'}' holds no model (no "
        f"*/config.pbtxt): fill one with python -m helios_triton.fill_repository --out "
        f"{tmp_path / 'none'}\n")


def test_the_entrypoint_compiles_into_the_pod_when_the_cache_folder_cannot_be_written(tmp_path):
    """An unwritable HELIOS_COMPILE_CACHE_DIR is reported in one line and the pod's own folder
    used; the fill then runs (here refused for its bad option, so that no server starts)."""
    state = tmp_path / "state"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               HELIOS_HOME=str(ROOT), HELIOS_STATE_DIR=str(state),
               HELIOS_CHECKPOINT=str(ROOT / "weights" / "helios-tiny"),
               HELIOS_COMPILE_CACHE_DIR="/dev/null/cache", HELIOS_FILL_ARGS="--max-streams 0")
    run = subprocess.run(["sh", str(ROOT / "build" / "entrypoint.sh")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"helios: HELIOS_COMPILE_CACHE_DIR /dev/null/cache is not writable; compiling into "
        f"{state}/compile-cache instead",
        "fill_repository: error: max-streams must be in [1, 32], got 0"]
    assert sorted(p.name for p in (state / "compile-cache").iterdir()) == ["inductor", "triton"]


def _environments(program: str, marker: str) -> list[dict]:
    """The environments of the running processes whose command line names ``program`` and
    whose environment holds the line ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or program not in (entry / "cmdline").read_text():
                continue
            lines = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # it ended meanwhile
            continue
        if marker in lines:
            found.append(dict(line.split("=", 1) for line in lines if "=" in line))
    return found


def test_the_image_entrypoint_serves_as_a_non_root_user_on_a_read_only_root(tmp_path):
    """build/entrypoint.sh as the cpu-tiny pod runs it (uid 1000, every file of the tree owned
    by root and read-only, writes only to /tmp and /dev/shm): it fills the repository, serves
    a stream, and drains to exit code 0 on SIGTERM. Its stage processes, where the compilers
    run on a GPU, find their caches in HELIOS_COMPILE_CACHE_DIR."""
    from helios_client import HeliosClient  # noqa: PLC0415

    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.skip("needs root, unshare and setpriv to make the pod's mounts and user")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here")
    http, grpc, metrics = free_ports(3)
    script = _pod_like(["sh", str(ROOT / "build" / "entrypoint.sh")], 1000,
                       [ROOT, Path(sys.base_prefix)])
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               HELIOS_HOME=str(ROOT), HELIOS_STATE_DIR="/tmp/helios",
               HELIOS_PORTS=f"{http} {grpc} {metrics}", HELIOS_EXIT_TIMEOUT_S="30",
               HELIOS_COMPILE_CACHE_DIR="/tmp/compile-cache")
    log = tmp_path / "pod.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not is_ready(http):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        uid = Path(f"/proc/{proc.pid}/status").read_text().split("Uid:")[1].split()[0]
        assert uid == "1000"  # the supervised server, PID of the container
        video = HeliosClient(f"127.0.0.1:{grpc}").generate("a red circle", num_frames=8, seed=0)
        assert video.shape == (8, 128, 128, 3)
        stubs = _environments("triton_python_backend_stub", f"HELIOS_PORTS={http} {grpc} {metrics}")
        assert stubs and all(e["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/compile-cache/inductor" and
                             e["TRITON_CACHE_DIR"] == "/tmp/compile-cache/triton" for e in stubs)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
