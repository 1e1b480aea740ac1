"""The web gateway (gateway/helios_gateway) in front of the real Triton server: the page and
its assets, the /v1/videos lifecycle over HTTP, the /v1/realtime WebSocket contract, 429 at
the session limit, 401 without the token, and the store's bounds."""

import io
import re
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import free_ports
from helios_client.cli import Mp4Writer
from helios_gateway.live import jpeg

RED = "a red circle moving left on a dark background"
BLUE = "a blue square moving right on a dark background"
TOKEN = "gateway-test-token"


class Gateway:
    def __init__(self, triton_grpc: int, folder: Path, token: str | None = None, **options):
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "helios_gateway", "--triton", f"127.0.0.1:{triton_grpc}",
                "--port", str(self.port), "--store", str(folder / "videos")]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        env = dict(os.environ)
        env.pop("HELIOS_GATEWAY_TOKEN", None)
        if token:
            env["HELIOS_GATEWAY_TOKEN"] = token
        self.log = open(folder / "gateway.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, (folder / "gateway.log").read_text()
                time.sleep(0.2)
        raise AssertionError("the gateway did not start")

    def call(self, method, path, body=None, headers=None, form=None):
        data, hdrs = None, dict(headers or {})
        if body is not None:
            data, hdrs["Content-Type"] = json.dumps(body).encode(), "application/json"
        if form is not None:
            data = "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in form.items()).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        request = urllib.request.Request(self.url + path, data, hdrs, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if r.headers.get_content_type() ==
                                  "application/json" else raw)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def ws(self, query=""):
        return connect(f"ws://127.0.0.1:{self.port}/v1/realtime{query}", open_timeout=10,
                       max_size=2**24)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    gw = Gateway(server.grpc, tmp_path_factory.mktemp("gateway"), max_sessions=2)
    yield gw
    gw.stop()


