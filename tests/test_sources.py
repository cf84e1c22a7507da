"""Sources on real parts: a serial device unplugged and plugged back (pty pairs), a CAN bus that cannot be opened
then can, garbage bytes on the wire. None of them needs an agent restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import can
import pytest
from pydantic import ValidationError

from agent.config import AgentConfig, CanBusConfig, SerialConfig
from agent.decode.nmea import checksum
from agent.frames import FrameBatch
from agent.sources.can import CanSource
from agent.sources.serial import SerialSource
from harvester_sim.pty import PtyPair
from tests.test_uplink import wait_for


def _gga(i: int) -> bytes:
    body = f"GPGGA,1235{i % 60:02d},2803.000,N,08157.000,W,1,08,0.9,40.0,M,-30.0,M,,"
    return f"${body}*{checksum(body):02X}\r\n".encode()


def test_serial_device_unplugged_and_plugged_back(tmp_path: Path) -> None:
    link = tmp_path / "ttyGPS"
    got: list[bytes] = []
    lock = threading.Lock()

    def sink(name: str, lines: list[tuple[float, bytes]]) -> None:
        with lock:
            got.extend(line for _, line in lines)

    src = SerialSource(SerialConfig(name="gps", port=str(link), reconnect_min_s=0.05, reconnect_max_s=0.2), sink)
    src.start()
    try:
        wait_for(lambda: src.errors["open_failed"] >= 1, what="device missing at start, retried")
        pty = PtyPair(link=link)
        wait_for(lambda: src.up, what="device opened once it appeared")
        for i in range(5):
            pty.write(_gga(i))
        wait_for(lambda: len(got) >= 5, what="lines before the unplug")
        pty.close()  # unplugged: the device and its link disappear
        wait_for(lambda: not src.up, what="loss noticed")
        pty = PtyPair(link=link)  # plugged back in (a new device node, same stable link)
        wait_for(lambda: src.up, what="reopened")
        time.sleep(0.2)
        for i in range(5, 10):
            pty.write(_gga(i))
        wait_for(lambda: len(got) >= 10, what="lines after the replug")
        pty.write(b"\x00\xff garbage without newline" * 20 + b"\r\n" + _gga(11))
        wait_for(lambda: len(got) >= 11, what="a good line after garbage")
        assert src.reconnects >= 1
        assert src.errors["line_too_long"] >= 1
        pty.close()
    finally:
        src.stop()


def test_can_bus_that_fails_to_open_is_retried_and_counted() -> None:
    batches: list[FrameBatch] = []
    # A SocketCAN interface that does not exist on this machine: opening it fails for real, every time.
    cfg = CanBusConfig(name="can9", interface="socketcan", channel="nonexistent9", reconnect_min_s=0.05,
                       reconnect_max_s=0.1)
    src = CanSource(cfg, batches.append, seed=1)
    src.start()
    try:
        wait_for(lambda: src.errors["open_failed"] >= 3, what="repeated, counted open failures")
        assert not src.up and not batches
    finally:
        src.stop()


def test_can_source_reads_batches_from_a_virtual_bus() -> None:
    batches: list[FrameBatch] = []
    src = CanSource(CanBusConfig(name="can0", interface="virtual", channel="src-test"), batches.append)
    src.start()
    tx = can.Bus(interface="virtual", channel="src-test")
    try:
        wait_for(lambda: src.up, what="bus open")
        for i in range(500):
            tx.send(can.Message(arbitration_id=0x18FEEE00 | (i % 3), data=bytes(8), is_extended_id=True))
        wait_for(lambda: sum(len(b) for b in batches) == 500, what="all frames")
        assert all(b.bus == "can0" for b in batches)
    finally:
        tx.shutdown()
        src.stop()


def test_line_protocol_sensors_csv_and_key_value() -> None:
    from agent.decode.lines import LineDecoder

    csv = LineDecoder("vib", "csv", ["AccelRms", "", "BearingTemp"], {"AccelRms": "g"})
    assert csv.decode_line(b"0.42, 17, 61.5\r") == [("vib.AccelRms", 0.42), ("vib.BearingTemp", 61.5)]
    assert csv.decode_line(b"1,nan,3") == [("vib.AccelRms", 1.0), ("vib.BearingTemp", 3.0)]  # skipped column
    for bad in (b"1,2", b"a,b,c", b"nan,2,3", b"\xff\xfe", b"1,2,inf"):
        assert csv.decode_line(bad) == []
    assert csv.errors == {"field_count": 1, "bad_number": 1, "not_ascii": 1, "not_finite": 2}
    kv = LineDecoder("hyd", "kv", ["Press", "Flow"], {})
    assert kv.decode_line(b"Press=180.5 Flow=42 Other=1") == [("hyd.Press", 180.5), ("hyd.Flow", 42.0)]
    assert kv.errors["unknown_field"] == 1
    assert kv.decode_line(b"Press180") == [] and kv.errors["bad_number"] == 1


def test_every_source_gets_its_decoder_and_names_do_not_clash() -> None:
    from agent.config import AgentConfig
    from agent.decode.j1939 import J1939Decoder
    from agent.decode.lines import LineDecoder
    from agent.decode.nmea import NmeaDecoder
    from agent.service import decoders_for
    from agent.signals import SignalRegistry

    cfg = AgentConfig.model_validate({"can": [{"name": "can0"}], "serial": [
        {"name": "gps"}, {"name": "vib", "protocol": "csv", "fields": ["AccelRms"]}]})
    decs = decoders_for(cfg, SignalRegistry())
    assert [type(d) for d in decs.values()] == [J1939Decoder, NmeaDecoder, LineDecoder] and list(decs) == [
        "can0", "gps", "vib"]
    # Batches are routed by source name: a device named like a bus would be decoded as that bus, two buses of one
    # name would share one decoder, its DTC state and its metrics. The config refuses both.
    for clash in ({"can": [{"name": "gps"}], "serial": [{"name": "gps"}]},
                  {"can": [{"name": "can0"}, {"name": "can0", "channel": "can1"}]},
                  {"serial": [{"name": "gps"}, {"name": "gps", "port": "/dev/ttyUSB1"}]}):
        with pytest.raises(ValidationError, match="used twice"):
            AgentConfig.model_validate(clash)


def test_line_sensor_reaches_the_store_through_the_service_pipeline(tmp_path: Path) -> None:
    from agent.config import AgentConfig
    from agent.service import Agent

    link = tmp_path / "ttyVIB"
    cfg = AgentConfig.model_validate({
        "serial": [{"name": "vib", "port": str(link), "protocol": "csv", "fields": ["AccelRms", "BearingTemp"],
                    "units": {"AccelRms": "g"}, "reconnect_min_s": 0.05}],
        "model": {"path": str(tmp_path / "none.onnx")},
        "store": {"path": str(tmp_path / "s.sqlite"), "flush_interval_s": 0.1},
        "mqtt": {"port": 1, "tls": False, "reconnect_min_s": 5},
    })
    with PtyPair(link=link) as pty:
        agent = Agent(cfg)
        agent.start()
        try:
            wait_for(lambda: agent.serial_sources[0].up, what="sensor open")
            for i in range(20):
                pty.write(f"{0.1 * i:.1f},{60 + i}\n".encode())
            wait_for(lambda: agent.store.status()["records_written"]["samples"] == 40, what="40 samples stored")
        finally:
            agent.stop(drain_s=0)
    assert agent.model_status.startswith("refused")  # no model file: data is still collected


def test_several_buses_at_once_each_labelled(tmp_path: Path) -> None:
    from agent.config import AgentConfig
    from agent.service import Agent
    from harvester_sim import Harvester, J1939Transmitter

    cfg = AgentConfig.model_validate({
        "can": [{"name": "engine", "interface": "virtual", "channel": "mb-a"},
                {"name": "implement", "interface": "virtual", "channel": "mb-b"}],
        "model": {"path": str(tmp_path / "none.onnx")},
        "store": {"path": str(tmp_path / "s.sqlite"), "flush_interval_s": 0.1},
        "mqtt": {"port": 1, "tls": False, "reconnect_min_s": 5},
    })
    agent = Agent(cfg)
    agent.start()
    buses = [can.Bus(interface="virtual", channel=c) for c in ("mb-a", "mb-b")]
    try:
        wait_for(lambda: all(s.up for s in agent.can_sources), what="both buses open")
        frames = J1939Transmitter(Harvester(seed=1)).frames_until(2.0)
        for bus in buses:
            for m in frames:
                bus.send(m)
        wait_for(lambda: agent.pipeline.stats.frames == 2 * len(frames), what="frames from both buses")
    finally:
        for bus in buses:
            bus.shutdown()
        agent.stop(drain_s=0)
    sources = {agent.registry.key(i)[1].split("/")[0] for i in range(len(agent.registry))}
    assert sources == {"engine", "implement"}


def test_bus_failing_while_running_is_reopened_without_restart() -> None:
    batches: list[FrameBatch] = []
    src = CanSource(CanBusConfig(name="can0", interface="virtual", channel="fail-test", reconnect_min_s=0.05),
                    batches.append)
    src.start()
    tx = can.Bus(interface="virtual", channel="fail-test")
    try:
        wait_for(lambda: src.up, what="bus open")
        first = src.bus
        assert first is not None
        first.shutdown()  # the adapter goes away under the reader (bus-off, USB unplug)
        wait_for(lambda: src.errors["bus_error"] >= 1, what="failure counted")
        wait_for(lambda: src.up and src.bus is not first, what="bus reopened")
        for _ in range(100):
            tx.send(can.Message(arbitration_id=0x18FEEE00, data=bytes(8), is_extended_id=True))
        wait_for(lambda: sum(len(b) for b in batches) == 100, what="frames after the reopen")
        assert src.reconnects >= 1
    finally:
        tx.shutdown()
        src.stop()


def test_slcan_adapter_over_serial(tmp_path: Path) -> None:
    """slcan is ASCII over a serial port: a pty plays the USB adapter (acks every command with CR, streams
    frames), python-can's real slcan interface reads it, the agent decodes it."""
    import os

    from agent.decode.j1939 import J1939Decoder
    from agent.signals import SignalRegistry

    batches: list[FrameBatch] = []
    with PtyPair(link=tmp_path / "ttyACM0") as pty:
        stop = threading.Event()

        def adapter() -> None:
            while not stop.is_set():
                try:
                    data = os.read(pty.master, 256)
                except (BlockingIOError, OSError):
                    time.sleep(0.01)
                    continue
                pty.write(b"\r" * data.count(b"\r"))

        th = threading.Thread(target=adapter, daemon=True)
        th.start()
        src = CanSource(CanBusConfig(name="can0", interface="slcan", channel=str(tmp_path / "ttyACM0"),
                                     bitrate=250000), batches.append)
        src.start()
        try:
            wait_for(lambda: src.up, what="slcan adapter open")
            time.sleep(0.2)
            for _ in range(50):  # ET1 from SA 0x00: coolant 100 °C, oil 36 °C
                pty.write(b"T18FEEE0088C45FFFF20FFFFFF\r")
            wait_for(lambda: sum(len(b) for b in batches) == 50, what="50 frames over slcan")
        finally:
            src.stop()
            stop.set()
    reg = SignalRegistry()
    res = J1939Decoder(reg).decode(batches[0])
    coolant = [v for s, v in zip(res.samples.sid.tolist(), res.samples.value.tolist(), strict=True)
               if reg.name(s) == "ET1.EngCoolantTemp"]
    assert coolant and set(coolant) == {100.0}


