"""A SocketCAN raw socket read with recvmmsg(2): every frame the kernel has queued, up to `vlen` per system call,
into one preallocated buffer, turned into a FrameBatch in one go (agent/sources/canframes.py).

python-can's socketcan bus makes a select() and a recvmsg() and a `can.Message` per frame; at J1939 rates that,
and a thread wake-up per frame, was most of what the live agent spent. Here the CAN source sleeps while a batch
fills and then drains the socket in a few calls.

Per frame the kernel gives, besides the 16-byte `struct can_frame`, its receive time (SO_TIMESTAMPNS, as python-can
asks for) and the socket's count of frames it had to drop because the receive queue was full (SO_RXQ_OVFL, a
running total). The drops are counted (`dropped{rx_overflow}`): the queue must hold what arrives while the source
sleeps (`[[can]] read_interval_s`), so the socket asks for RCVBUF_BYTES of receive buffer (the kernel caps it at
net.core.rmem_max).

Classic CAN only: CAN FD frames are not asked for (no CAN_RAW_FD_FRAMES), so the kernel does not deliver them to
this socket. Error frames are (CAN_RAW_ERR_FILTER, all classes), as with python-can; they reach the decoder as bad
frames, counted there. The constants are Linux's generic ones (x86, ARM); ctypes sizes follow the platform.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import select
import socket
import time
from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.frames import FrameBatch
from agent.sources.canframes import CAN_FRAME, CAN_MTU, batch_from_can_frames, concat_batches
from agent.sources.canread import BusError

SOL_CAN_RAW = 101
CAN_RAW_ERR_FILTER = 2
CAN_ERR_MASK = 0x1FFFFFFF
SO_TIMESTAMPNS = 35
SO_RXQ_OVFL = 40
MSG_TRUNC = 0x20
MSG_DONTWAIT = 0x40
RCVBUF_BYTES = 1 << 20
VLEN = 256  # frames per recvmmsg call

_SIZE_T = ctypes.sizeof(ctypes.c_size_t)
_LONG = ctypes.sizeof(ctypes.c_long)


def _cmsg_align(n: int) -> int:
    return (n + _SIZE_T - 1) & ~(_SIZE_T - 1)


_CMSG_HDR = _cmsg_align(_SIZE_T + 8)  # struct cmsghdr: size_t cmsg_len; int cmsg_level; int cmsg_type
_TS_SPACE = _CMSG_HDR + _cmsg_align(2 * _LONG)  # struct timespec
_OVFL_SPACE = _CMSG_HDR + _cmsg_align(4)  # __u32
CONTROL_BYTES = _TS_SPACE + _OVFL_SPACE


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32), ("msg_iov", ctypes.c_void_p),
                ("msg_iovlen", ctypes.c_size_t), ("msg_control", ctypes.c_void_p),
                ("msg_controllen", ctypes.c_size_t), ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _uint(size: int) -> str:
    return f"=u{size}"


# The fields of struct mmsghdr that change per call, as numpy sees them: reset and read for all messages at once.
_HDR_VIEW = np.dtype({
    "names": ["controllen", "flags", "len"],
    "formats": [_uint(_SIZE_T), "=i4", "=u4"],
    "offsets": [_MsgHdr.msg_controllen.offset, _MsgHdr.msg_flags.offset,
                _MMsgHdr.msg_len.offset],
    "itemsize": ctypes.sizeof(_MMsgHdr),
})

# One message's control data as the kernel usually lays it out: the timestamp, then the drop count.
_CONTROL_VIEW = np.dtype({
    "names": ["len1", "level1", "type1", "sec", "nsec", "len2", "level2", "type2", "drops"],
    "formats": [_uint(_SIZE_T), "=i4", "=i4", f"=i{_LONG}", f"=i{_LONG}", _uint(_SIZE_T), "=i4", "=i4", "=u4"],
    "offsets": [0, _SIZE_T, _SIZE_T + 4, _CMSG_HDR, _CMSG_HDR + _LONG, _TS_SPACE, _TS_SPACE + _SIZE_T,
                _TS_SPACE + _SIZE_T + 4, _TS_SPACE + _CMSG_HDR],
    "itemsize": CONTROL_BYTES,
})

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int


def control_messages(control: bytes) -> tuple[float | None, int | None]:
    """The receive time and the drop count in one message's control data (walked as CMSG_NXTHDR does)."""
    ts: float | None = None
    drops: int | None = None
    at = 0
    while at + _CMSG_HDR <= len(control):
        length = int(np.frombuffer(control, _uint(_SIZE_T), 1, at)[0])
        level = int(np.frombuffer(control, "=i4", 1, at + _SIZE_T)[0])
        kind = int(np.frombuffer(control, "=i4", 1, at + _SIZE_T + 4)[0])
        if length < _CMSG_HDR or at + length > len(control):
            break
        data = control[at + _CMSG_HDR:at + length]
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 2 * _LONG:
            sec, nsec = np.frombuffer(data, f"=i{_LONG}", 2)
            ts = int(sec) + int(nsec) * 1e-9
        elif level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) >= 4:
            drops = int(np.frombuffer(data, "=u4", 1)[0])
        at += _cmsg_align(length)
    return ts, drops


