"""Run the real Triton Inference Server from the ``nvidia-pytriton`` wheel.

The wheel carries tritonserver 2.51 (``pytriton/tritonserver``), its shared libraries
(``nvidia_pytriton.libs``) and a python-backend stub per Python version. PyTriton's own Python
API is not used: this module lays out a backend folder with the stub of the running Python,
and starts the server binary on a filled model repository.

    python -m helios_triton.server --repository .triton/model_repository       # foreground
    python -m helios_triton.server --run helios-client generate --prompt ...   # around a command

Either way a supervisor (``helios_triton.supervisor``) watches the server's stage processes
and restarts the server when one dies, stops, or leaves a stream waiting longer than
``--stall-timeout-s``, so that its health endpoints tell the truth.
In the foreground, SIGTERM drains: new streams are refused with UNAVAILABLE, running ones
finish (at most ``--exit-timeout-secs``), then the process exits 0.

With ``--run`` the server starts in the background, the command runs once it is ready (with
HELIOS_GRPC_URL / HELIOS_HTTP_URL / HELIOS_METRICS_URL and HELIOS_ADMIN_KEY set), and the
server stops after it; the exit code is the command's. SIGTERM or SIGHUP to this process goes
on to the command, and the server is stopped whatever ends the command: none is left running.

The administrative APIs (model repository, logging, shared memory, statistics, trace) answer
only requests that carry the admin header (``admin_header``: ``helios-admin: <key>`` over
HTTP, ``triton-grpc-protocol-helios-admin: <key>`` over gRPC); the key is random for every
start and known only to this process, which hands it to the ``--run`` command.
``--address`` chooses the interface the three endpoints bind (default: all of them, as a pod
needs; 127.0.0.1 keeps a development server to the machine).

``--mps`` (GPU): every python-backend model instance is a process with its own CUDA context,
and the GPU time-slices between contexts, so the AR backbone and the refiner never run at the
same time. Under CUDA MPS they share the GPU and their kernels can run side by side (on an
H100, requests sent ahead and MPS together gained 7 % at one stream: docs/serving.md says why
no more). The flag starts an MPS control daemon of this server's own (its pipe and log folders
under STATE_DIR/mps-PID, not the system's) and quits it when the server stops.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path

from .supervisor import Supervisor

# Working files (backend folder, log, MPS pipes) go under --state-dir, by default this folder
# under the working directory (a read-only image passes a writable one).
STATE = Path(".triton")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
# tritonserver's API categories that only a caller with the admin header may use.
RESTRICTED_APIS = ("model-repository", "logging", "shared-memory", "statistics", "trace")
ADMIN_HEADER = "helios-admin"


def admin_header(key: str, protocol: str = "http") -> str:
    """``name:value`` of the header that opens the restricted APIs (tritonserver expects gRPC's
    under the prefix ``triton-grpc-protocol-``), as perf_analyzer's ``-H`` takes it."""
    name = ADMIN_HEADER if protocol == "http" else f"triton-grpc-protocol-{ADMIN_HEADER}"
    return f"{name}:{key}"


def check_numpy() -> None:
    """tritonserver 2.51's python-backend stub hands BYTES tensors to Python corrupted when the
    environment has numpy 2 (every byte equals the first; the stub then aborts on the first
    request with a string input). Refuse to start instead."""
    import numpy  # noqa: PLC0415

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise SystemExit(f"numpy {numpy.__version__} is installed; the python backend of "
                         f"tritonserver 2.51 corrupts BYTES tensors with numpy 2, so every "
                         f"request would crash it. Install numpy<2 (requirements.txt pins 1.26.4).")


def wheel_paths() -> tuple[Path, Path]:
    """(tritonserver folder, its shared-library folder): NVIDIA's Triton image (``$TRITONSERVER_HOME``,
    e.g. /opt/tritonserver, with its own backends) or the installed nvidia-pytriton wheel."""
    home = os.environ.get("TRITONSERVER_HOME")
    if home:
        return Path(home), Path(home) / "lib"
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the Triton server is not installed: run `make setup` "
                         "(pip install nvidia-pytriton==0.7.0)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    return pkg / "tritonserver", pkg.parent / "nvidia_pytriton.libs"


