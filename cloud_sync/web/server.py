"""The fleet page's server: the app (cloud_sync/web/app.py) behind its Guard, served by uvicorn on a socket bound
here, so that a port of 0 is known before serving and a bind error is the caller's at once (`cloud-sync web` turns
it into one line). `serve_forever` / `shutdown` / `server_close` / `server_address` as the standard library's
servers have them: the CLI, the tests and bench/ drive it the same way."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterable

import uvicorn

from cloud_sync.config import AssistantConfig, QualityConfig, WebConfig
from cloud_sync.db import FleetDB
from cloud_sync.web import signin
from cloud_sync.web.api import Api
from cloud_sync.web.app import Gate, Hub, create_app
from cloud_sync.web.chat import Chat
from cloud_sync.web.guard import Guard, accepted_hosts


class SignInError(ValueError):
    """Asked to serve off loopback without a secret to sign in with."""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Signals are the caller's (`cloud-sync web` stops on SIGTERM/SIGINT through `shutdown`): uvicorn would
        # otherwise take them over in the main thread and raise them again once it stopped.
        yield


class WebServer:
    def __init__(self, addr: tuple[str, int], api: Api, allowed_hosts: Iterable[str], sign_in: bool,
                 chat: Chat) -> None:
        self.api, self.chat = api, chat
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(addr)
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        # The name it was asked to listen on and the address that came of it (the same unless a name was given).
        bound = (addr[0], str(self.server_address[0]))
        self.accepted_hosts = accepted_hosts(bound, int(self.server_address[1]), allowed_hosts)
        cfg = api.cfg
        self.sessions = signin.Sessions(cfg.session_hours * 3600.0) if sign_in else None
        self.hub = Hub(api, cfg.stream_poll_s, cfg.max_streams)
        app = create_app(api, self.sessions, cfg.password_hash, cfg.secure_cookie, self.hub, chat)
        asgi = Guard(Gate(app, self.sessions), set(self.accepted_hosts))
        # proxy_headers: behind a reverse proxy on this machine its X-Forwarded-Proto/For count (https → Secure
        # cookie; the client's address for the sign-in rate limit); from anywhere else they are ignored.
        self._uvicorn = _Uvicorn(uvicorn.Config(asgi, log_level="warning", access_log=False, lifespan="off",
                                                server_header=False, proxy_headers=True,
                                                forwarded_allow_ips="127.0.0.1", timeout_keep_alive=5,
                                                timeout_graceful_shutdown=5))
        self._done = threading.Event()
        self._done.set()

    def serve_forever(self) -> None:
        self._done.clear()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        """Stops `serve_forever` (from another thread) and waits for it: live streams end, requests finish."""
        self.hub.stopping.set()
        self._uvicorn.should_exit = True
        self._done.wait()

    def server_close(self) -> None:
        self.socket.close()
        self.chat.close()


def make_server(db: FleetDB, host: str, port: int, allowed_hosts: Iterable[str] = (),
                cfg: WebConfig | None = None, quality: QualityConfig | None = None,
                sign_in: bool | None = None, assistant: AssistantConfig | None = None,
                clock: Callable[[], float] = time.time) -> WebServer:
    """The fleet page's server on (host, port); `cfg`: the `[web]` section, `quality` the `[quality]` one (their
    defaults when None), `assistant` the `[assistant]` one for the chat panel (None: the shipped knowledge base,
    indexed in memory; `clock`: where the assistant's "today" is, fixed by tests). UserError when its knowledge
    base index cannot be opened. Sign-in is asked for off loopback, for `allowed_hosts` names, and with `[web]
    require_sign_in`; `sign_in=False` turns it off, on loopback only. SignInError when it is needed and `[web]
    password_hash` is empty. The listen address has its defaults in one place, `cloud-sync web`'s options."""
    cfg = cfg if cfg is not None else WebConfig()
    allowed = list(allowed_hosts)
    if sign_in is None:
        sign_in = cfg.require_sign_in or not is_loopback(host) or bool(allowed)
    elif not sign_in and not is_loopback(host):
        raise SignInError(f"{host} is not a loopback address: the page asks for sign-in there")
    if sign_in and not cfg.password_hash:
        why = ("with --allow-host" if is_loopback(host) and allowed and not cfg.require_sign_in
               else "with [web] require_sign_in" if is_loopback(host) else f"on {host} (not loopback)")
        raise SignInError(f"the page asks for sign-in {why}, and [web] password_hash is empty: "
                          "set it to what `cloud-sync hash-password` prints")
    if sign_in and (problem := signin.hash_problem(cfg.password_hash)):
        raise SignInError(f"[web] password_hash is {problem}")
    chat = Chat(db, assistant, clock)
    try:
        return WebServer((host, port), Api(db, cfg, quality), allowed, sign_in, chat)
    except BaseException:
        chat.close()
        raise
