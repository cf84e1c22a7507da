"""`cloud-sync web`: a small page for people — the fleet, the alerts, and for an alert the signals the model saw.

Standard library only (`http.server`): the page is three files of our own (`cloud_sync/web_page.py`: HTML, CSS,
JavaScript; nothing fetched from elsewhere) over six JSON endpoints and two POSTs. Everything from the database came
from vehicles (or, for verdicts and breakdowns, from people typing) and is treated as hostile: JSON carries it with
markup characters escaped, the page inserts it with `textContent`, never as HTML, and the Content-Security-Policy
allows no inline script or style at all.

    GET /                               the page (and /static/page.js, /static/page.css)
    GET /api/fleet                      {"vehicles": [...]}          (Reports.fleet)
    GET /api/rollouts                   {"rollouts": [...]}          (Reports.rollouts, newest first)
    GET /api/alerts?vehicle=&state=&since=   {"alerts": [...]}       (Reports.alerts, newest first)
    GET /api/alert/<vehicle>/<seq>      {"alert": {...}, "series": {signal: [[ts, value], ...]}, "span": [t0, t1]}
    GET /api/verdicts?vehicle=&alert_id=     {"vehicle", "alert_id", "history": [...]}  (FleetDB.verdict_history)
    GET /api/quality?since=&until=&model=    the quality report                       (Reports.quality)
    POST /api/verdict   {"alert_id", "label", "fault", "note", "by", "vehicle"}  → {"verdict": {...}}
    POST /api/breakdown {"vehicle", "at", "fault", "note", "by"}                  → {"breakdown": {...}}

DNS rebinding: a page on evil.example whose name is re-pointed at 127.0.0.1 can make the engineer's browser call
this server as same-origin, and read the fleet. Its requests carry `Host: evil.example`, so every request's Host
must be one this server knows: 127.0.0.1, localhost or [::1] with the bound port, the bound address with the
port, or an exact value given with `--allow-host` (the name a reverse proxy forwards). Anything else is 421
before a byte of data is read; no Host, or two, is 400.

Cross-site request forgery: the two POSTs change the database, and any site the engineer visits can make the
browser send a POST here (a form needs no permission). So a POST is taken only when it comes from this page: its
`Origin` (or, without one, its `Referer`) must be http(s) on a name this server answers to (`accepted_hosts`),
else 403. It must also be `application/json` (415 otherwise: a form cannot send that type without a CORS
preflight, which this server never grants), carry a `Content-Length` (411) of at most MAX_POST_BYTES (413, read
no further), and hold a JSON object of text fields, each checked as the CLI checks it (cloud_sync/learning.py):
400 with the reason, nothing stored.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cloud_sync import web_page
from cloud_sync.config import QualityConfig, WebConfig
from cloud_sync.db import FleetDB, LearningError
from cloud_sync.present import clean_alert, plain
from cloud_sync.reports import Reports
from cloud_sync.times import TimeError, parse_time

log = logging.getLogger("cloud_sync.web")

_SEQ = re.compile(r"[0-9]{1,19}")  # ASCII digits only (int() would take "\u0663"); then bounded to 64 bits
SEQ_MAX = 2**63 - 1  # what both databases store
MAX_POST_BYTES = 32 * 1024  # a verdict's note is 2,000 characters: room for them at 4 bytes each and the rest
_POST_FIELDS = {"verdict": ("alert_id", "label", "fault", "note", "by", "vehicle"),
                "breakdown": ("vehicle", "at", "fault", "note", "by")}
# Our own files only, no inline code (an injected <script> or style= would not run), no framing, no forms.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class BadRequest(Exception):
    pass


def _alert_signals(alert: dict[str, Any], max_signals: int) -> list[str]:
    """The signals worth plotting: the top contributing features' signals first, then the snapshot's."""
    names: list[str] = []
    for f in alert.get("top_features") or []:
        if isinstance(f, list | tuple) and f and isinstance(f[0], str):
            names.append(f[0].split(":", 1)[0])
    snap = alert.get("snapshot")
    if isinstance(snap, dict):
        names += [k for k in snap if isinstance(k, str)]
    return list(dict.fromkeys(names))[:max_signals]


def _time(query: dict[str, list[str]], name: str) -> float | None:
    text = query.get(name, [""])[0]
    try:
        return parse_time(text) if text else None
    except TimeError as e:
        raise BadRequest(f"{name}: {e}") from None


def post_fields(kind: str, body: object) -> dict[str, str]:
    """The fields of a POST to /api/<kind>: a JSON object holding only that form's fields, each text (an absent
    one is ""); BadRequest otherwise."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    allowed = _POST_FIELDS[kind]
    unknown = sorted(str(k) for k in body if k not in allowed)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0][:40]!r} (a {kind} has {', '.join(allowed)})")
    bad = [k for k in allowed if not isinstance(body.get(k, ""), str)]
    if bad:
        raise BadRequest(f"{bad[0]} must be text")
    return {k: body.get(k, "") for k in allowed}


