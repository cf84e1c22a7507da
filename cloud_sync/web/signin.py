"""Sign-in for the fleet page off loopback: one shared secret (a password or a long token) from the config, kept
there only as a salted scrypt hash; a session cookie after a correct one; failed attempts rate-limited.

Why this much and no more: the page is opened by a workshop on its own network, by a handful of people who share
one login (verdicts carry the name each types). A hash in `[web] password_hash` means the config file's readers
learn nothing they could sign in with; scrypt makes guessing from a stolen hash slow; the rate limit makes guessing
over the network slow; `hmac.compare_digest` keeps the comparison from leaking how much of a guess was right.

Sessions live in the server's memory (a restart signs everyone out): a random 256-bit token in an HttpOnly,
SameSite=Strict cookie (Secure when the page was reached over https), kept as its SHA-256 so the table itself holds
nothing a reader could replay, expiring after `[web] session_hours`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict, deque

COOKIE = "harvester_session"
# scrypt at N=2^14, r=8, p=1: 16 MiB and ~50 ms per check on a small server (RFC 7914's interactive figure).
_N, _R, _P = 2**14, 8, 1
HASH_FORMAT = re.compile(r"scrypt\$(\d{1,7})\$(\d{1,3})\$(\d{1,3})\$([A-Za-z0-9+/=]{16,88})\$([A-Za-z0-9+/=]{43,88})")
MAX_SESSIONS = 1000  # the oldest is dropped past this: memory stays bounded whoever signs in how often
FAILS_PER_CLIENT = 5  # failed attempts one client address may make per FAIL_WINDOW_S ...
FAILS_OVERALL = 30  # ... and all clients together (many addresses guessing at once)
FAIL_WINDOW_S = 60.0
MAX_PASSWORD_CHARS = 1024


def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$<salt>$<hash>` (base64): what `[web] password_hash` holds (`cloud-sync hash-password`)."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16) if salt is None else salt
    h = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${base64.b64encode(salt).decode()}${base64.b64encode(h).decode()}"


def hash_problem(stored: str) -> str | None:
    """Why `stored` is not a hash `check_password` can use (None: it is): a hand-edited or truncated one would
    otherwise refuse every password without saying why."""
    m = HASH_FORMAT.fullmatch(stored)
    if not m:
        return "not of the form cloud-sync hash-password prints (scrypt$N$r$p$salt$hash)"
    n, r, p = int(m[1]), int(m[2]), int(m[3])
    if n < 2 or n & (n - 1) or not 1 <= r * p < 2**30 or 128 * n * r > 1024 * 1024 * 1024:
        return f"scrypt parameters N={n}, r={r}, p={p} are not usable (N a power of 2, at most 1 GiB of memory)"
    return None


def check_password(password: str, stored: str) -> bool:
    """Whether `password` is the one `stored` (hash_password's form) was made from; False for a malformed hash."""
    m = HASH_FORMAT.fullmatch(stored)
    if not m or not password or len(password) > MAX_PASSWORD_CHARS:
        return False
    n, r, p = int(m[1]), int(m[2]), int(m[3])
    try:
        salt, want = base64.b64decode(m[4], validate=True), base64.b64decode(m[5], validate=True)
        got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(want),
                             maxmem=max(64 * 1024 * 1024, 129 * n * r * p))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got, want)


class Sessions:
    """Signed-in sessions: token → expiry, kept by the token's SHA-256."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._by_hash: OrderedDict[bytes, float] = OrderedDict()

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "replace")).digest()

    def new(self, now: float | None = None) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._by_hash[self._key(token)] = (time.monotonic() if now is None else now) + self.ttl_s
            while len(self._by_hash) > MAX_SESSIONS:
                self._by_hash.popitem(last=False)
        return token

    def valid(self, token: str | None, now: float | None = None) -> bool:
        if not token or len(token) > 100:
            return False
        now = time.monotonic() if now is None else now
        with self._lock:
            exp = self._by_hash.get(self._key(token))
            if exp is None:
                return False
            if exp <= now:
                del self._by_hash[self._key(token)]
                return False
            return True

    def end(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._by_hash.pop(self._key(token), None)


class Throttle:
    """Failed sign-ins per client address and overall in a sliding window: `wait_s` says how long until one more
    attempt is taken (0: now). Only failures count: a correct password is never slowed by its own earlier typos
    beyond the window."""

    def __init__(self, per_client: int = FAILS_PER_CLIENT, overall: int = FAILS_OVERALL,
                 window_s: float = FAIL_WINDOW_S) -> None:
        self.per_client, self.overall, self.window_s = per_client, overall, window_s
        self._lock = threading.Lock()
        self._all: deque[float] = deque()
        self._by_client: OrderedDict[str, deque[float]] = OrderedDict()

    def _trim(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.window_s:
            q.popleft()

    def wait_s(self, client: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(self._all, now)
            q = self._by_client.get(client, deque())
            self._trim(q, now)
            waits = [0.0]
            if len(q) >= self.per_client:
                waits.append(q[0] + self.window_s - now)
            if len(self._all) >= self.overall:
                waits.append(self._all[0] + self.window_s - now)
            return max(waits)

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._all.append(now)
            q = self._by_client.setdefault(client, deque())
            q.append(now)
            self._by_client.move_to_end(client)
            while len(self._by_client) > MAX_SESSIONS:  # addresses remembered: bounded too
                self._by_client.popitem(last=False)