def _bytes(buf: ctypes.Array[Any]) -> memoryview:
    """A ctypes buffer as bytes, for numpy views that share its memory (the kernel writes there)."""
    return memoryview(buf).cast("B")


def receive_times(control: npt.NDArray[np.uint8], controllen: npt.NDArray[np.uint64]
                  ) -> tuple[npt.NDArray[np.float64], int | None, npt.NDArray[np.bool_]]:
    """Per message (a row of `control`, `controllen` of it written by the kernel): its receive time; the last
    running drop count any of them carried (None: none did); which had no receive time (their time is NaN)."""
    k = control.shape[0]
    c = np.ascontiguousarray(control).view(_CONTROL_VIEW).reshape(k)
    # The kernel writes the timestamp first and the drop count after it: both read as columns where it did so,
    # the control data of any other message walked one message at a time.
    usual = ((c["level1"] == socket.SOL_SOCKET) & (c["type1"] == SO_TIMESTAMPNS)
             & (controllen >= _TS_SPACE) & (c["len1"] == _CMSG_HDR + 2 * _LONG))
    ts: npt.NDArray[np.float64] = c["sec"].astype(np.float64) + c["nsec"].astype(np.float64) * 1e-9
    has_drops = (usual & (controllen >= _TS_SPACE + _CMSG_HDR + 4) & (c["level2"] == socket.SOL_SOCKET)
                 & (c["type2"] == SO_RXQ_OVFL) & (c["len2"] == _CMSG_HDR + 4))
    count = np.where(has_drops, c["drops"].astype(np.int64), -1)  # the running total each message carried
    for i in np.flatnonzero(~usual).tolist():
        t, d = control_messages(control[i, :int(controllen[i])].tobytes())
        ts[i] = np.nan if t is None else t
        if d is not None:
            count[i] = d
    carried = count[count >= 0]
    return ts, (int(carried[-1]) if carried.size else None), np.isnan(ts)


def open_socketcan(channel: str) -> socket.socket:
    """A raw CAN socket bound to `channel` (OSError if the interface, or AF_CAN itself, does not exist)."""
    s = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    try:
        s.setsockopt(SOL_CAN_RAW, CAN_RAW_ERR_FILTER, CAN_ERR_MASK)
        s.bind((channel,))
    except OSError:
        s.close()
        raise
    return s