def test_socketcand_server_stopped_and_restarted_is_one_source_down_then_source_up() -> None:
    """A real socketcand server (the simulator's) goes away under the CAN source and comes back on the same port:
    one `source_down` with the error, however many reopen attempts fail meanwhile, then one `source_up`."""
    from agent.metrics import Metrics
    from agent.records import Event
    from harvester_sim.socketcand_server import SocketcandServer

    srv = SocketcandServer(0, "can0")
    port = srv.address[1]
    events: list[Event] = []
    metrics = Metrics()
    cfg = CanBusConfig(name="can0", interface="socketcand", channel="can0",
                       options={"host": "127.0.0.1", "port": port}, reconnect_min_s=0.05, reconnect_max_s=0.2)
    src = CanSource(cfg, lambda fb: None, seed=1, metrics=metrics, on_event=events.append)
    src.start()
    try:
        wait_for(lambda: src.up and srv.clients == 1, what="connected")
        assert events == []  # a first open is not news
        srv.shutdown()
        wait_for(lambda: src.errors["open_failed"] >= 3, what="reopen attempts refused while the server is gone")
        srv = SocketcandServer(port, "can0")
        wait_for(lambda: len(events) == 2, what="source_up after the server is back")
    finally:
        src.stop()
        srv.shutdown()
    down, up = events
    assert (down.kind, down.data["source"], down.data["source_kind"], down.data["reason"]) == (
        "source_down", "can0", "can", "bus_error")
    assert "closed the connection" in down.data["error"]
    assert (up.kind, up.data["source"]) == ("source_up", "can0")
    assert up.data["failed_attempts"] >= 4 and up.data["down_s"] >= 0 and up.ts >= down.ts
    assert metrics.labels("source.can0.events") == {"source_down": 1, "source_up": 1}
    assert metrics.snapshot()["gauges"]["source.can0.up"] == 1


