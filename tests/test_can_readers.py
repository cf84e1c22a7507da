"""The CAN source's bulk readers on real sockets: SocketCAN's `struct can_frame` records through recvmmsg, and
socketcand's text through the agent's own client against the simulator's server and against hand-written servers.

AF_CAN does not exist on this machine (no SocketCAN in the kernel here), so the raw reader is tested on a real
AF_UNIX socketpair carrying the same 16-byte datagrams: the same recvmmsg call, the same kernel timestamps
(SO_TIMESTAMPNS), a real receive queue. Only opening an AF_CAN socket and the kernel's drop counter (SO_RXQ_OVFL,
which AF_UNIX does not report) cannot happen here; the drop counter's control data is built as the kernel lays it
out and read by the same code."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import can
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import CanBusConfig
from agent.frames import PAD, FrameBatch
from agent.metrics import Metrics
from agent.records import Event
from agent.sources.can import CanSource, open_reader
from agent.sources.canframes import MAX_ELEMENT_BYTES, parse_socketcand
from agent.sources.canread import BusError, FrameReader
from agent.sources.rawcan import (
    _CMSG_HDR,
    _LONG,
    _SIZE_T,
    CONTROL_BYTES,
    SO_RXQ_OVFL,
    SO_TIMESTAMPNS,
    RawCanReader,
    receive_times,
)
from agent.sources.socketcand_reader import SocketcandReader
from harvester_sim.socketcand_server import SocketcandServer, frame_element
from tests.test_uplink import wait_for

EFF, RTR, ERR = 0x80000000, 0x40000000, 0x20000000


def can_frame(can_id: int, data: bytes, length: int | None = None) -> bytes:
    """Linux `struct can_frame`, native byte order: u32 id | u8 len | 3 pad | 8 data."""
    return struct.pack("=IB3x8s", can_id, len(data) if length is None else length, data.ljust(8, b"\0"))


def _same(a: FrameBatch, b: FrameBatch) -> None:
    assert a.can_id.tolist() == b.can_id.tolist()
    assert a.extended.tolist() == b.extended.tolist()
    assert a.bad.tolist() == b.bad.tolist()
    assert a.dlc.tolist() == b.dlc.tolist()
    assert a.data.tolist() == b.data.tolist()
    np.testing.assert_allclose(a.ts, b.ts, rtol=0, atol=1e-6)


# --- socketcand text -----------------------------------------------------------------------------------------

frames_st = st.lists(st.tuples(st.booleans(), st.integers(0, 0x1FFFFFFF), st.binary(max_size=8),
                               st.floats(0, 4e9, allow_nan=False)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(frames_st, st.data())
def test_socketcand_text_parses_as_python_cans_client_parses_it(frames: list[tuple[bool, int, bytes, float]],
                                                                 data: st.DataObject) -> None:
    """Reference: python-can's own element parser, frame by frame. The stream is cut where TCP might cut it."""
    from can.interfaces.socketcand.socketcand import convert_ascii_message_to_can_message

    msgs = [can.Message(timestamp=ts, arbitration_id=i if ext else i & 0x7FF, is_extended_id=ext, data=d)
            for ext, i, d, ts in frames]
    elements = [frame_element(m) for m in msgs]
    assert all(e is not None for e in elements)
    text = "".join(e for e in elements if e is not None).encode("ascii")
    reference = FrameBatch.from_messages([convert_ascii_message_to_can_message(e) for e in elements if e], "can0")
    cut = data.draw(st.integers(0, len(text)))
    first = parse_socketcand(text[:cut], "can0")
    rest = text[first.consumed:cut] + text[cut:]
    second = parse_socketcand(rest, "can0")
    assert second.consumed == len(rest)
    assert not first.refused and not second.refused
    got = FrameBatch(*(np.concatenate([getattr(first.batch, f), getattr(second.batch, f)])
                       for f in ("ts", "can_id", "dlc", "data", "extended", "bad")), "can0")
    _same(got, reference)


