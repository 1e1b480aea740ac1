"""The server under faults, on a real supervised tritonserver (helios_triton.supervisor): a
stage process killed or stopped mid-stream ends that stream with an error within seconds,
readiness turns false, the server heals and serves again; SIGTERM drains; a storm of
cancelled streams leaves no KV block in use. Bounded: every wait has a deadline."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import INSTANCES, ROOT, free_ports, live_metrics, metric
from helios_client import HeliosClient, RequestError
from helios_triton.fill_repository import fill, values
from helios_triton.server import TritonServer, is_ready as _ready
from helios_triton.calls import CallWatch, hung, silent_for, waits
from helios_triton.supervisor import SHM, Supervisor

PROMPT = "a red circle moving left on a dark background"


def _until(predicate, timeout: float, step: float = 0.1) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def supervised(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("supervised")
    fill(tmp / "repo", values(tiny_checkpoint, "cpu", 2, True, INSTANCES, 0.5),
         ROOT / "model_repository")
    http, grpc, metrics = free_ports(3)
    server = TritonServer(tmp / "repo", http, grpc, metrics, log_file=tmp / "server.log",
                          backends=tmp / "backends", address="127.0.0.1")
    sup = Supervisor(server, tmp / "draining", ready_timeout=240, log=lambda line: None)
    sup.start()
    yield sup
    sup.stop()


class _Stream:
    """One long video streamed in a thread: when its first chunk came, and how it ended."""

    def __init__(self, grpc: int, seconds: float = 60):
        self.first = threading.Event()
        self.error, self.ended_at, self.frames = None, None, 0
        self.thread = threading.Thread(target=self._run, args=(grpc, seconds), daemon=True)
        self.thread.start()

    def _run(self, grpc, seconds):
        try:
            for chunk in HeliosClient(f"127.0.0.1:{grpc}", timeout_s=60).stream(
                    PROMPT, duration_s=seconds, seed=0):
                self.frames += len(chunk.frames)
                self.first.set()
        except Exception as e:  # noqa: BLE001 - what the client sees is the point
            self.error = e
        self.ended_at = time.monotonic()
        self.first.set()


@pytest.mark.parametrize("model", ["refiner", "ar_backbone", "vae_decoder", "text_encoder",
                                   "helios"])
def test_a_dead_stage_ends_its_stream_fast_and_the_server_heals(supervised, model):
    _fault_and_heal(supervised, model, signal.SIGKILL)


def test_a_stopped_stage_is_healed_too(supervised):
    _fault_and_heal(supervised, "refiner", signal.SIGSTOP)


def test_a_stage_stopped_for_a_moment_and_continued_never_hangs_the_server(supervised):
    """SIGSTOP then SIGCONT of the refiner within a second (under the 2 s that make it a
    fault): once hit by tritonserver 2.51 with a whole-server abort. The stream ends, whole or
    with an error, never hangs, and the server serves the next request, healed if it had to."""
    grpc, http = supervised.server.grpc, supervised.server.http
    assert _ready(http)
    stream = _Stream(grpc, seconds=10)
    assert stream.first.wait(60) and stream.error is None, stream.error
    (victim,) = [s for s in supervised.stubs.values() if s.model == "refiner"][:1]
    heals = len(supervised.heals)
    os.kill(victim.pid, signal.SIGSTOP)
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGCONT)
    stream.thread.join(60)
    assert stream.ended_at is not None
    assert stream.error is not None or stream.frames == 240
    _until(lambda: _ready(http) and supervised.fault() is None, 240, 0.5)
    client = HeliosClient(f"127.0.0.1:{grpc}", timeout_s=120)
    try:
        video = client.generate(PROMPT, num_frames=8, seed=1)
    except RequestError:
        # The server looked healthy, then went down under this request: allowed only as a
        # heal (the supervisor found a fault a moment later, or the server aborted and was
        # restarted), after which the next request is served.
        _until(lambda: len(supervised.heals) > heals and _ready(http), 240, 0.5)
        video = client.generate(PROMPT, num_frames=8, seed=1)
    assert video.shape == (8, 128, 128, 3)
    print(f"SIGSTOP+SIGCONT: stream {'whole' if stream.error is None else stream.error}, "
          f"{len(supervised.heals) - heals} heals: {supervised.heals[heals:]}")


def _fault_and_heal(sup, model, sig, fault=os.kill):
    grpc, http = sup.server.grpc, sup.server.http
    assert _ready(http)
    stream = _Stream(grpc)
    assert stream.first.wait(60) and stream.error is None, stream.error
    (victim,) = [s for s in sup.stubs.values() if s.model == model][:1]
    heals = len(sup.heals)
    t0 = time.monotonic()
    fault(victim.pid, sig)
    # The stream ends with an error, and readiness turns false, within 5 s each.
    stream.thread.join(15)
    assert stream.ended_at is not None and stream.ended_at - t0 < 5, stream.ended_at
    assert stream.error is not None
    assert _until(lambda: not _ready(http), 5) < 5
    # Healed: ready again, the next request succeeds, no shared memory of the dead server left.
    healed = _until(lambda: _ready(http) and len(sup.heals) > heals, 240, 0.5)
    assert sup.heals[-1]["seconds"] is not None and model in sup.heals[-1]["reason"], \
        sup.heals[heals:]
    assert not (SHM / victim.shm_region).exists()
    video = HeliosClient(f"127.0.0.1:{grpc}", timeout_s=120).generate(PROMPT, num_frames=8, seed=1)
    assert video.shape == (8, 128, 128, 3)
    print(f"{model} {sig.name}: stream ended after {stream.ended_at - t0:.2f} s, "
          f"healed in {healed:.1f} s")


def test_a_storm_of_cancelled_streams_leaves_no_kv_block_in_use(server):
    """Streams cancelled at random points, several at once: afterwards the AR backbone holds
    no sequence and no KV block."""
    import random

    rng = random.Random(0)

    def cancelled_stream(seed):
        stream = HeliosClient(f"127.0.0.1:{server.grpc}", timeout_s=60).stream(
            PROMPT, duration_s=10, seed=seed)
        for i, _ in enumerate(stream):
            if i >= rng.randint(0, 4):
                break
        stream.close()

    threads = [threading.Thread(target=cancelled_stream, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
        time.sleep(rng.random() * 0.3)
    for t in threads:
        t.join(120)
    def released():
        text = live_metrics(server)
        return (metric(text, "helios_ar_active_sequences") == 0
                and metric(text, "helios_kv_cache_blocks", state="used") == 0)

    _until(released, 30, 0.5)


def test_sigterm_drains_running_streams_and_refuses_new_ones(tiny_checkpoint, tmp_path):
    """SIGTERM to the server process (the pod's PID 1): a new stream is refused at once with
    UNAVAILABLE, the running one gets every frame, and the process exits 0."""
    fill(tmp_path / "state" / "model_repository",
         values(tiny_checkpoint, "cpu", 2, True, INSTANCES, 0.5), ROOT / "model_repository")
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "helios_triton.server", "--state-dir", str(tmp_path / "state"),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
         "--address", "127.0.0.1", "--exit-timeout-secs", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        _until(lambda: _ready(http), 240, 0.5)
        stream = _Stream(grpc, seconds=8)
        assert stream.first.wait(60) and stream.error is None
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(RequestError) as refused:
            HeliosClient(f"127.0.0.1:{grpc}", timeout_s=30).generate(PROMPT, num_frames=8)
        assert "draining" in str(refused.value)
        stream.thread.join(120)
        assert stream.error is None and stream.frames == 8 * 24
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not Path(tmp_path / "state" / "draining").exists()


FREEZER = Path("/sys/fs/cgroup/freezer")


@pytest.fixture
def freezer():
    """A cgroup (v1 freezer) to freeze processes in: frozen, a process keeps a state of D or
    S, as a deadlocked or stuck one does, not the T of a stopped one."""
    group = FREEZER / f"helios-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as e:
        pytest.skip(f"no writable cgroup freezer here ({e})")
    yield group
    (group / "freezer.state").write_text("THAWED")
    for pid in (group / "cgroup.procs").read_text().split():  # a killed stub ends once thawed
        _until(lambda: not Path(f"/proc/{pid}").exists(), 10)
    group.rmdir()


def test_a_frozen_stage_is_found_and_healed(supervised, freezer):
    """The refiner frozen mid-stream: not dead, not stopped, its process in uninterruptible
    sleep; the supervisor names it and heals the server."""
    def freeze(pid, _sig):
        (freezer / "cgroup.procs").write_text(str(pid))
        (freezer / "freezer.state").write_text("FROZEN")
        _until(lambda: (freezer / "freezer.state").read_text().strip() == "FROZEN", 5)
        assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "TtZX"

    _fault_and_heal(supervised, "refiner", signal.SIGSTOP, fault=freeze)
    assert supervised.heals[-1]["reason"].startswith("the refiner stage process (pid ")
    assert supervised.heals[-1]["reason"].endswith(") is stuck in uninterruptible sleep")


def test_the_helios_model_marks_each_wait_on_a_stage_while_it_lasts(supervised):
    """What the stall check reads: during a stream the calls folder names the stages being
    waited on, every stage the stream used has its answer marked, and no wait is left once
    the stream has ended."""
    calls = supervised.server.calls_dir
    seen, t0 = set(), time.time() - 1  # mtimes have whole-tick resolution on some filesystems
    stream = _Stream(supervised.server.grpc, seconds=2)
    while stream.ended_at is None:
        seen.update(w.stage for w in waits(calls))
        time.sleep(0.002)
    assert stream.error is None and stream.frames == 48
    stages = {"prompt_encoder", "ar_backbone", "refiner", "vae_decoder"}
    assert seen and seen <= stages  # the waits seen (a prompt's encoding may be too short)
    assert stages <= {p.name for p in (calls / "answered").iterdir() if p.stat().st_mtime >= t0}
    assert waits(calls) == []


def test_a_stage_that_leaves_a_stream_waiting_is_hung_and_healed(supervised):
    """A wait on the refiner older than the stall timeout, and no answer from the refiner to
    anyone for as long (what the helios model marks when a BLS call never returns; a stub
    that deadlocks keeps answering Triton's own health check), makes the supervisor restart
    the server, naming the stage."""
    assert _ready(supervised.server.http)
    heals = len(supervised.heals)
    calls = supervised.server.calls_dir
    with supervised._lock:  # the marks go in between two polls, whole
        mark, answered = calls / "4242-1", calls / "answered" / "refiner"
        mark.write_text("refiner")
        answered.parent.mkdir(exist_ok=True)
        answered.touch()
        for path in (mark, answered):
            os.utime(path, (time.time() - 10, time.time() - 10))
    assert _until(lambda: not _ready(supervised.server.http), 5) < 5
    _until(lambda: _ready(supervised.server.http) and len(supervised.heals) > heals, 240, 0.5)
    reason = supervised.heals[-1]["reason"]
    assert reason.startswith("the refiner stage has not answered a stream for 1") and \
        reason.endswith(" s (waiting: pid 4242)"), reason
    assert not mark.exists()  # a restart empties the folder


def test_a_long_wait_on_a_stage_that_answers_others_is_a_queue_not_a_hang(tmp_path):
    """Sixteen streams on two cores wait seconds for the refiner while it answers each in
    turn: only a stage that has answered no one for the stall timeout is hung."""
    now = time.time()
    (tmp_path / "answered").mkdir()
    for name, age in (("1-1", 5), ("2-1", 4), ("3-1", 1)):
        (tmp_path / name).write_text({"1-1": "refiner", "2-1": "refiner, vae_decoder",
                                      "3-1": "ar_backbone"}[name])
        os.utime(tmp_path / name, (now - age, now - age))
    for stage, age in (("refiner", 0.5), ("vae_decoder", 0.5), ("ar_backbone", 9)):
        (tmp_path / "answered" / stage).touch()
        os.utime(tmp_path / "answered" / stage, (now - age, now - age))
    assert hung(tmp_path, 3.0, now) is None  # the refiner answered 0.5 s ago; 3-1 is recent
    os.utime(tmp_path / "answered" / "vae_decoder", (now - 4, now - 4))
    assert (hung(tmp_path, 3.0, now).stage, hung(tmp_path, 3.0, now).caller_pid) == (
        "refiner, vae_decoder", 2)
    os.utime(tmp_path / "answered" / "refiner", (now - 6, now - 6))
    assert hung(tmp_path, 3.0, now).caller_pid == 1  # the longest wait first
    assert silent_for(tmp_path, "text_encoder", now) == pytest.approx(
        now - (tmp_path).stat().st_mtime)  # never answered: since the folder was made


def test_waits_are_read_longest_first(tmp_path):
    watch = CallWatch(tmp_path)
    with watch.waiting("refiner"):
        (tmp_path / "7-1").write_text("vae_decoder")
        os.utime(tmp_path / "7-1", (time.time() - 5, time.time() - 5))
        got = waits(tmp_path)
        assert [(w.stage, w.caller_pid) for w in got] == [("vae_decoder", 7),
                                                          ("refiner", os.getpid())]
        assert 4.5 < got[0].seconds < 6 and got[1].seconds < 1
    assert [w.stage for w in waits(tmp_path)] == ["vae_decoder"]
    assert silent_for(tmp_path, "refiner") < 1  # the answer was marked
    with CallWatch(None).waiting("refiner"):  # no folder: nothing marked
        pass
    with CallWatch(tmp_path / "gone").waiting("refiner"):  # a folder removed: the call goes on
        pass
