"""The fleet page as a Starlette app: its routes, templates, static files, POST checks, sign-in gate and live
stream. cloud_sync/web/guard.py wraps it (Host, CSRF, headers); cloud_sync/web/api.py answers from the database.

A POST (after the Guard's Origin check) must be `application/json` (415 otherwise: a form cannot send that type
without a CORS preflight, which this server never grants), carry one `Content-Length` (411) of at most
MAX_POST_BYTES (413, read no further), arrive within BODY_TIMEOUT_S, and hold a JSON object of text fields, each
checked as the CLI checks it (cloud_sync/learning.py): 400 with the reason, nothing stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from cloud_sync.present import plain
from cloud_sync.web import signin
from cloud_sync.web.api import Api, BadRequest, parse_seq
from cloud_sync.web.chat import Busy, Chat, question_of
from cloud_sync.web.guard import json_body, refuse

log = logging.getLogger("cloud_sync.web")

HERE = Path(__file__).resolve().parent
MAX_POST_BYTES = 32 * 1024  # a verdict's note is 2,000 characters: room for them at 4 bytes each and the rest
BODY_TIMEOUT_S = 30.0  # a client that announces a body and stalls is answered by nobody after this
_LENGTH = re.compile(r"[0-9]{1,19}")
KEEPALIVE_S = 15.0  # a comment line on an idle stream: proxies that cut silent connections keep it
mimetypes.add_type("text/javascript", ".js")  # what the page's <script> needs; some systems' tables say otherwise
mimetypes.add_type("text/css", ".css")


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_body(plain(obj)), status, headers, media_type="application/json")


def _query(request: Request) -> dict[str, list[str]]:
    return {k: request.query_params.getlist(k) for k in request.query_params}


def _parts(request: Request) -> list[str]:
    """The path's segments as the client wrote them, each unquoted: a vehicle id may hold "/" (as %2F)."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    return [unquote(p) for p in raw.decode("latin-1").split("?")[0].split("/") if p]


def vehicle_url(vehicle: str) -> str:
    return "/vehicle/" + quote(vehicle, safe="")


class Hub:
    """The live stream's shared reads: the fleet and each vehicle's alert marks (Api.alert_marks), read at most once per
    `poll_s` however many pages are open, and the count of open streams (bounded)."""

    def __init__(self, api: Api, poll_s: float, max_streams: int) -> None:
        self.api, self.poll_s, self.max_streams = api, poll_s, max_streams
        self.open = 0
        self.stopping = threading.Event()  # set by WebServer.shutdown: every stream ends within a slice
        self._lock = asyncio.Lock()
        self._at = -1e18
        self._snap: tuple[list[dict[str, Any]], dict[str, tuple[int, int]]] = ([], {})

    async def snapshot(self) -> tuple[list[dict[str, Any]], dict[str, tuple[int, int]]]:
        async with self._lock:
            if time.monotonic() - self._at >= self.poll_s * 0.9:
                fleet = await run_in_threadpool(self.api.fleet)
                marks = await run_in_threadpool(self.api.alert_marks)
                self._snap, self._at = (fleet["vehicles"], marks), time.monotonic()
            return self._snap

    async def pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping.is_set() and time.monotonic() < end:
            await asyncio.sleep(min(0.2, max(0.0, end - time.monotonic())))


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json_body(plain(data)) + b"\n\n"


def _fleet_key(rows: list[dict[str, Any]]) -> str:
    """The fleet as it changes: without `last_seen_ago_s`, which changes every second by itself."""
    return json.dumps([{k: v for k, v in r.items() if k != "last_seen_ago_s"} for r in rows], default=str,
                      sort_keys=True)


class Gate:
    """Sign-in: when required, every request but the sign-in page, its POST and the static files needs a session.
    An API call without one is 401; a page is sent to /signin (and back after)."""

    PUBLIC = ("/signin", "/api/signin", "/api/session")

    def __init__(self, app: ASGIApp, sessions: signin.Sessions | None) -> None:
        self.app, self.sessions = app, sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (self.sessions is None or scope["type"] != "http" or path in self.PUBLIC or path.startswith("/static/")
                or self.sessions.valid(Request(scope).cookies.get(signin.COOKIE))):
            await self.app(scope, receive, send)
            return
        if path.startswith("/api/"):
            await refuse(send, 401, "sign in first (/signin)", close=False)
            return
        target = scope.get("raw_path", path.encode()).decode("latin-1")
        await RedirectResponse("/signin?next=" + quote(target, safe=""), 303)(scope, receive, send)