def same_origin(origins: list[str], referers: list[str], accepted: frozenset[str]) -> bool:
    """Whether a request comes from a page this server served: its one `Origin` header (or, without any, its one
    `Referer`) is http or https on a name in `accepted`. "null" (a sandboxed or privacy-stripped origin) and two
    headers are refused: which one would a proxy have checked?"""
    values = origins or referers
    if len(values) != 1 or len(origins) > 1:
        return False
    u = urlsplit(values[0].strip())
    return u.scheme in ("http", "https") and u.netloc.lower() in accepted


class Api:
    """The JSON side, without HTTP: easy to test, and the handler stays a thin shell."""

    def __init__(self, db: FleetDB, cfg: WebConfig, quality: QualityConfig | None = None) -> None:
        self.db = db
        self.cfg = cfg
        self.quality_cfg = quality if quality is not None else QualityConfig()
        self._lock = threading.Lock()  # one database connection behind many server threads

    def quality(self, query: dict[str, list[str]]) -> dict[str, Any]:
        since, until = _time(query, "since"), _time(query, "until")
        model = query.get("model", [""])[0] or None
        with self._lock:
            try:
                return Reports(self.db).quality(self.quality_cfg, since, until, model)
            except LearningError as e:
                raise BadRequest(str(e)) from None

    def verdicts(self, query: dict[str, list[str]]) -> dict[str, Any]:
        alert_id, vehicle = query.get("alert_id", [""])[0], query.get("vehicle", [""])[0] or None
        with self._lock:
            try:
                vehicle, history = self.db.verdict_history(alert_id, vehicle)
            except LearningError as e:
                raise BadRequest(str(e)) from None
        return {"vehicle": vehicle, "alert_id": alert_id, "history": [h.to_dict() for h in history]}

    def add_verdict(self, body: object) -> dict[str, Any]:
        f = post_fields("verdict", body)
        with self._lock:
            try:
                v = self.db.add_verdict(f["alert_id"], f["label"], fault=f["fault"] or None, note=f["note"],
                                        by=f["by"], vehicle=f["vehicle"] or None)
            except LearningError as e:
                raise BadRequest(str(e)) from None
        return {"verdict": v.to_dict()}

    def add_breakdown(self, body: object) -> dict[str, Any]:
        f = post_fields("breakdown", body)
        try:
            at = parse_time(f["at"])
        except TimeError as e:
            raise BadRequest(f"at: {e}") from None
        with self._lock:
            try:
                b = self.db.add_breakdown(f["vehicle"], at, f["fault"], note=f["note"], by=f["by"])
            except LearningError as e:
                raise BadRequest(str(e)) from None
        return {"breakdown": b.to_dict()}

    def fleet(self) -> dict[str, Any]:
        with self._lock:
            return {"vehicles": Reports(self.db).fleet()}

    def rollouts(self) -> dict[str, Any]:
        with self._lock:
            return {"rollouts": Reports(self.db).rollouts()}

    def alerts(self, query: dict[str, list[str]]) -> dict[str, Any]:
        vehicle = query.get("vehicle", [""])[0] or None
        state = query.get("state", [""])[0] or None
        if state not in (None, "open", "closed"):
            raise BadRequest("state must be open or closed")
        since_s = query.get("since", [""])[0]
        try:
            since = float(since_s) if since_s else None
        except ValueError:
            raise BadRequest("since must be a Unix time") from None
        if since is not None and not math.isfinite(since):
            raise BadRequest("since must be a Unix time")
        with self._lock:
            rows = Reports(self.db).alerts(vehicle, state, since)
        return {"alerts": [clean_alert(a) for a in reversed(rows)]}

    def alert(self, vehicle: str, seq_s: str) -> dict[str, Any] | None:
        if not _SEQ.fullmatch(seq_s) or int(seq_s) > SEQ_MAX:
            raise BadRequest("seq must be a non-negative integer")
        seq = int(seq_s)
        with self._lock:
            raw = Reports(self.db).alert(vehicle, seq)
            if raw is None:
                return None
            a = clean_alert(raw)
            w0 = a["window_start"] if a["window_start"] is not None else a["ts"]
            w1 = a["window_end"] if a["window_end"] is not None else w0
            if w0 is None or w1 is None or w1 < w0:
                return {"alert": a, "series": {}, "span": None}
            span = [w0 - self.cfg.context_s, w1 + self.cfg.context_s]
            # One query per signal so a fast signal cannot use up the point budget of the others, and an alert
            # naming no signal plots nothing (names=None would mean every signal the vehicle has).
            series: dict[str, list[tuple[float, float]]] = {}
            for name in _alert_signals(a, self.cfg.max_signals):
                series.update(Reports(self.db).signal_series(vehicle, span[0], span[1], [name],
                                                             max_points=self.cfg.max_points))
        return {"alert": a, "series": series, "span": span}


