"""The agent's own socketcand client for its CAN source: the handshake, then every frame of a TCP read parsed at
once into a FrameBatch (agent/sources/canframes.py). python-can's client (agent/sources/socketcand.py, which
`open_bus` still gives other users) reads 1,024 bytes per select() and makes a `can.Message` per frame; this one
reads what the socket holds and imports no python-can.

Protocol (linux-can/socketcand doc/protocol.md), as a client in raw mode::

    server: < hi >
    client: < open BUS >     server: < ok >, or < error ... > (the bus is not served: the open fails)
    client: < rawmode >      server: < ok >; then frames, error frames, CAN FD frames as they come

The handshake reads element by element, so frames the server sends right after its `< ok >` (the real socketcand
does) stay in the buffer for the first read. It must finish within the bus's `connect_timeout_s`. A connection the
server closes is a BusError once every frame that came before the close has been handed over; a refused
connection fails the open at once (the source's backoff retries it).
"""

from __future__ import annotations

import select
import socket
import time
from collections import Counter

from agent.frames import FrameBatch
from agent.sources.canframes import concat_batches, parse_socketcand, split_batch
from agent.sources.canread import BusError

READ_BYTES = 65536
# A socketcand element for a classic frame is at most 52 bytes: reading beyond this many per frame wanted would
# only fill `pending`.
BYTES_PER_FRAME = 64
MAX_REPLY_BYTES = 512  # a handshake reply longer than this is no socketcand server


class SocketcandReader:
    def __init__(self, host: str, port: int, channel: str, name: str, connect_timeout_s: float) -> None:
        self.where = f"socketcand on {channel}@{host}:{port}"
        self.name = name
        self.dropped: Counter[str] = Counter()  # elements refused (agent/sources/canframes.py), by reason
        self.errors: Counter[str] = Counter()
        self._buf = b""
        self._pending = FrameBatch.empty(name)
        self._eof = False
        self._sock = socket.create_connection((host, int(port)), timeout=connect_timeout_s)
        try:
            deadline = time.monotonic() + connect_timeout_s
            self._expect(b"< hi >", deadline, "greeting")
            self._sock.sendall(f"< open {channel} >".encode("ascii"))
            self._expect(b"< ok >", deadline, f"< open {channel} >")
            self._sock.sendall(b"< rawmode >")
            self._expect(b"< ok >", deadline, "< rawmode >")
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    def _expect(self, want: bytes, deadline: float, what: str) -> None:
        while (end := self._buf.find(b">")) < 0:
            if len(self._buf) > MAX_REPLY_BYTES:
                raise BusError(f"{self.where}: no socketcand reply to {what}: {self._buf[:60]!r}...")
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusError(f"{self.where}: no reply to {what} within the connect timeout")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(MAX_REPLY_BYTES)
            except TimeoutError:
                continue
            if not chunk:
                raise BusError(f"{self.where}: the server closed the connection during the handshake ({what})")
            self._buf += chunk
        reply, self._buf = self._buf[: end + 1].strip(), self._buf[end + 1 :]
        if reply != want:
            text = reply[:200].decode("ascii", "replace")
            raise BusError(f"{self.where}: {what} answered {text!r}, not {want.decode()!r}")

    def _closed(self) -> BusError:
        return BusError(f"socketcand server {self.where} closed the connection")

    def wait(self, timeout: float) -> bool:
        if len(self._pending) or self._eof or b">" in self._buf:  # frames that came with the handshake's last reply
            return True
        ready, _, _ = select.select([self._sock], [], [], timeout)
        return bool(ready)

    def drain(self, limit: int) -> FrameBatch:
        if self._eof and not len(self._pending):
            raise self._closed()
        want = max(0, limit - len(self._pending)) * BYTES_PER_FRAME
        got = 0
        chunks = [self._buf]
        while got < want and not self._eof:
            try:
                chunk = self._sock.recv(READ_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                self._eof = True
                break
            chunks.append(chunk)
            got += len(chunk)
        buf = b"".join(chunks)
        parsed = parse_socketcand(buf, self.name)
        self._buf = buf[parsed.consumed :]  # at most MAX_ELEMENT_BYTES: an element still open
        self.dropped.update(parsed.refused)
        frames = concat_batches([self._pending, parsed.batch], self.name) if len(self._pending) else parsed.batch
        out, self._pending = split_batch(frames, limit)
        if not len(out) and self._eof:
            raise self._closed()
        return out

    def shutdown(self) -> None:
        self._sock.close()