def _wait(gw, video_id, statuses=("completed", "failed"), timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, video = gw.call("GET", f"/v1/videos/{video_id}")
        assert status == 200, video
        if video["status"] in statuses:
            return video
        time.sleep(0.2)
    raise AssertionError(f"{video_id} still {video['status']}")


def mp4_frames(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_the_page_and_every_asset_come_from_the_gateway(gateway):
    status, page = gateway.call("GET", "/")
    assert status == 200
    html = page.decode()
    for needle in ('id="prompt"', 'id="seed"', 'id="seconds"', 'id="start"', 'id="stop"',
                   'id="next-prompt"', '<canvas id="screen"', 'id="fps"', 'id="first"',
                   'id="download"'):
        assert needle in html, needle
    # No CDN: every script and style is the gateway's own.
    assert "//" not in "".join(l for l in html.splitlines() if "src=" in l or "href=" in l
                               and "download" not in l)
    for asset in ("/static/app.js", "/static/style.css"):
        assert gateway.call("GET", asset)[0] == 200
    status, config = gateway.call("GET", "/config")
    assert config == {"size": "128x128", "fps": 24, "max_seconds": 60.0, "default_seconds": 4.0,
                      "max_prompt_bytes": 256, "lead_s": 0.25, "token_required": False,
                      "max_sessions": 2}


def _mp4(frames, folder) -> bytes:
    writer = Mp4Writer(str(folder / "want.mp4"), 24)
    writer.write(frames)
    writer.close()
    return (folder / "want.mp4").read_bytes()


def test_a_video_job_lives_from_queued_to_deleted(gateway, pipe, tmp_path):
    status, video = gateway.call("POST", "/v1/videos", {"prompt": RED, "seconds": 2, "seed": 4})
    assert status == 200 and video["object"] == "video"
    assert video["status"] in ("queued", "in_progress") and video["size"] == "128x128"
    done = _wait(gateway, video["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["frames"] == 48
    status, data = gateway.call("GET", f"/v1/videos/{video['id']}/content")
    assert status == 200
    # The mp4 helios-client writes of the same frames (H.264 is lossy: the same encoder and
    # settings, the same file).
    assert np.array_equal(mp4_frames(data), mp4_frames(_mp4(pipe.generate_video(RED, num_frames=48, seed=4), tmp_path)))
    listed = gateway.call("GET", "/v1/videos")[1]
    assert listed["object"] == "list" and video["id"] in [v["id"] for v in listed["data"]]
    assert gateway.call("DELETE", f"/v1/videos/{video['id']}") == (
        200, {"id": video["id"], "object": "video", "deleted": True})
    status, error = gateway.call("GET", f"/v1/videos/{video['id']}")
    assert status == 404
    assert error["error"]["message"] == (f"no video '{video['id']}' (finished videos are kept "
                                         f"86400 s at most)")


def test_a_form_post_makes_a_job_too(gateway):
    status, video = gateway.call("POST", "/v1/videos", form={"prompt": RED, "seconds": "1",
                                                             "size": "128x128"})
    assert status == 200, video
    assert _wait(gateway, video["id"])["status"] == "completed"
    gateway.call("DELETE", f"/v1/videos/{video['id']}")


@pytest.mark.parametrize("body,param,message", [
    ({"seconds": 2}, "prompt", "prompt is required"),
    ({"prompt": ""}, "prompt", "prompt must be 1 to 256 UTF-8 bytes of text, got an empty prompt"),
    ({"prompt": "x" * 257}, "prompt", "prompt must be 1 to 256 UTF-8 bytes of text, got 257 bytes"),
    ({"prompt": 5}, "prompt", "prompt must be a string, got int"),
    ({"prompt": RED, "seconds": 0}, "seconds", "seconds must be in (0, 60], got 0"),
    ({"prompt": RED, "seconds": 61}, "seconds", "seconds must be in (0, 60], got 61"),
    ({"prompt": RED, "seconds": "NaN"}, "seconds", "seconds must be in (0, 60], got 'NaN'"),
    ({"prompt": RED, "seed": -1}, "seed", "seed must be an integer in [0, 2**63-1], got -1"),
    ({"prompt": RED, "seed": 2**63}, "seed",
     "seed must be an integer in [0, 2**63-1], got 9223372036854775808"),
    ({"prompt": RED, "size": "1280x720"}, "size",
     "size must be 128x128 (the size this server generates), got '1280x720'"),
    ({"prompt": RED, "fps": 30}, "fps",
     "fps is not a field of a video request (prompt, seconds, seed, size, model)"),
])
def test_bad_fields_are_one_line_naming_them(gateway, body, param, message):
    status, error = gateway.call("POST", "/v1/videos", body)
    assert status == 400
    assert error == {"error": {"message": message, "type": "invalid_request_error",
                               "param": param, "code": 400}}


def test_bodies_are_bounded(gateway):
    status, error = gateway.call("POST", "/v1/videos", {"prompt": RED, "pad": "x" * 70000})
    assert status == 413
    assert error["error"]["message"] == "the request body must be at most 65536 bytes"


def test_beyond_the_session_limit_a_429_at_once(gateway):
    running = [gateway.call("POST", "/v1/videos", {"prompt": RED, "seconds": 30})[1]
               for _ in range(2)]
    try:
        t0 = time.monotonic()
        status, error = gateway.call("POST", "/v1/videos", {"prompt": RED, "seconds": 1})
        assert time.monotonic() - t0 < 5  # refused, not queued
        assert status == 429
        assert error["error"] == {"message": "too many videos generating: at most 2 at once "
                                             "(retry when one ends)",
                                  "type": "rate_limit_error", "param": None, "code": 429}
        with gateway.ws() as ws:  # a live session counts as well
            ws.send(json.dumps({"type": "start", "prompt": RED, "seconds": 1}))
            assert json.loads(ws.recv(timeout=10))["code"] == 429
    finally:
        for video in running:
            gateway.call("DELETE", f"/v1/videos/{video['id']}")
    # Deleting stops their streams and frees the slots.
    _idle(gateway)
    status, video = gateway.call("POST", "/v1/videos", {"prompt": RED, "seconds": 1})
    assert status == 200
    _wait(gateway, video["id"])
    _idle(gateway)


def _idle(gw, timeout=30):
    deadline = time.monotonic() + timeout
    while gw.call("GET", "/health")[1]["generating"]:
        assert time.monotonic() < deadline, "the gateway's videos did not end"
        time.sleep(0.1)


def _frames_and_messages(ws, until="done", timeout=60):
    frames, messages = {}, []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = ws.recv(timeout=timeout)
        if isinstance(m, bytes):
            frames[int.from_bytes(m[:4], "big")] = m[4:]
            continue
        messages.append(json.loads(m))
        if messages[-1]["type"] == until:
            return frames, messages
    raise AssertionError(messages[-3:])


def test_the_realtime_socket_starts_steers_and_stops(gateway, pipe, tmp_path):
    _idle(gateway)
    with gateway.ws() as ws:
        ws.send(json.dumps({"type": "update", "prompt": BLUE}))
        assert json.loads(ws.recv(timeout=10)) == {
            "type": "error", "message": "no video is playing in this session: start one first",
            "param": "type", "code": 409}
        ws.send(json.dumps({"type": "start", "prompt": "", "seconds": 2}))
        assert json.loads(ws.recv(timeout=10))["message"] == (
            "prompt must be 1 to 256 UTF-8 bytes of text, got an empty prompt")
        for bad in ("not json", b"\x00binary", "[1, 2]"):
            ws.send(bad)
            assert json.loads(ws.recv(timeout=10))["message"] == (
                "a message must be a JSON object with a type (start, update, shown or stop)")
        ws.send(json.dumps({"type": "start", "prompt": RED, "seconds": 4, "seed": 2}))
        started = json.loads(ws.recv(timeout=10))
        assert started["type"] == "started" and started["total"] == 96
        assert (started["width"], started["height"], started["fps"]) == (128, 128, 24)
        first = ws.recv(timeout=30)
        assert isinstance(first, bytes) and int.from_bytes(first[:4], "big") == 0
        before = {}
        for bad in (96, -1, "3", None):  # the page's report of the frame it shows
            ws.send(json.dumps({"type": "shown", "frame": bad}))
            got, messages = _frames_and_messages(ws, until="error")
            before.update(got)
            assert messages[-1] == {
                "type": "error", "param": "frame", "code": 400, "message":
                f"frame must be an integer in [0, 95] (a frame of this video), got {bad!r}"}
        ws.send(json.dumps({"type": "update", "prompt": BLUE}))
        frames, messages = _frames_and_messages(ws)
        frames.update(before)
    prompt = next(m for m in messages if m["type"] == "prompt")
    done = messages[-1]
    assert done["status"] == "completed" and done["frames"] == 96
    # Paced at a 0.25 s lead, the update holds from within about a second of video of the
    # frame the socket had delivered when it was sent.
    assert 4 <= prompt["from_frame"] <= 24 + 12, prompt
    assert sorted(frames) == list(range(1, 96))
    # The frames are those of the same switch in-process, as the gateway's JPEGs of them.
    want = pipe.generate_video(RED, num_frames=96, seed=2,
                               prompt_at=[(prompt["from_frame"] / 24, BLUE)])
    assert all(frames[i] == jpeg(want[i]) for i in range(1, 96))
    status, data = gateway.call("GET", done["content"])
    assert status == 200 and np.array_equal(mp4_frames(data), mp4_frames(_mp4(want, tmp_path)))


def test_stop_ends_a_live_video_and_keeps_what_it_showed(gateway):
    _idle(gateway)
    with gateway.ws() as ws:
        ws.send(json.dumps({"type": "start", "prompt": RED, "seconds": 30}))
        started = json.loads(ws.recv(timeout=10))
        ws.recv(timeout=30)  # a first frame
        ws.send(json.dumps({"type": "stop"}))
        _, messages = _frames_and_messages(ws)
    done = messages[-1]
    assert done["status"] == "completed" and 0 < done["frames"] < 720
    video = gateway.call("GET", f"/v1/videos/{started['id']}")[1]
    assert video["frames"] == done["frames"]


def test_without_the_token_a_401_everywhere(server, tmp_path):
    gw = Gateway(server.grpc, tmp_path, token=TOKEN)
    try:
        status, error = gw.call("GET", "/v1/videos")
        assert status == 401
        assert error["error"]["message"] == ("a bearer token is required "
                                             "(Authorization: Bearer <token>)")
        assert gw.call("GET", "/v1/videos", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert gw.call("GET", "/v1/videos",
                       headers={"Authorization": f"Bearer {TOKEN}"}) == (
            200, {"object": "list", "data": [], "has_more": False})
        with pytest.raises(InvalidStatus) as e:
            gw.ws().close()
        assert e.value.response.status_code == 401
        with gw.ws(f"?token={TOKEN}") as ws:
            ws.send(json.dumps({"type": "stop"}))
        assert gw.call("GET", "/config")[1]["token_required"] is True  # the page asks for it
        assert gw.call("GET", "/")[0] == 200
    finally:
        gw.stop()


def test_a_socket_from_another_origin_is_refused(gateway):
    with pytest.raises(InvalidStatus) as e:
        connect(f"ws://127.0.0.1:{gateway.port}/v1/realtime", open_timeout=10,
                origin="http://elsewhere.example").close()
    assert e.value.response.status_code == 403


def test_the_store_keeps_finished_videos_within_its_size_and_age(tmp_path):
    from helios_gateway.fields import VideoSpec
    from helios_gateway.videos import VideoStore

    store = VideoStore(tmp_path / "v", max_bytes=250, max_age_s=60)
    videos = []
    for i in range(4):
        v = store.add(VideoSpec(RED, 1.0, i), "128x128", 24, "job")
        v.path = store.folder / f"{v.id}.mp4"
        v.path.write_bytes(b"x" * 100)
        v.bytes, v.status, v.completed_at = 100, "completed", int(time.time()) - 10 + i
        videos.append(v)
    running = store.add(VideoSpec(RED, 1.0, 9), "128x128", 24, "job")
    assert store.prune() == [videos[0].id, videos[1].id]  # the oldest, until 200 <= 250
    assert not videos[0].path.exists() and videos[2].path.exists()
    videos[2].completed_at -= 120
    assert store.prune() == [videos[2].id]  # too old
    assert {v.id for v in store.all()} == {videos[3].id, running.id}


# ---- the page in a real browser ---------------------------------------------------------
CANVAS = """(() => {
  const c = document.getElementById('screen');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = ''; for (let i = 0; i < d.length; i += 4) s += String.fromCharCode(d[i], d[i + 1], d[i + 2]);
  return {width: c.width, height: c.height, rgb: btoa(s)};
})()"""


def _canvas(browser) -> np.ndarray:
    import base64
    c = browser.evaluate(CANVAS)
    return np.frombuffer(base64.b64decode(c["rgb"]), np.uint8).reshape(c["height"], c["width"], 3)


DOWNLOAD = """(async () => {
  const a = document.getElementById('download');
  const bytes = new Uint8Array(await (await fetch(a.href)).arrayBuffer());
  let s = ''; for (const x of bytes) s += String.fromCharCode(x);
  return {name: a.download, data: btoa(s)};
})()"""


@pytest.fixture(scope="module")
def shipped_gateway(tmp_path_factory):
    """A gateway before a server of the shipped checkpoint (weights/helios-tiny), whose
    frames show the prompt's object; every stage in one process (fast to start)."""
    from conftest import INSTANCES, ROOT
    from helios_triton.fill_repository import fill, values
    from helios_triton.server import TritonServer

    tmp = tmp_path_factory.mktemp("shipped")
    fill(tmp / "repo", values(ROOT / "weights" / "helios-tiny", "cpu", 1, True, INSTANCES, 0.5,
                              stages="fused"), fused=True)
    http, grpc, metrics = free_ports(3)
    srv = TritonServer(tmp / "repo", http, grpc, metrics, log_file=tmp / "server.log",
                       backends=tmp / "backends")
    srv.start(timeout=240)
    gw = Gateway(grpc, tmp)
    yield gw
    gw.stop()
    srv.stop()


@pytest.fixture
def browser():
    from browser import Browser
    b = Browser()
    yield b
    b.close()


def test_the_page_streams_steers_and_downloads_in_chromium(shipped_gateway, browser, tmp_path):
    import base64

    from helios.metrics import dominant_object

    gateway = shipped_gateway
    browser.open(gateway.url + "/")
    assert browser.wait_for("document.getElementById('served').textContent") == (
        "128x128 at 24 fps, up to 60 s")
    browser.evaluate(f"""document.getElementById('prompt').value = {json.dumps(RED)};
        document.getElementById('seconds').value = '10';
        document.getElementById('seed').value = '1';
        document.getElementById('start').click()""")
    browser.wait_for("window.heliosState.drawn >= 12")
    first = _canvas(browser)
    browser.wait_for("window.heliosState.drawn >= 16")
    later = _canvas(browser)
    assert not np.array_equal(first, later)  # the picture moves
    # Red for a red prompt, by the metric helios eval scores colour with.
    assert dominant_object(np.stack([first, later]))["color"] == "red"
    stats = browser.evaluate("""({first: document.getElementById('first').textContent,
        fps: document.getElementById('fps').textContent, state: window.heliosState})""")
    assert re.fullmatch(r"\d+ ms", stats["first"]) and stats["state"]["firstFrameMs"] > 0
    assert int(stats["fps"]) > 0
    shot = Path(os.environ.get("HELIOS_SCREENSHOT", tmp_path / "gateway.png"))
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A new prompt from the page holds from soon after the frame shown when it was sent: the
    # stream is paced, and the page reports the frame it shows, so the server is at most its
    # lead (6 frames) ahead of the picture itself; the update holds from the latent frame
    # after the one rendering (up to 8 more). 8-9 frames on an idle 2-core CPU, 6 with two
    # cores kept busy (docs/gateway.md): within one second of video, 24 frames.
    shown = browser.evaluate(f"""(() => {{
        document.getElementById('next-prompt').value = {json.dumps(BLUE)};
        document.getElementById('send').click();
        return window.heliosState.shown; }})()""")
    applied = browser.wait_for("window.heliosState.lastPrompt", timeout=10)
    assert applied["prompt"] == BLUE and 0 < applied["from_frame"] - shown <= 24, (shown, applied)
    assert browser.evaluate("window.heliosState.reports") > 0
    # ... and the picture dissolves into blue from that frame on, blue once the switch's
    # 0.5 s fade (12 frames) is over.
    after = []
    for frame in (applied["from_frame"] + 12, applied["from_frame"] + 16):
        browser.wait_for(f"window.heliosState.shown >= {frame}", timeout=20)
        after.append(_canvas(browser))
    assert dominant_object(np.stack(after))["color"] == "blue"
    # A page whose animation frames come late (a busy machine: here the next one held back
    # 0.5 s, 12 frames of video, while the frames go on arriving in time) drops the frames
    # past their time and draws the one due, as video players do: the picture keeps to the
    # clock the server paces by, instead of playing on half a second late.
    before = browser.evaluate("""(() => {
        const raf = window.requestAnimationFrame;
        window.requestAnimationFrame = (tick) => {
            window.requestAnimationFrame = raf;
            return setTimeout(() => raf(tick), 500); };
        return window.heliosState; })()""")
    browser.wait_for(f"window.heliosState.dropped > {before['dropped']}", timeout=10)
    now = browser.evaluate("window.heliosState")
    # 11-12 of the 12 dropped, the picture 13 frames on, on an idle 2-core CPU (2026-12-04).
    assert now["dropped"] - before["dropped"] >= 6, (before, now)
    assert now["shown"] - before["shown"] >= 10, (before, now)
    browser.wait_for("!document.getElementById('download').hidden", timeout=60)
    assert browser.evaluate("window.heliosState.status") == "completed, 240 frames"
    download = browser.evaluate(DOWNLOAD)
    assert download["name"].endswith(".mp4")
    assert len(mp4_frames(base64.b64decode(download["data"]))) == 240


@pytest.mark.parametrize("args,line", [
    (["--port", "0"], "--port must be in [1, 65535], got 0"),
    (["--port", "70000"], "--port must be in [1, 65535], got 70000"),
    (["--triton", "triton"], "--triton must be HOST:PORT with PORT in [1, 65535], got 'triton'"),
    (["--triton", "triton:0"],
     "--triton must be HOST:PORT with PORT in [1, 65535], got 'triton:0'"),
    (["--max-age-s", "nan"], "--max-age-s must be at least 1, got nan"),
    (["--max-sessions", "0"], "--max-sessions must be at least 1, got 0"),
    (["--lead-s", "61"], "--lead-s must be in [0, 60], got 61")])
def test_options_out_of_range_stop_the_gateway_in_one_line(tmp_path, capsys, args, line):
    from helios_gateway.__main__ import main  # noqa: PLC0415

    assert main(args + ["--store", str(tmp_path / "videos")]) == 2
    assert capsys.readouterr().err == f"helios-gateway: error: {line}\n"


def test_without_triton_the_gateway_says_so_and_is_not_ready(tmp_path):
    (closed,) = free_ports(1)
    gw = Gateway(closed, tmp_path)
    try:
        assert gw.call("GET", "/health") == (200, {"status": "ok", "generating": 0,
                                                    "max_sessions": 4})
        status, error = gw.call("GET", "/ready")
        assert status == 503
        assert error["error"]["message"].startswith(
            f"cannot reach the Triton server at 127.0.0.1:{closed} (grpc): ")
        status, error = gw.call("POST", "/v1/videos", {"prompt": RED})
        assert status == 503 and error["error"]["type"] == "server_error"
        assert error["error"]["message"].startswith("cannot reach the Triton server at ")
        with gw.ws() as ws:
            ws.send(json.dumps({"type": "start", "prompt": RED}))
            message = json.loads(ws.recv(timeout=20))
        assert message["type"] == "error" and message["code"] == 503
        assert gw.call("GET", "/v1/videos")[1]["data"] == []  # nothing half-made is listed
    finally:
        gw.stop()


def test_the_store_removes_only_its_own_files_at_start(tmp_path):
    from helios_gateway.videos import VideoStore

    (tmp_path / "video_old.mp4").write_bytes(b"x")
    (tmp_path / "video_old.partial.mp4").write_bytes(b"x")
    (tmp_path / "holiday.mp4").write_bytes(b"mine")
    VideoStore(tmp_path, 100, 60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holiday.mp4"]
