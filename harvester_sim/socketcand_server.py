"""The simulated CAN bus served over TCP with the socketcand protocol, so `harvester-agent simulate` and `run` can be
two processes on one host without any traffic leaving loopback (python-can's `virtual` bus lives in one process;
`udp_multicast` goes out through the network interface).

The server side of the subset of socketcand (https://github.com/linux-can/socketcand, doc/protocol.md) that
python-can's `socketcand` client speaks. Every element is `< ... >` in ASCII:

    server: < hi >                      on connect
    client: < open BUS >                server: < ok >  (BUS is the served bus name), else < error ... > and close
    client: < rawmode >                 server: < ok >; from then on every frame on the bus, to every client:
    server: < frame ID SECS.USECS DATA >
            ID: 3 hex digits (11-bit) or 8 (29-bit); DATA: the payload as hex, no spaces (may be empty)
    client: < send ID LEN B0 B1 ... >   accepted and counted (`client_frames`); the simulated bus does not listen
    anything else                       < error unknown command >; the connection stays

Only classic data frames are served: error, remote and CAN FD frames are counted (`frames_not_served`) and not
sent, as python-can's client parses none of them. A client that reads too slowly has its oldest frames dropped
beyond QUEUE_MAX (counted, `frames_dropped_slow_client`); one that stops reading altogether for SEND_TIMEOUT_S is
disconnected. A client that disconnects mid-line, sends garbage or an element longer than LINE_MAX costs only its
own connection. At most MAX_CLIENTS at a time; more are refused with an error. The server binds 127.0.0.1 unless
told otherwise.

python-can's client reads each handshake reply with a single recv() and wants it exact, so frames to a client
start RAWMODE_SETTLE_S after its `< ok >` to rawmode: sent at once they could arrive in the same read as the ok.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import can

log = logging.getLogger("harvester_sim.socketcand")

MAX_CLIENTS = 16  # each client costs two threads; more are refused with `< error too many clients >`
QUEUE_MAX = 20_000  # frames waiting per client (~10 s of the simulator's traffic)
LINE_MAX = 4096  # longest element accepted from a client
SEND_TIMEOUT_S = 5.0
RAWMODE_SETTLE_S = 0.2


def frame_element(msg: can.Message) -> str | None:
    """One frame as `< frame ... >`, or None for what the subset does not carry."""
    if msg.is_error_frame or msg.is_remote_frame or msg.is_fd or len(msg.data) > 8:
        return None
    ident = f"{msg.arbitration_id & 0x1FFFFFFF:08X}" if msg.is_extended_id else f"{msg.arbitration_id & 0x7FF:03X}"
    ts = max(0.0, msg.timestamp)
    secs = int(ts)
    usecs = min(999_999, round((ts - secs) * 1e6))
    return f"< frame {ident} {secs}.{usecs:06d} {bytes(msg.data).hex().upper()} >"


@dataclass(slots=True)
class _Client:
    sock: socket.socket
    peer: str
    queue: deque[str] = field(default_factory=deque)
    raw: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    wlock: threading.Lock = field(default_factory=threading.Lock)  # replies and frames never interleave
    closed: bool = False

    def put(self, data: bytes) -> None:
        with self.wlock:
            self.sock.sendall(data)


class SocketcandServer:
    """Serves one bus named `bus_name`; `send()` puts a frame on it (the simulator's bus.send)."""

    def __init__(self, port: int, bus_name: str = "can0", host: str = "127.0.0.1") -> None:
        self.bus_name = bus_name
        self.stats: Counter[str] = Counter()
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A restarted simulator takes its port back at once, not after TIME_WAIT.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
            self._listener.listen(8)
        except OSError:
            self._listener.close()
            raise
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._acceptor = threading.Thread(target=self._accept, name="socketcand-accept", daemon=True)
        self._acceptor.start()

    # --- the bus side ------------------------------------------------------------------------------------------

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        """To every client in rawmode; never blocks on a client."""
        element = frame_element(msg)
        if element is None:
            self.stats["frames_not_served"] += 1
            return
        self.stats["frames"] += 1
        with self._lock:
            clients = [c for c in self._clients if c.raw]
        for c in clients:
            with c.cond:
                if len(c.queue) >= QUEUE_MAX:
                    c.queue.popleft()
                    self.stats["frames_dropped_slow_client"] += 1
                c.queue.append(element)
                c.cond.notify()

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    @property
    def raw_clients(self) -> int:
        """Clients in rawmode: those every `send()` from now on reaches."""
        with self._lock:
            return sum(1 for c in self._clients if c.raw)

    def shutdown(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            self._drop(c)
        self._acceptor.join(5)

    # --- connections ---------------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.2)
                if not ready:
                    continue
                sock, addr = self._listener.accept()
            except OSError:  # closed by shutdown()
                return
            sock.settimeout(SEND_TIMEOUT_S)
            c = _Client(sock, f"{addr[0]}:{addr[1]}")
            with self._lock:
                full = len(self._clients) >= MAX_CLIENTS
                if not full:
                    self._clients.append(c)
            if full:
                self.stats["clients_refused"] += 1
                with contextlib.suppress(OSError):
                    sock.sendall(b"< error too many clients >")
                sock.close()
                continue
            self.stats["connections"] += 1
            log.info("socketcand client %s connected", c.peer)
            threading.Thread(target=self._serve, args=(c,), name=f"socketcand-{c.peer}", daemon=True).start()

    def _drop(self, c: _Client) -> None:
        with c.cond:
            if c.closed:
                return
            c.closed = True
            c.cond.notify_all()
        with self._lock:
            if c in self._clients:
                self._clients.remove(c)
        with contextlib.suppress(OSError):
            c.sock.close()

    def _serve(self, c: _Client) -> None:
        writer = threading.Thread(target=self._write, args=(c,), name=f"socketcand-tx-{c.peer}", daemon=True)
        try:
            c.put(b"< hi >")
            buf = b""
            while not self._stop.is_set() and not c.closed:
                ready, _, _ = select.select([c.sock], [], [], 0.2)
                if not ready:
                    continue
                chunk = c.sock.recv(4096)
                if not chunk:  # the client left, perhaps mid-element: what it half-sent goes with it
                    break
                buf += chunk
                while (end := buf.find(b">")) >= 0:
                    element, buf = buf[: end + 1], buf[end + 1 :]
                    if not self._command(c, element.strip(), writer):
                        return
                if len(buf) > LINE_MAX:
                    self.stats["bad_commands"] += 1
                    return
        except OSError as e:  # reset, timeout on a client that stopped reading, or our own shutdown
            if not self._stop.is_set() and not c.closed:
                self.stats["client_errors"] += 1
                log.info("socketcand client %s: %s", c.peer, e)
        finally:
            self._drop(c)
            log.info("socketcand client %s gone", c.peer)

    def _command(self, c: _Client, element: bytes, writer: threading.Thread) -> bool:
        """One `< ... >` from the client; False ends the connection."""
        try:
            words = element.decode("ascii").split()
        except UnicodeDecodeError:
            words = []
        if len(words) < 3 or words[0] != "<" or words[-1] != ">":
            self.stats["bad_commands"] += 1
            c.put(b"< error bad element >")
            return True
        cmd, args = words[1], words[2:-1]
        if cmd == "open":
            if args != [self.bus_name]:
                self.stats["bad_commands"] += 1
                c.put(f"< error could not open bus {' '.join(args)[:40]}; served: {self.bus_name} >"
                               .encode("ascii", "replace"))
                return False
            c.put(b"< ok >")
        elif cmd == "rawmode":
            c.put(b"< ok >")
            if not writer.is_alive() and not c.raw:
                writer.start()
        elif cmd == "send":
            self.stats["client_frames"] += 1
        else:
            self.stats["bad_commands"] += 1
            c.put(b"< error unknown command >")
        return True

    def _write(self, c: _Client) -> None:
        if self._stop.wait(RAWMODE_SETTLE_S):
            return
        c.raw = True
        try:
            while True:
                with c.cond:
                    while not c.queue and not c.closed:
                        c.cond.wait(0.5)
                    if c.closed:
                        return
                    lines = list(c.queue)
                    c.queue.clear()
                c.put("".join(lines).encode("ascii"))
                self.stats["frames_delivered"] += len(lines)
        except OSError as e:
            if not c.closed:
                self.stats["client_errors"] += 1
                log.info("socketcand client %s: %s; disconnected", c.peer, e)
        finally:
            self._drop(c)
