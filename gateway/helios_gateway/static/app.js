// The Helios page: one live session over /v1/realtime. Frames arrive as JPEGs (4 bytes of
// frame index first) and are drawn at the video's frame rate from the first one on.
"use strict";
const $ = (id) => document.getElementById(id);
const canvas = $("screen"), ctx = canvas.getContext("2d");
// Read by the browser tests through the DevTools protocol.
const state = window.heliosState = {
  status: "idle", drawn: 0, dropped: 0, shown: -1, received: 0, reports: 0, firstFrameMs: null,
  fps: 0,
  videoId: null,
  lastPrompt: null, error: null,
};
let ws = null, queue = [], playing = null, clickedAt = 0, arrivals = [], config = null;

function token() { return $("token").value || localStorage.getItem("helios-token") || ""; }
function authHeaders() { return token() ? { Authorization: `Bearer ${token()}` } : {}; }
function say(text) { $("message").textContent = text || ""; state.error = text || null; }
function setStatus(s) { state.status = s; $("status").textContent = s; }

async function loadConfig() {
  const r = await fetch("/config");
  if (!r.ok) { say((await r.json()).error.message); return; }
  config = await r.json();
  $("served").textContent = `${config.size} at ${config.fps} fps, up to ${config.max_seconds} s`;
  $("seconds").max = config.max_seconds;
  $("prompt").maxLength = $("next-prompt").maxLength = config.max_prompt_bytes;
  $("token-label").hidden = !config.token_required;
}

function start(event) {
  event.preventDefault();
  say("");
  if (ws) ws.close();
  queue = []; arrivals = []; state.drawn = 0; state.dropped = 0; state.shown = -1;
  state.received = 0; state.reports = 0;
  state.firstFrameMs = null; state.videoId = null;
  $("download").hidden = true; $("first").textContent = "-"; $("fps").textContent = "-";
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const query = token() ? `?token=${encodeURIComponent(token())}` : "";
  ws = new WebSocket(`${proto}://${location.host}/v1/realtime${query}`);
  ws.binaryType = "arraybuffer";
  clickedAt = performance.now();
  setStatus("connecting");
  ws.onopen = () => ws.send(JSON.stringify({
    type: "start", prompt: $("prompt").value, seed: Number($("seed").value),
    seconds: Number($("seconds").value),
  }));
  ws.onmessage = (m) => (typeof m.data === "string" ? onMessage(JSON.parse(m.data)) : onFrame(m.data));
  ws.onclose = () => { if (state.status === "playing" || state.status === "connecting") setStatus("closed"); };
  ws.onerror = () => say("the connection to the gateway failed");
}

function onMessage(m) {
  if (m.type === "started") {
    state.videoId = m.id;
    canvas.width = m.width; canvas.height = m.height;
    setStatus("playing");
    $("current-prompt").textContent = $("prompt").value;
    $("stop").disabled = false; $("send").disabled = false;
    startPlayback(m.fps);
  } else if (m.type === "progress") {
    $("frames").textContent = `${m.frames} / ${m.total}`;
  } else if (m.type === "prompt") {
    state.lastPrompt = m;
    $("current-prompt").textContent = `${m.prompt} (from frame ${m.from_frame})`;
  } else if (m.type === "done") {
    $("stop").disabled = true; $("send").disabled = true;
    if (m.status === "completed") {
      offerDownload(m.content);
      setStatus(`completed, ${m.frames} frames`);
    } else {
      setStatus("failed");
      say(m.error ? m.error.message : "the video failed");
    }
  } else if (m.type === "error") {
    say(m.message);
    if (state.status === "connecting") setStatus("idle");
  }
}

// Decoded one after another, so that the queue keeps the frames' order.
let decoding = Promise.resolve();
function onFrame(data) { decoding = decoding.then(() => decodeFrame(data)); }

async function decodeFrame(data) {
  const index = new DataView(data).getUint32(0);
  const bitmap = await createImageBitmap(new Blob([data.slice(4)], { type: "image/jpeg" }));
  state.received += 1;
  const now = performance.now();
  arrivals.push(now);
  while (arrivals.length && arrivals[0] < now - 1000) arrivals.shift();
  state.fps = arrivals.length;
  $("fps").textContent = String(arrivals.length);
  queue.push({ index, bitmap, arrived: now });
}

const REPORT_MS = 250;
function startPlayback(fps) {
  if (playing) cancelAnimationFrame(playing);
  let t0 = null, next = 0, reportedAt = -Infinity;
  const due = (k) => t0 + (k * 1000) / fps;
  const tick = (now) => {
    // Frame `next` is due at t0 + next / fps. At the first frame, or when the stream fell
    // behind the clock (the frame due arrived more than a frame late), the clock restarts at
    // the frame now drawn: a late stream plays on at its frame rate, nothing skipped. When the
    // page itself fell behind (a busy CPU slows its animation frames), the frames already
    // past their time are dropped and the latest due one drawn, as video players do: the
    // picture keeps to the clock, which the server paces its stream and prompt updates by.
    if (queue.length && (t0 === null || now >= due(next))) {
      if (t0 === null || queue[0].arrived > due(next) + 1000 / fps) t0 = now - (next * 1000) / fps;
      while (queue.length > 1 && now >= due(next + 1)) {
        queue.shift().bitmap.close();
        state.dropped += 1; next += 1;
      }
      const frame = queue.shift();
      if (state.firstFrameMs === null) {
        state.firstFrameMs = Math.round(now - clickedAt);
        $("first").textContent = `${state.firstFrameMs} ms`;
      }
      ctx.drawImage(frame.bitmap, 0, 0, canvas.width, canvas.height);
      frame.bitmap.close();
      state.shown = frame.index; state.drawn += 1; next += 1;
      // The frame on screen, a few times a second: the server keeps its lead over it.
      if (now - reportedAt >= REPORT_MS && ws && ws.readyState === WebSocket.OPEN) {
        ws.send(JSON.stringify({ type: "shown", frame: frame.index }));
        reportedAt = now; state.reports += 1;
      }
    }
    playing = requestAnimationFrame(tick);
  };
  playing = requestAnimationFrame(tick);
}

async function offerDownload(path) {
  const r = await fetch(path, { headers: authHeaders() });
  if (!r.ok) { say(`the download failed: ${(await r.json()).error.message}`); return; }
  const link = $("download");
  link.href = URL.createObjectURL(await r.blob());
  link.download = `${state.videoId}.mp4`;
  link.hidden = false;
}

$("start-form").addEventListener("submit", start);
$("stop").addEventListener("click", () => ws && ws.send(JSON.stringify({ type: "stop" })));
$("update-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (ws) ws.send(JSON.stringify({ type: "update", prompt: $("next-prompt").value }));
});
$("token").addEventListener("change", () => localStorage.setItem("helios-token", $("token").value));
loadConfig();