class RawCanReader:
    """Frames from a bound socket carrying `struct can_frame` datagrams (a SocketCAN raw socket; any datagram
    socket in tests). `dropped` counts, by reason, what the kernel or this reader could not hand over."""

    def __init__(self, sock: socket.socket, bus: str, vlen: int = VLEN) -> None:
        self.sock = sock
        self.bus = bus
        self.dropped: Counter[str] = Counter()  # frames lost: rx_overflow (the kernel's), short/long_record
        self.errors: Counter[str] = Counter()  # frames kept, with a fault: no_receive_time
        self._kernel_drops: int | None = None
        self._eof = False
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        self._vlen = vlen
        self._frames = (ctypes.c_ubyte * (vlen * CAN_MTU))()
        self._control = (ctypes.c_ubyte * (vlen * CONTROL_BYTES))()
        self._iov = (_IoVec * vlen)()
        self._hdrs = (_MMsgHdr * vlen)()
        frames_at = ctypes.addressof(self._frames)
        control_at = ctypes.addressof(self._control)
        for i in range(vlen):
            self._iov[i].iov_base = frames_at + i * CAN_MTU
            self._iov[i].iov_len = CAN_MTU
            h = self._hdrs[i].msg_hdr
            h.msg_iov = ctypes.addressof(self._iov[i])
            h.msg_iovlen = 1
            h.msg_control = control_at + i * CONTROL_BYTES
        self._hdr_view = np.frombuffer(_bytes(self._hdrs), _HDR_VIEW)
        self._frame_view = np.frombuffer(_bytes(self._frames), CAN_FRAME)
        self._control_view = np.frombuffer(_bytes(self._control), np.uint8).reshape(vlen, CONTROL_BYTES)
        self._closed = False

    def wait(self, timeout: float) -> bool:
        """Until a frame is queued (True) or `timeout` passes (False)."""
        if self._eof:
            return True
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def drain(self, limit: int) -> FrameBatch:
        """What is queued now, at most `limit` records (frames and refused records), without blocking."""
        if self._eof:
            raise BusError(f"CAN bus {self.bus}: the socket was closed")
        parts: list[FrameBatch] = []
        records = 0
        while records < limit and not self._eof:
            got = self._recv(min(self._vlen, limit - records))
            if got is None:
                break
            parts.append(got[0])
            records += got[1]
        out = concat_batches(parts, self.bus)
        if self._eof and not len(out):
            raise BusError(f"CAN bus {self.bus}: the socket was closed")
        return out

    def _recv(self, vlen: int) -> tuple[FrameBatch, int] | None:
        """One recvmmsg: its frames and how many records it took (refused ones too), or None when none is queued."""
        self._hdr_view["controllen"][:vlen] = CONTROL_BYTES
        self._hdr_view["flags"][:vlen] = 0
        k = self._recvmmsg(vlen)
        if k == 0:
            return None
        hdr = self._hdr_view[:k]
        size = hdr["len"]
        empty = np.flatnonzero(size == 0)
        if empty.size:  # no bytes: the end of a connected socket (a raw CAN socket never gives an empty record)
            self._eof = True
            k = int(empty[0])
            hdr, size = hdr[:k], size[:k]
        frames = self._frame_view[:k].copy()
        ts = self._times(k, hdr["controllen"])
        truncated = (hdr["flags"] & MSG_TRUNC) != 0
        ok = (size == CAN_MTU) & ~truncated
        if not ok.all():
            self.dropped["short_record"] += int((size < CAN_MTU).sum())
            self.dropped["long_record"] += int(truncated.sum())
            frames, ts = frames[ok], ts[ok]
        return batch_from_can_frames(frames, ts, self.bus), k

    def _recvmmsg(self, vlen: int) -> int:
        """Records received into the buffers; 0 when none is queued."""
        while True:
            k: int = _recvmmsg(self.sock.fileno(), ctypes.addressof(self._hdrs), vlen, MSG_DONTWAIT, None)
            if k >= 0:
                return k
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            if err != errno.EINTR:
                raise OSError(err, f"recvmmsg on CAN bus {self.bus}: {errno.errorcode.get(err, err)}")

    def _times(self, k: int, controllen: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
        """Receive times from the control data; the kernel's running drop count taken into `dropped`."""
        ts, total, unstamped = receive_times(self._control_view[:k], controllen)
        if unstamped.any():
            self.errors["no_receive_time"] += int(unstamped.sum())  # stamped when read instead
            ts[unstamped] = time.time()
        if total is not None:
            before = self._kernel_drops if self._kernel_drops is not None else 0
            if total != before:
                self.dropped["rx_overflow"] += (total - before) & 0xFFFFFFFF  # the count is a u32 that wraps
            self._kernel_drops = total
        return ts

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.sock.close()

