"""What every request passes before a route sees it (an ASGI middleware around the whole app):

- Host (DNS rebinding). A page on evil.example whose name is re-pointed at 127.0.0.1 can make the engineer's browser
  call this server as same-origin, and read the fleet. Its requests carry `Host: evil.example`, so every request's
  Host must be one this server knows, exactly: 127.0.0.1, localhost or [::1] with the bound port, the bound address
  with the port, or a value given with `--allow-host`. Anything else is 421 before a byte of data is read; no Host,
  or two, is 400. Starlette's TrustedHostMiddleware is not used: it drops the port before comparing (a server on
  another port of the same name would pass) and answers 400.
- Cross-site request forgery. Anything but GET/HEAD changes something, and any site the engineer visits can make the
  browser send a POST here (a form needs no permission). So it is taken only with an `Origin` (or, without one, a
  `Referer`) that is http(s) on a name this server answers to; 403 otherwise, before routing.
- Headers on every answer, refusals included: a Content-Security-Policy allowing no inline script or style and
  nothing from elsewhere, no framing, no sniffing, no referrer, no caching.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Our own files only, no inline code (an injected <script> or style= would not run), no framing, no forms.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"no-referrer"), (b"content-security-policy", CSP.encode())]


def accepted_hosts(bound: Iterable[str], port: int, allowed: Iterable[str] = ()) -> frozenset[str]:
    """The Host header values this server answers (lower case): the loopback names and the bound name/address with
    the port (without it only on port 80, where browsers leave it out), and each `allowed` value exactly."""
    names = {"127.0.0.1", "localhost", "[::1]"}
    for b in bound:
        if b not in ("", "0.0.0.0", "::"):  # a wildcard bind has no one name: use --allow-host
            names.add(f"[{b}]" if ":" in b else b)
    out = {f"{n}:{port}" for n in names} | (names if port == 80 else set())
    return frozenset(n.lower() for n in out | set(allowed))


def same_origin(origins: list[str], referers: list[str], accepted: frozenset[str]) -> bool:
    """Whether a request comes from a page this server served: its one `Origin` header (or, without any, its one
    `Referer`) is http or https on a name in `accepted`. "null" (a sandboxed or privacy-stripped origin) and two
    headers are refused: which one would a proxy have checked?"""
    values = origins or referers
    if len(values) != 1 or len(origins) > 1:
        return False
    u = urlsplit(values[0].strip())
    return u.scheme in ("http", "https") and u.netloc.lower() in accepted


def json_body(obj: Any) -> bytes:
    """JSON with markup characters escaped even inside strings: a vehicle id like "<script>" never appears raw in a
    response, whatever a browser or proxy decides to sniff it as."""
    text = json.dumps(obj, default=str, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def header_values(scope: Scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope["headers"] if k == name]


async def refuse(send: Send, status: int, error: str, close: bool = True) -> None:
    body = json_body({"error": error})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *HEADERS]
    if close:  # the request's body (if any) was never read: nothing may follow it on this connection
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The checks above, for an app whose accepted Host values are `accepted` (filled in once the port is known)."""

    def __init__(self, app: ASGIApp, accepted: set[str]) -> None:
        self.app = app
        self.accepted = accepted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts = header_values(scope, b"host")
        if len(hosts) != 1:
            await refuse(send, 400, "exactly one Host header is required")
            return
        if hosts[0].strip().lower() not in self.accepted:
            await refuse(send, 421, "this server does not answer to that Host")
            return
        if scope["method"] not in ("GET", "HEAD") and not same_origin(
                header_values(scope, b"origin"), header_values(scope, b"referer"), frozenset(self.accepted)):
            await refuse(send, 403, "refused: a change is taken only from this server's own page (Origin or Referer)")
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in HEADERS if h[0] not in have)]
            await send(message)

        await self.app(scope, receive, with_headers)
