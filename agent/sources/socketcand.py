"""python-can's socketcand client, with two things it lacks for a source that must run unattended.

- The server closing the connection (a simulator restarted, socketcand stopped) reads, in python-can 4.6, as "no
  frame" for ever; here it is a `can.CanError`, so the CAN source counts it and reopens with backoff.
- It warns "Got incomplete message" each time a TCP read ends inside a frame, which is how TCP works and at real
  frame rates would flood the journal; that record is demoted to DEBUG.
- Its connect loop retries for 10 s without pausing and logs a warning per attempt; here one connection attempt
  is made first, within the bus's `connect_timeout_s`, and a refusal fails the open at once (the CAN source's
  backoff does the retrying).

Everything else (handshake `< hi >` / `< open BUS >` / `< rawmode >`, frame parsing) is python-can's own. This is
what `open_bus` gives (the simulator sends through it); the agent's CAN source reads socketcand with its own client,
agent/sources/socketcand_reader.py.
"""

from __future__ import annotations

import logging
import select
import socket
from typing import Any

import can
from can.interfaces.socketcand import SocketCanDaemonBus


class _TcpFramingIsNormal(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith("Got incomplete message"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


logging.getLogger("can.interfaces.socketcand.socketcand").addFilter(_TcpFramingIsNormal())


class SocketcandBus(SocketCanDaemonBus):
    def __init__(self, channel: str, host: str, port: int, connect_timeout_s: float, **kwargs: Any) -> None:
        with socket.create_connection((host, int(port)), timeout=connect_timeout_s):
            pass  # refused or unreachable: OSError here, not 10 s of python-can retrying
        super().__init__(channel, host, int(port), **kwargs)  # type: ignore[no-untyped-call]

    def _sock(self) -> socket.socket:
        s: socket.socket = self._SocketCanDaemonBus__socket  # type: ignore[attr-defined]  # private in python-can
        return s

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        # Checked before python-can reads too: a reset connection there is logged with a traceback, not raised.
        buffered = bool(self._SocketCanDaemonBus__message_buffer)  # type: ignore[attr-defined]
        if not buffered and self._peer_closed():
            raise can.CanError(f"socketcand server {self.channel_info} closed the connection")
        msg, filtered = super()._recv_internal(timeout)  # type: ignore[no-untyped-call]
        if msg is None and self._peer_closed():
            raise can.CanError(f"socketcand server {self.channel_info} closed the connection")
        return msg, bool(filtered)

    def _peer_closed(self) -> bool:
        s = self._sock()
        try:
            ready, _, _ = select.select([s], [], [], 0)
            return bool(ready) and s.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True
