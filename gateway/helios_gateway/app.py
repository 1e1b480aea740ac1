"""The gateway's ASGI application (FastAPI on uvicorn): the page at ``/``, OpenAI-style
video jobs at ``/v1/videos`` and live sessions over the ``/v1/realtime`` WebSocket, all
reaching Triton's ``helios`` models through ``helios-client`` over gRPC streaming.

Limits: at most ``max_sessions`` videos generate at once, jobs and live sessions together
(beyond it a 429 at once, never a queue); request bodies are bounded, prompts are checked as
Triton checks them, and ``seconds`` has the gateway's own bound. CORS is closed unless origins
are named; with a token set, every ``/v1`` call needs ``Authorization: Bearer <token>`` (a
WebSocket may carry it as ``?token=``, since a browser cannot set its headers).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from helios_client import HeliosClient, ServerUnavailable
from helios_client.api import Served

from . import fields
from .live import LiveSession
from .videos import VideoStore, generate

STATIC = Path(__file__).parent / "static"


@dataclass
class GatewaySettings:
    triton_url: str = "localhost:8001"
    max_sessions: int = 4
    store_dir: Path = Path(".gateway/videos")
    max_store_bytes: int = 2 * 1024**3
    max_age_s: float = 24 * 3600
    max_seconds: float = 60.0
    default_seconds: float = 4.0
    fps: int = 24
    # How far a live session's stream may run ahead of its player. An update holds from the
    # next latent frame not yet rendered: up to the lead plus two latent frames past the
    # player's clock, and the page trails that clock (docs/gateway.md).
    lead_s: float = 0.25
    token: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 64 * 1024


class Slots:
    """At most ``size`` videos generating; ``take`` never waits."""

    def __init__(self, size: int):
        self.size, self.used = size, 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.size:
                return False
            self.used += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.used -= 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


class Gateway:
    """The state behind the routes: settings, the video store, the session slots and what
    Triton serves (asked once it is reachable)."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.store = VideoStore(settings.store_dir, settings.max_store_bytes, settings.max_age_s)
        self.slots = Slots(settings.max_sessions)
        self._served: Served | None = None

    def served(self) -> Served:
        """What Triton serves (frame size, longest prompt); ApiError 503 while it is
        unreachable."""
        if self._served is None:
            client = HeliosClient(self.settings.triton_url, "grpc", timeout_s=10)
            try:
                self._served = client.served()
            except ServerUnavailable as e:
                raise ApiError(503, str(e), "server_error") from None
            finally:
                client.close()
        return self._served

    def size_text(self) -> str:
        served = self.served()
        return f"{served.width}x{served.height}"

    def spec(self, body) -> fields.VideoSpec:
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object or a form")
        s = self.settings
        try:
            return fields.video_spec(body, s.max_seconds, s.default_seconds, self.served())
        except fields.FieldError as e:
            raise ApiError(400, str(e), param=e.field) from None

    def take_slot(self) -> None:
        if not self.slots.take():
            raise ApiError(429, f"too many videos generating: at most "
                                f"{self.settings.max_sessions} at once (retry when one ends)",
                           "rate_limit_error", headers={"Retry-After": "5"})

    def authorized(self, headers, query: str = "") -> bool:
        token = self.settings.token
        if token is None:
            return True
        given = headers.get("authorization", "")
        if given.startswith("Bearer "):
            given = given[len("Bearer "):]
        else:
            given = parse_qs(query).get("token", [""])[0]
        return secrets.compare_digest(given.encode(), token.encode())

    def origin_allowed(self, headers) -> bool:
        """A WebSocket from a page of another origin is refused unless that origin is named:
        browsers send cookies and reach loopback addresses from any page, and CORS does not
        cover WebSockets."""
        origin = headers.get("origin")
        if origin is None or origin in self.settings.cors_origins:
            return True
        return urlsplit(origin).netloc == headers.get("host")


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    gw = Gateway(settings or GatewaySettings())
    app = FastAPI(title="Helios gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw
    if gw.settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=gw.settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=gw.settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return e.response()

    @app.middleware("http")
    async def bearer(request: Request, call_next):
        if request.url.path.startswith("/v1/") and not gw.authorized(request.headers):
            return ApiError(401, "a bearer token is required (Authorization: Bearer <token>)",
                            "authentication_error",
                            headers={"WWW-Authenticate": "Bearer"}).response()
        return await call_next(request)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        """Liveness: the gateway answers; with how many videos generate now."""
        return {"status": "ok", "generating": gw.slots.used,
                "max_sessions": gw.settings.max_sessions}

    @app.get("/ready")
    async def ready():
        """Readiness: Triton answers ready now (not cached)."""
        client = HeliosClient(gw.settings.triton_url, "grpc", timeout_s=5)
        try:
            await asyncio.to_thread(client.check_ready)
        except ServerUnavailable as e:
            return ApiError(503, str(e), "server_error").response()
        finally:
            client.close()
        return {"status": "ready"}

    @app.get("/config")
    async def config():
        """What the page needs to know before it starts a session."""
        s = gw.settings
        served = await asyncio.to_thread(gw.served)
        return {"size": gw.size_text(), "fps": s.fps, "max_seconds": s.max_seconds,
                "max_prompt_bytes": served.max_prompt_bytes,
                "default_seconds": s.default_seconds, "lead_s": s.lead_s,
                "token_required": s.token is not None, "max_sessions": s.max_sessions}

    @app.post("/v1/videos")
    async def create_video(request: Request):
        body = await _body(request)
        spec = await asyncio.to_thread(gw.spec, body)
        size = gw.size_text()  # known once spec() has checked the size
        gw.take_slot()
        video = gw.store.add(spec, size, gw.settings.fps, "job")

        def run():
            try:
                generate(gw.store, video, HeliosClient(gw.settings.triton_url, "grpc"))
            finally:
                gw.slots.give()

        threading.Thread(target=run, name=f"job-{video.id}", daemon=True).start()
        return video.public()

    @app.get("/v1/videos")
    async def list_videos(limit: int = 100):
        videos = gw.store.all()
        shown = videos[:max(1, min(limit, 1000))]
        return {"object": "list", "data": [v.public() for v in shown],
                "has_more": len(videos) > len(shown)}

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str):
        return _video(gw, video_id).public()

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str):
        video = _video(gw, video_id)
        if video.status != "completed" or video.path is None or not video.path.exists():
            raise ApiError(409, f"video {video_id} is {video.status}: its content exists once "
                                f"it is completed", param="video_id")
        return FileResponse(video.path, media_type="video/mp4",
                            filename=f"{video_id}.mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str):
        _video(gw, video_id)
        gw.store.remove(video_id)
        return {"id": video_id, "object": "video", "deleted": True}

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        if not gw.authorized(ws.headers, ws.scope.get("query_string", b"").decode()):
            await ws.send_denial_response(ApiError(
                401, "a bearer token is required (Authorization: Bearer <token>, or ?token=)",
                "authentication_error").response())
            return
        if not gw.origin_allowed(ws.headers):
            await ws.send_denial_response(ApiError(
                403, f"origin {ws.headers.get('origin')} may not open a session here",
                "permission_error").response())
            return
        await ws.accept()
        try:
            await LiveSession(gw, ws).run()
        except WebSocketDisconnect:
            pass

    return app


def _video(gw: Gateway, video_id: str):
    video = gw.store.get(video_id)
    if video is None:
        raise ApiError(404, f"no video {video_id!r} (finished videos are kept "
                            f"{gw.settings.max_age_s:g} s at most)", param="video_id")
    return video


async def _body(request: Request) -> dict:
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        return json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413, whether it declares its length
    or streams it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = ApiError(413, f"the request body must be at most {self.limit} bytes")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error.response()(scope, receive, send)
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, bounded, send)
        except _TooLarge:
            await error.response()(scope, receive, send)


class _TooLarge(Exception):
    pass