def prepare_backends(dest: Path) -> Path:
    """A backend folder whose python backend uses the stub built for this Python version
    (in NVIDIA's image: the image's own backend folder, which has every backend)."""
    if os.environ.get("TRITONSERVER_HOME"):
        return Path(os.environ["TRITONSERVER_HOME"]) / "backends"
    server, _ = wheel_paths()
    dest = dest.resolve()
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        link = python / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(server / "backends" / "python" / name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"the wheel has no python-backend stub for Python {version}")
    # Through a rename: a stub still running from another server cannot be overwritten.
    tmp = python / f".stub-{os.getpid()}"
    shutil.copy2(stub, tmp)
    os.replace(tmp, python / "triton_python_backend_stub")
    return dest


def command(repository: Path, http: int, grpc: int, metrics: int, backends: Path,
            log_verbose: int = 0, exit_timeout_s: int = 30, admin_key: str | None = None,
            address: str = "0.0.0.0") -> tuple[list[str], dict]:
    server, libs = wheel_paths()
    admin = admin_key or secrets.token_hex(16)  # unknown to everyone else: the APIs stay closed
    restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={admin}"
    argv = [
        str(server / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
        f"--http-address={address}", f"--grpc-address={address}", f"--metrics-address={address}",
        "--strict-readiness=true",            # ready only once every model is loaded
        "--model-control-mode=none",          # no load / unload through the API
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
        "--exit-on-error=true",
        "--disable-auto-complete-config",     # configs are complete: no extra stub per model
        # On SIGTERM Triton stops taking requests and lets running ones finish for this long.
        f"--exit-timeout-secs={exit_timeout_s}",
        "--allow-gpu-metrics=false" if not _has_gpu() else "--allow-gpu-metrics=true",
        "--backend-config=python,shm-default-byte-size=16777216",
        "--backend-config=python,shm-growth-byte-size=16777216",
        f"--log-verbose={log_verbose}",
    ]
    env = dict(os.environ)
    # The stub links libpython3.X.so.1.0: it must be this interpreter's own (its LIBDIR), not
    # another build of the same minor version that the loader might find first (seen: Debian's
    # 3.11.2 under pyenv's 3.11.7 stdlib, which segfaulted under concurrent requests).
    libdir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH")) if p)
    # The python-backend stub embeds the interpreter found first on PATH: this venv's.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return argv, env


class MPS:
    """A CUDA MPS control daemon for the server's processes (see the module docstring)."""

    def __init__(self, folder: Path):
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
        self.control = shutil.which("nvidia-cuda-mps-control")
        if self.control is None:
            raise SystemExit("--mps: nvidia-cuda-mps-control is not on PATH (it comes with the "
                             "NVIDIA driver)")

    def start(self) -> "MPS":
        for d in self.env.values():
            Path(d).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **self.env)
        if subprocess.run([self.control, "-d"], env=env).returncode != 0:
            # "An instance of this daemon is already running": a previous run's daemon that did
            # not quit (see stop). It is quit, not reused: a machine left that way still showed
            # 32 GiB in use on the H100 after the next server had stopped.
            print("MPS control daemon of a previous run still running: quitting it", file=sys.stderr)
            self.stop()
            time.sleep(2)
            subprocess.run([self.control, "-d"], env=env, check=True)
        return self

    def stop(self) -> None:
        try:
            subprocess.run([self.control], input=b"quit\n", env=dict(os.environ, **self.env),
                           check=False, timeout=30)
        except subprocess.TimeoutExpired:  # seen once on the H100 after an FP8 server run
            print("MPS control daemon did not quit within 30 s; left running (its folders: "
                  f"{self.env['CUDA_MPS_PIPE_DIRECTORY']})", file=sys.stderr)


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_ports(n: int) -> list[int]:
    """``n`` ports that are free on this machine now (bound once, released)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def is_ready(http: int) -> bool:
    """Whether the server on this HTTP port answers its readiness endpoint with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_ready(http: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with code {proc.returncode} before it was ready")
        if is_ready(http):
            return
        time.sleep(0.5)
    raise TimeoutError(f"tritonserver was not ready after {timeout:.0f} s")


def group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` that still run (zombies left out), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        state, _ppid, group = stat[stat.rindex(")") + 2:].split()[:3]
        if state != "Z" and int(group) == pgid:
            pids.append(int(entry.name))
    return pids


def end_group(pgid: int, grace: float = 10) -> list[int]:
    """After tritonserver itself has exited: what is left of its process group gets
    ``grace`` seconds, then SIGKILL. A python stub can outlive its server: on an H200 a fused
    14b model's stub, under MPS, was still running after the server had stopped, holding
    21.6 GB of GPU memory, and the MPS daemon could not quit while it was attached. Returns
    the processes killed."""
    deadline = time.monotonic() + grace
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return []
        print(f"tritonserver stopped; {len(left)} process(es) of its group still running after "
              f"{grace:g} s were killed: {', '.join(map(str, left))}", file=sys.stderr)
    return left


class TritonServer:
    """Start tritonserver in the background; ``with TritonServer(...) as s:`` stops it after."""

    def __init__(self, repository: Path, http: int = 8000, grpc: int = 8001, metrics: int = 8002,
                 log_file: Path | None = None, backends: Path | None = None,
                 env: dict | None = None, address: str = "0.0.0.0", exit_timeout_s: int = 30,
                 log_verbose: int = 0, sessions_dir: Path | None = None):
        self.repository, self.http, self.grpc, self.metrics = repository, http, grpc, metrics
        # The running streams' mailboxes for prompt updates (helios_triton.sessions).
        self.sessions_dir = sessions_dir or STATE / f"sessions-{http}"
        # The stage calls its streams are waiting on (helios_triton.calls), beside them.
        self.calls_dir = self.sessions_dir.with_name(self.sessions_dir.name + "-calls")
        self.address, self.exit_timeout_s, self.log_verbose = address, exit_timeout_s, log_verbose
        self.admin_key = secrets.token_hex(16)
        self.extra_env = env or {}
        self.backends = prepare_backends(backends or STATE / "backends")
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> "TritonServer":
        check_numpy()
        for port in (self.http, self.grpc, self.metrics):
            if port_in_use(port):  # else the readiness probe could be answered by another server
                raise RuntimeError(f"port {port} is already in use")
        argv, env = command(self.repository, self.http, self.grpc, self.metrics, self.backends,
                            self.log_verbose, self.exit_timeout_s, admin_key=self.admin_key,
                            address=self.address)
        env.update(self.extra_env)
        # Emptied at each start: a stream that died with the last server left its folder.
        for folder in (self.sessions_dir, self.calls_dir):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        env["HELIOS_SESSIONS_DIR"] = str(self.sessions_dir)
        env["HELIOS_CALLS_DIR"] = str(self.calls_dir)
        out = open(self.log_file, "a") if self.log_file else None  # a restart appends
        self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_ready(self.http, timeout, self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 60) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # Triton stops, then its python stubs
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            end_group(self.proc.pid)
        # No stream outlives its server: its mailboxes and waits go with it.
        for folder in (self.sessions_dir, self.calls_dir):
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def bad_option(args) -> str | None:
    """The first option out of its range, as one line naming it; None when all are in. What
    tritonserver itself would refuse only after the launch, with an exit code."""
    ports = {"http-port": args.http_port, "grpc-port": args.grpc_port,
             "metrics-port": args.metrics_port}
    for name, port in ports.items():
        if not 1 <= port <= 65535:
            return f"{name} must be in [1, 65535], got {port}"
    if len(set(ports.values())) < 3:
        got = ", ".join(map(str, ports.values()))
        return f"http-port, grpc-port and metrics-port must differ, got {got}"
    for name, value in (("ready-timeout", args.ready_timeout),
                        ("stall-timeout-s", args.stall_timeout_s)):
        if not value > 0:  # NaN too
            return f"{name} must be > 0 seconds, got {value:g}"
    if args.exit_timeout_secs < 0:
        return f"exit-timeout-secs must be >= 0, got {args.exit_timeout_secs}"
    if args.log_verbose < 0:
        return f"log-verbose must be >= 0, got {args.log_verbose}"
    if not any(args.repository.glob("*/config.pbtxt")):
        return (f"repository {str(args.repository)!r} holds no model (no */config.pbtxt): fill "
                f"one with python -m helios_triton.fill_repository --out {args.repository}")
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", type=Path, default=STATE,
                    help="writable folder for the backend folder, the log and MPS pipes")
    ap.add_argument("--repository", type=Path, default=None,
                    help="filled model repository (default: STATE_DIR/model_repository)")
    ap.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"])
    ap.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"])
    ap.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"])
    ap.add_argument("--address", default="0.0.0.0",
                    help="interface the HTTP, gRPC and metrics endpoints bind (127.0.0.1: this "
                         "machine only)")
    ap.add_argument("--log-verbose", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=300,
                    help="seconds to wait for every model to load (a GPU compiles at load)")
    ap.add_argument("--exit-timeout-secs", type=int, default=30,
                    help="on SIGTERM, how long running streams may take to finish")
    ap.add_argument("--stall-timeout-s", type=float, default=3.0,
                    help="a stage that a stream has waited on this long is hung: the supervisor "
                         "restarts the server")
    ap.add_argument("--log-file", type=Path, default=None, help="default: STATE_DIR/server.log")
    ap.add_argument("--mps", action="store_true",
                    help="run the server's processes under CUDA MPS (GPU; see above)")
    ap.add_argument("--run", nargs=argparse.REMAINDER, help="command to run against the server")
    args = ap.parse_args(argv)
    args.repository = args.repository or args.state_dir / "model_repository"
    args.log_file = args.log_file or args.state_dir / "server.log"
    problem = bad_option(args)
    if problem:
        print(f"helios_triton.server: error: {problem}", file=sys.stderr)
        return 2
    # A folder of its own per run: a daemon an earlier run could not quit does not block it.
    mps = MPS(args.state_dir / f"mps-{os.getpid()}") if args.mps else None
    target = run_around if args.run else serve
    if mps is None:
        return target(args)
    mps.start()
    try:
        return target(args, mps.env)
    finally:
        mps.stop()


def _supervised(args, env: dict | None, log_file: Path | None) -> Supervisor:
    server = TritonServer(args.repository.resolve(), args.http_port, args.grpc_port,
                          args.metrics_port, log_file=log_file, env=env, address=args.address,
                          backends=args.state_dir / "backends",
                          exit_timeout_s=args.exit_timeout_secs, log_verbose=args.log_verbose,
                          sessions_dir=args.state_dir / "sessions")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    return Supervisor(server, args.state_dir / "draining", ready_timeout=args.ready_timeout,
                      log=log, stall_s=args.stall_timeout_s)


def serve(args, env: dict | None = None) -> int:
    """In the foreground, supervised, until SIGTERM (drain, exit 0) or SIGINT (stop)."""
    check_numpy()
    supervisor = _supervised(args, env, None)  # the server logs to this process's output
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        supervisor.start()
        print(f"tritonserver ready: HTTP {args.http_port}, gRPC {args.grpc_port}, metrics "
              f"{args.metrics_port}", file=sys.stderr, flush=True)
        done.wait()
    except KeyboardInterrupt:
        supervisor.stop()
        return 130
    except Exception as e:  # noqa: BLE001 - it did not start: say why, in one line
        supervisor.stop()
        print(f"tritonserver did not start: {e}", file=sys.stderr)
        return 1
    supervisor.drain(args.exit_timeout_secs)
    return 0


def run_around(args, env: dict | None = None) -> int:
    supervisor = _supervised(args, env, args.log_file)
    server = supervisor.server
    print(f"starting tritonserver (log: {args.log_file}) ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        supervisor.start()
    except Exception as e:
        supervisor.stop()
        tail = args.log_file.read_text()[-3000:] if args.log_file.exists() else ""
        print(f"{tail}\ntritonserver did not start: {e}", file=sys.stderr)
        return 1
    print(f"tritonserver ready in {time.monotonic() - t0:.0f} s: HTTP {args.http_port}, "
          f"gRPC {args.grpc_port}, metrics {args.metrics_port}", file=sys.stderr, flush=True)
    env = dict(os.environ, HELIOS_GRPC_URL=f"localhost:{args.grpc_port}",
               HELIOS_HTTP_URL=f"localhost:{args.http_port}",
               HELIOS_METRICS_URL=f"localhost:{args.metrics_port}",
               HELIOS_ADMIN_KEY=server.admin_key)
    child = None
    try:
        child = subprocess.Popen(args.run, env=env)
        # SIGTERM / SIGHUP go on to the command; the server stops once it has ended.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
        rc = child.wait()
        return rc if rc >= 0 else 128 - rc  # ended by a signal: the shell's convention
    except KeyboardInterrupt:  # Ctrl-C reached the command too (same process group)
        try:
            return child.wait(timeout=10) if child is not None else 130
        except subprocess.TimeoutExpired:
            child.kill()
            return 130
    finally:
        supervisor.stop()
        print("tritonserver stopped", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