def test_pty_closed_and_reopened_is_one_source_down_with_its_errno_then_source_up(tmp_path: Path) -> None:
    from agent.metrics import Metrics
    from agent.records import Event

    link = tmp_path / "ttyGPS"
    events: list[Event] = []
    metrics = Metrics()
    pty = PtyPair(link=link)
    src = SerialSource(SerialConfig(name="gps", port=str(link), reconnect_min_s=0.05, reconnect_max_s=0.2),
                       lambda name, lines: None, seed=1, metrics=metrics, on_event=events.append)
    src.start()
    try:
        wait_for(lambda: src.up, what="port open")
        pty.close()  # the other end goes away (USB unplug)
        wait_for(lambda: src.errors["open_failed"] >= 2, what="reopen attempts while the device is gone")
        assert [e.kind for e in events] == ["source_down"]
        pty = PtyPair(link=link)
        wait_for(lambda: len(events) == 2, what="source_up once the device is back")
    finally:
        src.stop()
        pty.close()
    down, up = events
    assert (down.data["source"], down.data["source_kind"], down.data["reason"]) == ("gps", "serial", "device_lost")
    # pyserial reads a pty whose other end closed as "ready but no data", a SerialException without an errno.
    assert "device disconnected" in down.data["error"] and down.data["errno"] is None
    assert up.kind == "source_up" and up.data["failed_attempts"] >= 2
    assert metrics.labels("source.gps.events") == {"source_down": 1, "source_up": 1}