class Handler(BaseHTTPRequestHandler):
    server: WebServer
    # A client that announces a body and never sends it (or stalls mid-request) must not hold a thread for ever.
    timeout = 30.0

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        # Markup characters escaped even inside JSON strings: a vehicle id like "<script>" never appears raw in a
        # response, whatever a browser or proxy decides to sniff it as.
        text = json.dumps(plain(obj), default=str, allow_nan=False)  # a stored NaN sample is null, not a 500
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        self._send(status, text.encode(), "application/json")

    def _host_refused(self) -> bool:
        """Answers and returns True unless the request names this server in exactly one Host header."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            self._json(HTTPStatus.BAD_REQUEST, {"error": "exactly one Host header is required"})
            return True
        if hosts[0].strip().lower() not in self.server.accepted_hosts:
            self._json(HTTPStatus.MISDIRECTED_REQUEST, {"error": "this server does not answer to that Host"})
            return True
        return False

    def do_GET(self) -> None:
        if self._host_refused():
            return
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        api = self.server.api
        try:
            if not parts:
                self._send(HTTPStatus.OK, web_page.HTML.encode(), "text/html; charset=utf-8")
            elif parts == ["static", "page.js"]:
                self._send(HTTPStatus.OK, web_page.JS.encode(), "text/javascript; charset=utf-8")
            elif parts == ["static", "page.css"]:
                self._send(HTTPStatus.OK, web_page.CSS.encode(), "text/css; charset=utf-8")
            elif parts == ["api", "fleet"]:
                self._json(HTTPStatus.OK, api.fleet())
            elif parts == ["api", "rollouts"]:
                self._json(HTTPStatus.OK, api.rollouts())
            elif parts == ["api", "alerts"]:
                self._json(HTTPStatus.OK, api.alerts(parse_qs(url.query)))
            elif parts == ["api", "quality"]:
                self._json(HTTPStatus.OK, api.quality(parse_qs(url.query)))
            elif parts == ["api", "verdicts"]:
                self._json(HTTPStatus.OK, api.verdicts(parse_qs(url.query)))
            elif len(parts) == 4 and parts[:2] == ["api", "alert"]:
                res = api.alert(parts[2], parts[3])
                if res is None:
                    self._json(HTTPStatus.NOT_FOUND, {"error": "no such alert"})
                else:
                    self._json(HTTPStatus.OK, res)
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        except BadRequest as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception:
            log.exception("request %s failed", self.path)  # the reason stays in our log, not with the client
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})


    def do_POST(self) -> None:
        self.close_connection = True  # a refused request's body is never read: nothing may follow it
        if self._host_refused():
            return
        if not same_origin(self.headers.get_all("Origin") or [], self.headers.get_all("Referer") or [],
                           self.server.accepted_hosts):
            self._json(HTTPStatus.FORBIDDEN, {"error": "refused: a change is taken only from this server's own page "
                                              "(Origin or Referer)"})
            return
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
        if len(parts) != 2 or parts[0] != "api" or parts[1] not in _POST_FIELDS:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "the body must be application/json"})
            return
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) != 1 or not _SEQ.fullmatch(lengths[0].strip()) or self.headers.get("Transfer-Encoding"):
            self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "one Content-Length is required"})
            return
        if int(lengths[0]) > MAX_POST_BYTES:
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"the body is over {MAX_POST_BYTES} bytes"})
            return
        try:
            raw = self.rfile.read(int(lengths[0]))
        except OSError:  # stalled past `timeout`: nobody to answer
            return
        if len(raw) != int(lengths[0]):  # the client went away before sending its body
            return
        try:
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise BadRequest("the body is not JSON") from None
            api = self.server.api
            out = api.add_verdict(body) if parts[1] == "verdict" else api.add_breakdown(body)
            self._json(HTTPStatus.OK, out)
        except BadRequest as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception:
            log.exception("request %s failed", self.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})


class WebServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], api: Api, allowed_hosts: Iterable[str]) -> None:
        super().__init__(addr, Handler)
        self.api = api
        # The name it was asked to listen on and the address that came of it (the same unless a name was given).
        bound = (addr[0], str(self.server_address[0]))
        self.accepted_hosts = accepted_hosts(bound, int(self.server_address[1]), allowed_hosts)


def accepted_hosts(bound: Iterable[str], port: int, allowed: Iterable[str] = ()) -> frozenset[str]:
    """The Host header values this server answers (lower case): the loopback names and the bound name/address with
    the port (without it only on port 80, where browsers leave it out), and each `allowed` value exactly."""
    names = {"127.0.0.1", "localhost", "[::1]"}
    for b in bound:
        if b not in ("", "0.0.0.0", "::"):  # a wildcard bind has no one name: use --allow-host
            names.add(f"[{b}]" if ":" in b else b)
    out = {f"{n}:{port}" for n in names} | (names if port == 80 else set())
    return frozenset(n.lower() for n in out | set(allowed))


def make_server(db: FleetDB, host: str, port: int, allowed_hosts: Iterable[str] = (),
                cfg: WebConfig | None = None, quality: QualityConfig | None = None) -> WebServer:
    """The fleet page's server on (host, port); `cfg`: the `[web]` section, `quality` the `[quality]` one (their
    defaults when None). The listen address has its defaults in one place, `cloud-sync web`'s options."""
    return WebServer((host, port), Api(db, cfg if cfg is not None else WebConfig(), quality), allowed_hosts)