class Refused(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status


async def read_json(request: Request) -> Any:
    """The JSON body of a POST, after the checks in the module docstring; Refused or BadRequest otherwise."""
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise Refused(415, "the body must be application/json")
    lengths = request.headers.getlist("content-length")
    if len(lengths) != 1 or not _LENGTH.fullmatch(lengths[0].strip()) or "transfer-encoding" in request.headers:
        raise Refused(411, "one Content-Length is required")
    if int(lengths[0]) > MAX_POST_BYTES:
        raise Refused(413, f"the body is over {MAX_POST_BYTES} bytes")
    try:
        raw = await asyncio.wait_for(request.body(), BODY_TIMEOUT_S)
    except (ClientDisconnect, TimeoutError):  # gone, or stalled: whatever is answered goes nowhere or ends it
        raise Refused(400, "the body did not arrive") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("the body is not JSON") from None


def create_app(api: Api, sessions: signin.Sessions | None, password_hash: str, secure_cookie: bool,
               hub: Hub, chat: Chat) -> Starlette:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    templates = Jinja2Templates(env=env)
    throttle = signin.Throttle()

    def page(name: str, **context: Any) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return templates.TemplateResponse(request, name, {"sign_in": sessions is not None, **context},
                                              media_type="text/html; charset=utf-8")
        return endpoint

    async def vehicle_page(request: Request) -> Response:
        parts = _parts(request)
        if len(parts) != 2:
            return _json({"error": "not found"}, 404)
        return templates.TemplateResponse(request, "vehicle.html", {"sign_in": sessions is not None,
                                                                    "vehicle": parts[1]})

    async def alert_page(request: Request) -> Response:
        parts = _parts(request)
        if len(parts) != 3:
            return _json({"error": "not found"}, 404)
        try:
            seq = parse_seq(parts[2])
        except BadRequest as e:
            return _json({"error": str(e)}, 400)
        return templates.TemplateResponse(request, "alert.html", {"sign_in": sessions is not None,
                                                                  "vehicle": parts[1], "seq": seq,
                                                                  "vehicle_url": vehicle_url(parts[1])})

    def get(fn: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                res = await run_in_threadpool(fn, request)
            except BadRequest as e:
                return _json({"error": str(e)}, 400)
            return _json({"error": "no such " + res[1]}, 404) if isinstance(res, tuple) else _json(res)
        return endpoint

    def one_alert(request: Request) -> Any:
        parts = _parts(request)
        if len(parts) != 4:
            return (None, "alert")
        res = api.alert(parts[2], parts[3])
        return (None, "alert") if res is None else res

    def one_vehicle(request: Request) -> Any:
        parts = _parts(request)
        res = api.vehicle(parts[2], _query(request)) if len(parts) == 3 else None
        return (None, "vehicle") if res is None else res

    def post(fn: Callable[[Any], dict[str, Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                body = await read_json(request)
                return _json(await run_in_threadpool(fn, body))
            except Refused as e:
                return _json({"error": str(e)}, e.status, {"connection": "close"})
            except BadRequest as e:
                return _json({"error": str(e)}, 400)
        return endpoint

    async def ask(request: Request) -> Response:
        """The chat panel's question: checked as every POST is, then answered in a worker thread (the event loop,
        and with it every live stream, goes on while a slow question runs)."""
        try:
            question = question_of(await read_json(request))
            chat.begin()
        except Refused as e:
            return _json({"error": str(e)}, e.status, {"connection": "close"})
        except BadRequest as e:
            return _json({"error": str(e)}, 400)
        except Busy as e:
            return _json({"error": str(e)}, 503, {"retry-after": "2"})
        try:
            return _json(await run_in_threadpool(chat.ask, question))
        finally:
            chat.end()

    async def sign_in(request: Request) -> Response:
        if sessions is None:
            return _json({"signed_in": True, "required": False})
        client = request.client.host if request.client else ""
        wait = throttle.wait_s(client)
        if wait > 0:
            return _json({"error": f"too many failed attempts: try again in {int(wait) + 1} s"}, 429,
                         {"retry-after": str(int(wait) + 1)})
        try:
            body = await read_json(request)
        except Refused as e:
            return _json({"error": str(e)}, e.status, {"connection": "close"})
        except BadRequest as e:
            return _json({"error": str(e)}, 400)
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(password, str) or not await run_in_threadpool(signin.check_password, password,
                                                                          password_hash):
            throttle.failed(client)
            return _json({"error": "wrong password"}, 401)
        resp = _json({"signed_in": True, "required": True})
        secure = secure_cookie or request.url.scheme == "https"
        resp.set_cookie(signin.COOKIE, sessions.new(), max_age=int(sessions.ttl_s), path="/", secure=secure,
                        httponly=True, samesite="strict")
        return resp

    async def sign_out(request: Request) -> Response:
        if sessions is not None:
            sessions.end(request.cookies.get(signin.COOKIE))
        resp = _json({"signed_in": False})
        resp.delete_cookie(signin.COOKIE, path="/", httponly=True, samesite="strict")
        return resp

    async def session(request: Request) -> Response:
        required = sessions is not None
        ok = not required or (sessions is not None and sessions.valid(request.cookies.get(signin.COOKIE)))
        return _json({"required": required, "signed_in": ok})

    async def stream(request: Request) -> Response:
        """Server-sent events: `fleet` (every vehicle's row, when any changed) and `alerts` (`{"new": [...]}`,
        the alert records stored since the last one, newest first)."""
        if hub.open >= hub.max_streams:
            return _json({"error": f"{hub.max_streams} live pages are open already: this one polls"}, 503)
        hub.open += 1
        token = request.cookies.get(signin.COOKIE)

        def signed_out() -> bool:  # a session that ended (signed out, expired) ends its stream too
            return sessions is not None and not sessions.valid(token)

        async def events() -> AsyncIterator[bytes]:
            try:
                fleet, marks = await hub.snapshot()
                key = _fleet_key(fleet)
                yield b"retry: 5000\n" + _event("fleet", {"vehicles": fleet})
                beat = time.monotonic()
                while not hub.stopping.is_set():
                    await hub.pause(hub.poll_s)
                    if hub.stopping.is_set() or signed_out():
                        break
                    fleet, now_marks = await hub.snapshot()
                    if _fleet_key(fleet) != key:
                        key = _fleet_key(fleet)
                        yield _event("fleet", {"vehicles": fleet})
                        beat = time.monotonic()
                    if now_marks != marks:
                        new = await run_in_threadpool(api.alerts_after, marks, now_marks)
                        marks = now_marks
                        yield _event("alerts", {"new": new})
                        beat = time.monotonic()
                    if time.monotonic() - beat >= KEEPALIVE_S:
                        yield b": keepalive\n\n"
                        beat = time.monotonic()
            finally:
                hub.open -= 1

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})  # nginx: pass each event at once

    async def not_found(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 404
        return _json({"error": "not found" if code == 404 else "method not allowed"}, code)

    async def failed(request: Request, exc: Exception) -> Response:
        log.error("request %s failed", request.url.path, exc_info=exc)  # the reason stays in our log
        return _json({"error": "internal error"}, 500)

    routes = [
        Route("/", page("fleet.html")),
        Route("/signin", page("signin.html")),
        Route("/vehicle/{rest:path}", vehicle_page),
        Route("/alert/{rest:path}", alert_page),
        Route("/api/fleet", get(lambda r: api.fleet())),
        Route("/api/rollouts", get(lambda r: api.rollouts())),
        Route("/api/alerts", get(lambda r: api.alerts(_query(r)))),
        Route("/api/quality", get(lambda r: api.quality(_query(r)))),
        Route("/api/verdicts", get(lambda r: api.verdicts(_query(r)))),
        Route("/api/alert/{rest:path}", get(one_alert)),
        Route("/api/vehicle/{rest:path}", get(one_vehicle)),
        Route("/api/stream", stream),
        Route("/api/session", session),
        Route("/api/verdict", post(api.add_verdict), methods=["POST"]),
        Route("/api/breakdown", post(api.add_breakdown), methods=["POST"]),
        Route("/api/ask", ask, methods=["POST"]),
        Route("/api/signin", sign_in, methods=["POST"]),
        Route("/api/signout", sign_out, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: failed})
    return app