@pytest.mark.parametrize(("element", "reason"), [
    (b"< ok >", "bad_element"),
    (b"< frame 1FEEE00 1.000000 00 >", "bad_element"),  # 7 digits: neither 11- nor 29-bit
    (b"< frame 800 1.000000 00 >", "bad_element"),  # 3 digits above 0x7FF: no such 11-bit identifier
    (b"< frame 123 1.000000 0 >", "bad_element"),  # half a byte
    (b"< frame 123 1 00 >", "bad_element"),  # not SECS.USECS
    (b"< frame 123 1.000000 " + b"00" * 65 + b" >", "bad_element"),  # beyond CAN FD's 64 bytes
    (b"< frame 123 1.0\x00 00 >", "bad_element"),
    (b"< frame 18FEEE00 1700000000.000001 0102", "bad_element"),  # never closed before the next one
])
def test_what_is_no_frame_is_refused_and_counted(element: bytes, reason: str) -> None:
    good = b"< frame 18FEEE00 1700000000.000001 0102 >"
    parsed = parse_socketcand(good + element + good, "can0")
    assert parsed.refused == {reason: 1}
    assert parsed.batch.can_id.tolist() == [0x18FEEE00, 0x18FEEE00]
    assert parsed.consumed == len(good + element + good)


def test_an_element_that_never_ends_is_dropped_once_too_long_to_be_one() -> None:
    good = b"< frame 18FEEE00 1700000000.000001 0102 >"
    open_end = good + b"< frame 123 1700000000.000002 01"
    parsed = parse_socketcand(open_end, "can0")  # the rest of the element may still come: kept for the next read
    assert parsed.consumed == len(good) and not parsed.refused
    endless = good + b"<" + b"x" * (MAX_ELEMENT_BYTES + 1)
    parsed = parse_socketcand(endless, "can0")
    assert parsed.consumed == len(endless) and parsed.refused == {"element_too_long": 1}
    assert parsed.batch.can_id.tolist() == [0x18FEEE00]


def test_error_and_fd_elements_become_what_from_messages_makes_of_them() -> None:
    text = (b"< error 004 1700000000.000002 >"  # an error frame: kept, bad (the decoder counts it)
            b"< fdframe 18FEEE00 01 1700000000.000003 0011223344556677 >"  # CAN FD with 8 bytes: a frame
            b"< fdframe 123 01 1700000000.000004 " + b"AB" * 12 + b" >"  # 12 bytes: bad
            b"< frame 0CF00400 1700000000.000005  >")  # no data: every byte 'not available'
    fb = parse_socketcand(text, "can0").batch
    assert fb.bad.tolist() == [True, False, True, False]
    assert fb.extended.tolist() == [False, True, False, True]
    assert fb.dlc.tolist() == [0, 8, 8, 0]
    assert fb.data[1].tolist() == [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]
    assert fb.data[3].tolist() == [PAD] * 8
    np.testing.assert_allclose(fb.ts, 1_700_000_000 + np.array([2, 3, 4, 5]) * 1e-6, rtol=0, atol=1e-7)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_and_never_make_an_impossible_frame(junk: bytes) -> None:
    parsed = parse_socketcand(junk, "can0")
    assert 0 <= parsed.consumed <= len(junk)
    assert len(junk) - parsed.consumed <= MAX_ELEMENT_BYTES
    fb = parsed.batch
    assert (fb.dlc <= 8).all()
    assert (fb.can_id[fb.extended] <= 0x1FFFFFFF).all()
    assert (fb.can_id[~fb.extended & ~fb.bad] <= 0x7FF).all()
    past = np.arange(8)[None, :] >= fb.dlc[:, None]
    assert (fb.data[past] == PAD).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=30).filter(lambda b: b"<" not in b and b">" not in b), min_size=3, max_size=3))
def test_stray_bytes_between_elements_hide_no_frame(junk: list[bytes]) -> None:
    a = b"< frame 18FEEE00 1700000000.000001 01 >"
    b = b"< frame 123 1700000000.000002 0203 >"
    parsed = parse_socketcand(junk[0] + a + junk[1] + b + junk[2], "can0")
    assert parsed.batch.can_id.tolist() == [0x18FEEE00, 0x123] and not parsed.refused