def test_a_source_down_event_names_the_errno_where_there_is_one(tmp_path: Path) -> None:
    """A device that is not there at start: the first failed open is the outage's `source_down`, with ENOENT."""
    from agent.metrics import Metrics
    from agent.records import Event
    from agent.sources.health import error_detail

    events: list[Event] = []
    src = SerialSource(SerialConfig(name="gps", port=str(tmp_path / "absent"), reconnect_min_s=0.05,
                                    reconnect_max_s=0.1), lambda name, lines: None, metrics=Metrics(),
                       on_event=events.append)
    src.start()
    try:
        wait_for(lambda: src.errors["open_failed"] >= 3, what="repeated open failures")
    finally:
        src.stop()
    assert [e.kind for e in events] == ["source_down"]
    assert (events[0].data["reason"], events[0].data["errno"], events[0].data["errno_name"]) == (
        "open_failed", 2, "ENOENT")
    bus_off = can.CanOperationError("bus off", error_code=105)
    assert error_detail(bus_off) | {"error": ""} == {"error": "", "errno": 105, "errno_name": "ENOBUFS"}


def test_a_full_data_queue_never_drops_a_source_event(tmp_path: Path) -> None:
    """The pipeline is behind and the data queue full: the next batch is dropped and counted, but the record that
    says a bus went down still reaches the store (its own queue, drained before data)."""
    from agent.records import Event
    from agent.service import Agent

    cfg = AgentConfig.model_validate({
        "store": {"path": str(tmp_path / "buffer.sqlite")}, "model": {"path": str(tmp_path / "none.onnx")},
        "pipeline": {"queue_max_batches": 1}, "mqtt": {"tls": False}})
    agent = Agent(cfg)  # not started: nothing drains the queues until this test says so
    try:
        agent._on_lines("gps", [(1.0, b"$GPGGA")])
        agent._on_lines("gps", [(1.1, b"$GPGGA")])  # the data queue holds one batch: this one is dropped
        assert agent.metrics.labels("agent.queue.dropped") == {"serial": 1}
        agent._on_source_event(Event("source_down", 2.0, {"source": "can0", "reason": "bus_error"}))
        assert agent.metrics.labels("agent.queue.dropped") == {"serial": 1}  # the event was not
        agent._drain_events()
        agent.writer.flush_records()
        assert agent.pipeline.stats.source_events == 1
        assert agent.store.status()["backlog"]["event"]["records"] == 1
    finally:
        agent.store.close()
