"""A live session over the ``/v1/realtime`` WebSocket: start a video, change its prompt while
it plays, stop it; frames and progress come back as they are generated.

Messages from the browser (JSON text):
    {"type": "start", "prompt": ..., "seconds": ..., "seed": ...}
    {"type": "update", "prompt": ...}     the new prompt holds from the next latent frame
    {"type": "shown", "frame": ...}       the frame the page shows now (a few times a second)
    {"type": "stop"}
Messages to the browser:
    {"type": "started", "id", "fps", "width", "height", "total"}
    binary: a frame, 4 bytes of its index (big-endian) then a JPEG
    {"type": "progress", "frames", "total"}
    {"type": "prompt", "prompt", "from_frame"}   an update was applied from that frame
    {"type": "done", "id", "status", "frames", "content", "error"}
    {"type": "error", "message", "param", "code"}   the socket stays open

Frames travel as JPEGs drawn onto a canvas: a frame is shown as soon as it arrives (no
group of pictures to wait for, as fragmented MP4 through Media Source Extensions would
have, and no codec negotiation, which WebCodecs needs and headless browsers lack), and
JPEG keeps a 1280x720 frame at a small fraction of its 2.7 MB raw. The stream is paced
(``PACE_S``), so a prompt update shows within about the gateway's lead rather than after
frames made far ahead; the page reports the frame it shows, which the gateway hands on to the
stream (``HeliosClient.shown``), so that the lead is kept over the picture itself, however far
behind the server's model of the player a busy machine leaves the page.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect
from PIL import Image

from helios_client import HeliosClient, RequestError
from helios_client.api import is_unknown_session, new_session_id

from . import fields
from .videos import generate


def jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, "JPEG", quality=quality)
    return out.getvalue()


class LiveSession:
    """One socket's sessions, one video at a time (the module's docstring has the messages)."""

    def __init__(self, gateway, ws: WebSocket):
        self.gw, self.ws = gateway, ws
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.video = None
        self.session_id: str | None = None
        self.client = None
        self.ended = threading.Event()
        self.reporting: asyncio.Task | None = None  # a report of the frame shown, on its way

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_all())
        try:
            while True:
                received = await self.ws.receive()
                if received["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect(received.get("code", 1000))
                try:
                    message = json.loads(received.get("text") or "")
                    if not isinstance(message, dict):
                        raise ValueError
                except ValueError:
                    await self._error(400, "a message must be a JSON object with a type "
                                           "(start, update, shown or stop)", "type")
                    continue
                kind = message.pop("type", None)
                if kind == "start":
                    await self._start(message)
                elif kind == "update":
                    await self._update(message)
                elif kind == "shown":
                    await self._shown(message)
                elif kind == "stop":
                    if self.video is not None:
                        self.video.cancel.set()
                else:
                    await self._error(400, f"type must be start, update, shown or stop, got "
                                           f"{kind!r}", "type")
        finally:
            if self.video is not None and not self.ended.is_set():
                self.video.cancel.set()  # the browser went away: the stream stops
            sender.cancel()

    async def _start(self, message: dict) -> None:
        from .app import ApiError  # noqa: PLC0415 - the app module imports this one

        if self.video is not None and not self.ended.is_set():
            await self._error(409, "a video is already playing in this session: stop it first",
                              "type")
            return
        try:
            spec = await asyncio.to_thread(self.gw.spec, message)
            self.gw.take_slot()
        except ApiError as e:
            await self._error(e.status, e.message, e.param)
            return
        served, fps = self.gw.served(), self.gw.settings.fps
        video = self.video = self.gw.store.add(spec, self.gw.size_text(), fps, "live")
        # The stream's client: prompt updates go over its connection (videos.generate).
        self.session_id = new_session_id()
        self.client = HeliosClient(self.gw.settings.triton_url, "grpc")
        self.ended = threading.Event()
        self._put({"type": "started", "id": video.id, "fps": fps, "width": served.width,
                   "height": served.height, "total": video.total})
        ended = self.ended
        threading.Thread(target=self._generate, args=(video, ended), daemon=True,
                         name=f"live-{video.id}").start()

    def _generate(self, video, ended: threading.Event) -> None:
        def on_chunk(offset, frames):
            for i, frame in enumerate(frames):
                self._put(struct.pack(">I", offset + i) + jpeg(frame))
            self._put({"type": "progress", "frames": offset + len(frames), "total": video.total})

        try:
            generate(self.gw.store, video, self.client, self.session_id,
                     self.gw.settings.lead_s, on_chunk)
        finally:
            self.gw.slots.give()
            ended.set()
            self._put({"type": "done", "id": video.id, "status": video.status,
                       "frames": video.frames, "error": video.error,
                       "content": f"/v1/videos/{video.id}/content"
                       if video.status == "completed" else None})

    async def _update(self, message: dict) -> None:
        try:
            prompt = fields.prompt(message.get("prompt"), self.gw.served().max_prompt_bytes)
        except fields.FieldError as e:
            await self._error(400, str(e), e.field)
            return
        if self.video is None or self.ended.is_set():
            await self._error(409, "no video is playing in this session: start one first",
                              "type")
            return
        video, ended = self.video, self.ended
        try:  # a stream that has just started may not be known to Triton yet
            frame = await asyncio.to_thread(
                self.client.update, self.session_id, prompt, None, wait_s=5.0,
                stop=lambda: video.frames > 0 or ended.is_set())
        except RequestError as e:
            if is_unknown_session(e) and video.frames == 0 and not ended.is_set():
                await self._error(504, "the stream did not start within 5 s", None)
                return
            text, param = fields.renamed(str(e))
            await self._error(400 if e.invalid_argument else 502, text, param)
            return
        await self.ws.send_text(json.dumps({"type": "prompt", "prompt": prompt,
                                            "from_frame": frame}))

    async def _shown(self, message: dict) -> None:
        """The page shows this frame now: on to the stream's pacer. One report at a time; a
        report that comes while one is on its way is dropped, since the next one follows."""
        video, ended = self.video, self.ended
        if video is None or ended.is_set():
            return  # the video ended while the report was on its way: nothing to pace
        try:
            frame = fields.frame(message.get("frame"), video.total)
        except fields.FieldError as e:
            await self._error(400, str(e), e.field)
            return
        if self.reporting is None and video.frames > 0:  # beside the socket's other messages
            self.reporting = asyncio.create_task(self._report(frame, ended))

    async def _report(self, frame: int, ended: threading.Event) -> None:
        try:
            await asyncio.to_thread(self.client.shown, self.session_id, frame)
        except RequestError as e:
            if not (is_unknown_session(e) or ended.is_set()):  # not when the stream just ended
                text, param = fields.renamed(str(e))
                await self._error(400 if e.invalid_argument else 502, text, param)
        finally:
            self.reporting = None

    async def _error(self, code: int, message: str, param: str | None) -> None:
        await self.ws.send_text(json.dumps({"type": "error", "message": message,
                                            "param": param, "code": code}))

    def _put(self, item) -> None:
        """From any thread: queue a message (dict) or a frame (bytes) for the browser."""
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)

    async def _send_all(self) -> None:
        while True:
            item = await self.outbox.get()
            if isinstance(item, bytes):
                await self.ws.send_bytes(item)
            else:
                await self.ws.send_text(json.dumps(item))