# --- SocketCAN records through recvmmsg --------------------------------------------------------------------------


@pytest.fixture(params=[socket.SOCK_DGRAM, socket.SOCK_SEQPACKET], ids=["dgram", "seqpacket"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, request.param)
    yield a, b
    a.close()
    b.close()


def test_raw_reader_turns_can_frame_records_into_a_batch(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    reader = RawCanReader(rx, "can0", vlen=4)
    before = time.time()
    records = [
        can_frame(EFF | 0x18FEEE00, bytes([0x8C, 0x45, 0xFF, 0xFF, 0x20, 0xFF, 0xFF, 0xFF])),
        can_frame(0x123, b"\x01\x02"),  # 11-bit
        can_frame(EFF | 0x0CF00400, b""),  # no data
        can_frame(EFF | RTR | 0x18EA0000, b"", length=3),  # remote frame: bad
        can_frame(ERR | 0x004, bytes(8)),  # error frame: bad
        can_frame(EFF | 0x18FEF100, bytes(8), length=12),  # a length no classic frame has: bad
        b"\x01\x02\x03",  # cut short: no frame
        can_frame(0x7FF, b"\xAA") + b"\xEE" * 8,  # longer than a can_frame: no frame
        can_frame(EFF | 0x18FEF200, b"\x10\x20\x30\x40\x50\x60\x70\x80"),
    ]
    for r in records:
        tx.send(r)
    after = time.time()
    assert reader.wait(5.0)
    fb = reader.drain(100)
    assert fb.can_id.tolist() == [0x18FEEE00, 0x123, 0x0CF00400, 0x18EA0000, 0x004, 0x18FEF100, 0x18FEF200]
    assert fb.extended.tolist() == [True, False, True, True, False, True, True]
    assert fb.bad.tolist() == [False, False, False, True, True, True, False]
    assert fb.dlc.tolist() == [8, 2, 0, 3, 8, 8, 8]
    assert fb.data[1].tolist() == [1, 2] + [PAD] * 6  # past the DLC: 'not available', not the sender's zeros
    assert fb.data[2].tolist() == [PAD] * 8
    # The kernel's receive time of each datagram, in order.
    assert (before <= fb.ts).all() and (fb.ts <= after).all() and (np.diff(fb.ts) >= 0).all()
    assert reader.dropped == {"short_record": 1, "long_record": 1} and not reader.errors
    assert len(reader.drain(100)) == 0 and not reader.wait(0.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=60))
def test_raw_reader_agrees_with_a_frame_by_frame_reading_of_random_records(records: list[bytes]) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        reader = RawCanReader(b, "can0", vlen=16)
        for r in records:
            a.send(r)
        fb = reader.drain(1000)
        assert len(fb) == len(records)
        for k, r in enumerate(records):  # the reference: <linux/can.h> read one record at a time
            raw_id, length = struct.unpack_from("=IB", r)
            ext = bool(raw_id & EFF)
            assert fb.extended[k] == ext
            assert fb.can_id[k] == (raw_id & (0x1FFFFFFF if ext else 0x7FF))
            assert fb.bad[k] == bool(raw_id & (RTR | ERR) or length > 8)
            dlc = min(length, 8)
            assert fb.dlc[k] == dlc
            assert bytes(fb.data[k]) == r[8:8 + dlc] + bytes([PAD]) * (8 - dlc)
    finally:
        a.close()
        b.close()


def test_raw_reader_takes_at_most_limit_and_leaves_the_rest_queued(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    reader = RawCanReader(rx, "can0", vlen=8)
    for i in range(50):
        tx.send(can_frame(EFF | 0x18FEEE00 | i, b"\x00"))
    sizes = []
    ids: list[int] = []
    while len(fb := reader.drain(20)):
        sizes.append(len(fb))
        ids += (fb.can_id & 0xFF).tolist()
    assert sizes == [20, 20, 10] and ids == list(range(50))


def test_raw_reader_reports_a_closed_socket_after_handing_over_what_came_before(
        pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    reader = RawCanReader(rx, "can0")
    tx.send(can_frame(EFF | 0x18FEEE00, b"\x01"))
    if tx.type == socket.SOCK_DGRAM:
        tx.send(b"")  # a datagram socket has no end: an empty record stands for it (CAN never sends one)
    tx.close()
    assert reader.wait(5.0)
    assert reader.drain(100).can_id.tolist() == [0x18FEEE00]
    assert reader.wait(0.0)
    with pytest.raises(BusError, match="closed"):
        reader.drain(100)


def _control(ts: tuple[int, int] | None, drops: int | None, drops_first: bool = False) -> tuple[bytes, int]:
    """One message's control data as the kernel writes it (struct cmsghdr + data, each CMSG_SPACE long)."""
    def cmsg(kind: int, data: bytes) -> bytes:
        length = _CMSG_HDR + len(data)
        body = struct.pack(f"={'Q' if _SIZE_T == 8 else 'I'}ii", length, socket.SOL_SOCKET, kind)
        body = body.ljust(_CMSG_HDR, b"\0") + data
        return body.ljust((length + _SIZE_T - 1) & ~(_SIZE_T - 1), b"\0")

    parts = []
    if ts is not None:
        parts.append(cmsg(SO_TIMESTAMPNS, struct.pack(f"=2{'q' if _LONG == 8 else 'i'}", *ts)))
    if drops is not None:
        parts.append(cmsg(SO_RXQ_OVFL, struct.pack("=I", drops)))
    if drops_first:
        parts.reverse()
    out = b"".join(parts)
    return out.ljust(CONTROL_BYTES, b"\0"), len(out)


def test_receive_times_and_the_kernels_drop_count_from_control_data() -> None:
    rows = [_control((1_700_000_000, 250_000_000), 7), _control((1_700_000_001, 0), None),
            _control((1_700_000_002, 500_000_000), 9, drops_first=True), _control(None, 11)]
    control = np.frombuffer(b"".join(r[0] for r in rows), np.uint8).reshape(len(rows), CONTROL_BYTES)
    lengths = np.array([r[1] for r in rows], np.uint64)
    ts, total, unstamped = receive_times(control, lengths)
    np.testing.assert_allclose(ts[:3], [1_700_000_000.25, 1_700_000_001.0, 1_700_000_002.5], rtol=0, atol=1e-6)
    assert unstamped.tolist() == [False, False, False, True]
    assert total == 11  # the running total the last message carried


def test_kernel_drops_are_counted_as_lost_frames() -> None:
    """AF_UNIX reports no drop count: the reader's control buffer gets it as the kernel writes it for CAN."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        reader = RawCanReader(b, "can0")
        seen = []
        for total in (3, 3, 10, 2):  # the kernel's u32 running total; 10 -> 2 is a wrap past 2**32
            control = np.frombuffer(_control((1, 0), total)[0], np.uint8).reshape(1, CONTROL_BYTES)
            reader._control_view[:1] = control
            reader._times(1, np.array([CONTROL_BYTES], np.uint64))
            seen.append(reader.dropped["rx_overflow"])
        assert seen == [3, 3, 10, 10 + 2**32 - 8]
    finally:
        a.close()
        b.close()


# --- the CAN source over the bulk readers ---------------------------------------------------------------------


class _Counting(RawCanReader):
    """A RawCanReader that counts how often the source was woken by it, and read it."""

    woken = 0
    drains = 0

    def wait(self, timeout: float) -> bool:
        ready = super().wait(timeout)
        type(self).woken += ready
        return ready

    def drain(self, limit: int) -> FrameBatch:
        type(self).drains += 1
        return super().drain(limit)


def test_the_source_takes_a_queue_in_one_wake_up_not_one_per_frame() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for i in range(200):  # queued before the source starts: what a busy bus leaves while the source sleeps
        a.send(can_frame(EFF | 0x18FEEE00 | (i & 0xFF), b"\x01"))
    batches: list[FrameBatch] = []
    cfg = CanBusConfig(name="can0", interface="socketcan", batch_max_frames=5000, batch_max_s=1.0,
                       read_interval_s=0.05)
    src = CanSource(cfg, batches.append, opener=lambda c: _Counting(b, c.name, vlen=64))
    src.start()
    try:
        wait_for(lambda: src.frames == 200, what="all 200 frames")
    finally:
        src.stop()
        a.close()
    # Woken once; one drain of all 200 (4 recvmmsg calls), one more that found the bus quiet: one batch.
    assert len(batches) == 1 and len(batches[0]) == 200
    assert (_Counting.woken, _Counting.drains) == (1, 2)


def test_a_raw_bus_that_closes_is_reopened_and_nothing_before_the_close_is_lost() -> None:
    """The SocketCAN interface cannot exist here: the 'adapter' is a socketpair whose far end goes away."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    opened: list[RawCanReader] = []

    def opener(cfg: CanBusConfig) -> FrameReader:
        if len(opened) == len(pairs):
            raise OSError(19, "No such device")  # ENODEV: no more adapters
        r = RawCanReader(pairs[len(opened)][1], cfg.name)
        opened.append(r)
        return r

    got: list[int] = []
    lock = threading.Lock()

    def sink(fb: FrameBatch) -> None:
        with lock:
            got.extend((fb.can_id & 0xFFFF).tolist())

    events: list[Event] = []
    metrics = Metrics()
    cfg = CanBusConfig(name="can0", interface="socketcan", reconnect_min_s=0.05, reconnect_max_s=0.1,
                       batch_max_s=5.0, read_interval_s=0.2)
    src = CanSource(cfg, sink, metrics=metrics, on_event=events.append, opener=opener)
    src.start()
    try:
        wait_for(lambda: src.up, what="bus open")
        for i in range(100):
            pairs[0][0].send(can_frame(EFF | 0x18FE0000 | i, b"\x01"))
        pairs[0][0].close()  # the adapter goes away with frames still queued
        wait_for(lambda: len(opened) == 2 and src.up, what="reopened on the next adapter")
        for i in range(100, 150):
            pairs[1][0].send(can_frame(EFF | 0x18FE0000 | i, b"\x01"))
        wait_for(lambda: len(got) == 150, what="every frame, before and after the close")
        assert got == list(range(150))
        assert metrics.labels("source.can0.errors").get("bus_error") == 1
        assert [e.kind for e in events] == ["source_down", "source_up"]
    finally:
        src.stop()
        pairs[1][0].close()


def test_the_source_reads_the_simulators_socketcand_server_with_its_own_client() -> None:
    srv = SocketcandServer(0, "can0")
    batches: list[FrameBatch] = []
    cfg = CanBusConfig(name="can0", interface="socketcand", channel="can0",
                       options={"host": "127.0.0.1", "port": srv.address[1]})
    src = CanSource(cfg, batches.append)
    src.start()
    try:
        wait_for(lambda: srv.clients == 1 and src.up, what="the source's connection")
        assert isinstance(src.bus, SocketcandReader)
        sent = [can.Message(timestamp=1_700_000_000 + i * 0.001, arbitration_id=0x18FEEE00 | (i % 7),
                            is_extended_id=True, data=bytes([i % 256] * (i % 9))) for i in range(3000)]
        # One warm-up frame, sent once the server has the client in rawmode (so it reaches it), and read, before the
        # measured ones go: nothing sent earlier can be counted with them, however loaded the machine.
        wait_for(lambda: srv.raw_clients == 1, what="the source in rawmode")
        srv.send(sent[0])
        wait_for(lambda: sum(map(len, batches)) == 1, what="the warm-up frame")
        start = len(batches)
        for m in sent:
            srv.send(m)
        wait_for(lambda: sum(len(b) for b in batches[start:]) == len(sent), what="all frames")
        got = FrameBatch(*(np.concatenate([getattr(b, f) for b in batches[start:]])
                           for f in ("ts", "can_id", "dlc", "data", "extended", "bad")), "can0")
        _same(got, FrameBatch.from_messages(sent, "can0"))
        assert len(batches) - start < len(sent) / 10  # batches, not frames
        srv.shutdown()  # the server goes away: a bus error, reopened with backoff
        wait_for(lambda: src.metrics.labels("source.can0.errors").get("bus_error", 0) >= 1, what="bus error")
    finally:
        src.stop()
        srv.shutdown()


def _server(replies: bytes, then: bytes = b"", hold: threading.Event | None = None) -> tuple[int, threading.Thread]:
    """A one-connection socketcand server that says `replies` to the handshake's three steps, then sends `then`
    and closes (once `hold` is set, if given)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            greeting, rest = replies.split(b"|", 1) if b"|" in replies else (replies, b"")
            conn.sendall(greeting)
            for reply in rest.split(b"|") if rest else []:
                conn.recv(64)
                conn.sendall(reply)
            conn.sendall(then)
            if hold is not None:
                hold.wait(30)
        listener.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return port, t


def test_frames_sent_right_after_the_rawmode_ok_are_not_lost() -> None:
    """The real socketcand sends frames as soon as raw mode is on, in the same TCP segment as its `< ok >`."""
    frames = b"< frame 18FEEE00 1700000000.000001 01 >< frame 123 1700000000.000002 0203 >"
    hold = threading.Event()  # the server keeps the connection open: nothing but those frames will come
    port, t = _server(b"< hi >|< ok >|< ok >" + frames, hold=hold)
    reader = SocketcandReader("127.0.0.1", port, "can0", "can0", 5.0)
    try:
        assert reader.wait(5.0)
        assert reader.drain(100).can_id.tolist() == [0x18FEEE00, 0x123]
        assert not reader.wait(0.2)
    finally:
        hold.set()
        reader.shutdown()
        t.join(5)


@pytest.mark.parametrize(("replies", "match"), [
    (b"< hi >|< error could not open bus vcan9 >", "could not open bus"),
    (b"< hello >", "greeting"),
    (b"garbage without end " * 40, "no socketcand reply"),
    (b"< hi >|< ok >|", "closed the connection during the handshake"),
])
def test_a_handshake_that_goes_wrong_fails_the_open_with_the_reason(replies: bytes, match: str) -> None:
    port, t = _server(replies)
    with pytest.raises(BusError, match=match):
        SocketcandReader("127.0.0.1", port, "vcan9", "can0", 5.0)
    t.join(5)


def test_a_server_sending_garbage_costs_counted_elements_not_the_connection() -> None:
    good = b"< frame 18FEEE00 1700000000.000001 01 >"
    port, t = _server(b"< hi >|< ok >|< ok >", good + b"< frobnicate >" + b"\xff\xfe >" + good)
    reader = SocketcandReader("127.0.0.1", port, "can0", "can0", 5.0)
    got: list[int] = []
    try:
        with pytest.raises(BusError, match="closed the connection"):
            while True:
                if reader.wait(5.0):
                    got += reader.drain(100).can_id.tolist()
        assert got == [0x18FEEE00, 0x18FEEE00] and reader.dropped == {"bad_element": 2}
    finally:
        reader.shutdown()
        t.join(5)


def test_open_reader_picks_the_bulk_readers_and_python_can_for_the_rest(tmp_path: Path) -> None:
    # SocketCAN itself cannot be opened here: AF_CAN is not in this kernel, and the open says so.
    with pytest.raises(OSError):
        open_reader(CanBusConfig(name="can0", interface="socketcan", channel="can0"))
    from agent.sources.pycan import MessageReader

    reader = open_reader(CanBusConfig(name="can0", interface="virtual", channel="readers-virtual"))
    try:
        assert isinstance(reader, MessageReader)
        tx = can.Bus(interface="virtual", channel="readers-virtual")
        for i in range(10):
            tx.send(can.Message(arbitration_id=0x18FEEE00 | i, data=b"\x01", is_extended_id=True))
        assert reader.wait(5.0) and (reader.drain(100).can_id & 0xFF).tolist() == list(range(10))
        tx.shutdown()
    finally:
        reader.shutdown()
    with pytest.raises(BusError):  # python-can's error after the bus is gone, as the source sees it
        reader.wait(0.01)
