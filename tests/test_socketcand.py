"""The simulated bus over socketcand on 127.0.0.1: python-can's own client reads what the simulator serves, hostile
clients cost only their own connection, and `simulate --socketcand` and `run` as two real processes keep exchanging
frames when either side restarts (SIGKILL). Everything stays on loopback."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import can
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester_sim.socketcand_server import SocketcandServer, frame_element

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Callable[[], bool], what: str, deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture()
def server() -> Iterator[SocketcandServer]:
    srv = SocketcandServer(0, "can0")
    yield srv
    srv.shutdown()


def _client(srv: SocketcandServer, channel: str = "can0") -> can.BusABC:
    return can.Bus(interface="socketcand", channel=channel, host="127.0.0.1", port=srv.address[1])


def _recv_all(bus: can.BusABC, n: int, deadline_s: float = 30.0) -> list[can.Message]:
    out: list[can.Message] = []
    end = time.monotonic() + deadline_s
    while len(out) < n and time.monotonic() < end:
        m = bus.recv(0.2)
        if m is not None:
            out.append(m)
    return out


def _frames() -> list[can.Message]:
    return [
        can.Message(timestamp=1_700_000_000.123456, arbitration_id=0x18FEEE00, is_extended_id=True,
                    data=bytes([0x8C, 0x45, 0xFF, 0xFF, 0x20, 0xFF, 0xFF, 0xFF])),
        can.Message(timestamp=1_700_000_000.5, arbitration_id=0x123, is_extended_id=False, data=b"\x01\x02"),
        can.Message(timestamp=1_700_000_001.0, arbitration_id=0x0CF00400, is_extended_id=True, data=b""),
    ]


def test_python_can_client_reads_what_the_server_serves(server: SocketcandServer) -> None:
    assert server.address[0] == "127.0.0.1"
    a, b = _client(server), _client(server)
    try:
        _wait(lambda: server.stats["connections"] == 2, "two clients")
        sent = _frames()

        def delivered() -> bool:  # frames start once a client's rawmode has settled; resend until both have them
            for m in sent:
                server.send(m)
            return server.stats["frames_delivered"] >= 2 * len(sent)

        _wait(delivered, "frames to both clients")
        for bus in (a, b):
            got = _recv_all(bus, 3)
            assert [(m.arbitration_id, m.is_extended_id, bytes(m.data)) for m in got] == [
                (m.arbitration_id, m.is_extended_id, bytes(m.data)) for m in sent]
            assert [m.timestamp for m in got] == pytest.approx([m.timestamp for m in sent], abs=1e-6)
    finally:
        a.shutdown()
        b.shutdown()
    _wait(lambda: server.clients == 0, "clients gone")


def test_frames_the_subset_does_not_carry_are_counted(server: SocketcandServer) -> None:
    server.send(can.Message(arbitration_id=1, is_error_frame=True))
    server.send(can.Message(arbitration_id=1, is_fd=True, data=bytes(12)))
    server.send(can.Message(arbitration_id=1, is_remote_frame=True))
    assert server.stats["frames_not_served"] == 3 and server.stats["frames"] == 0


def test_unknown_bus_is_refused(server: SocketcandServer) -> None:
    with pytest.raises(can.CanError, match="could not open bus"):
        _client(server, "vcan9")


def _raw(srv: SocketcandServer) -> socket.socket:
    s = socket.create_connection(srv.address, timeout=10)
    assert s.recv(64) == b"< hi >"
    return s


def _closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(64) == b""
    except ConnectionResetError:  # closed with our unread bytes in its buffer: a reset, as good as a close
        return True


def test_hostile_clients_cost_only_their_own_connection(server: SocketcandServer) -> None:
    good = _client(server)
    try:
        # Disconnect mid-element, after a handshake and with a half-sent command.
        s = _raw(server)
        s.sendall(b"< open can0 >")
        assert s.recv(64) == b"< ok >"
        s.sendall(b"< rawm")
        s.close()
        # Garbage and unknown commands get an error and the connection stays.
        s = _raw(server)
        s.sendall(b"\xff\xfe garbage >")
        assert s.recv(64).startswith(b"< error")
        s.sendall(b"< frobnicate >")
        assert s.recv(64) == b"< error unknown command >"
        s.sendall(b"< send 123 2 1 2 >")  # a client's frame: accepted, counted
        # An element that never ends closes that connection only.
        s.sendall(b"<" + b"x" * 10_000)
        _wait(lambda: _closed_by_server(s), "oversized element to close the connection")
        s.close()
        # A client that never reads what it asked for does not hold up the good one.
        slow = _raw(server)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(b"< open can0 >< rawmode >")
        msg = _frames()[0]

        def good_gets_one() -> bool:
            server.send(msg)
            return good.recv(0.05) is not None

        _wait(good_gets_one, "frames to the good client")
        assert server.stats["client_frames"] == 1 and server.stats["bad_commands"] >= 3
        slow.close()
    finally:
        good.shutdown()


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.integers(0, 0x1FFFFFFF), st.binary(max_size=8), st.floats(0, 4e9))
def test_frame_element_parses_back_with_python_can(ext: bool, ident: int, data: bytes, ts: float) -> None:
    from can.interfaces.socketcand.socketcand import convert_ascii_message_to_can_message

    ident = ident if ext else ident & 0x7FF
    element = frame_element(can.Message(timestamp=ts, arbitration_id=ident, is_extended_id=ext, data=data))
    assert element is not None
    m = convert_ascii_message_to_can_message(element)
    assert (m.arbitration_id, m.is_extended_id, bytes(m.data)) == (ident, ext, data)
    assert abs(m.timestamp - ts) <= 1e-6 * max(1.0, ts) + 1e-6


# --- two real processes -----------------------------------------------------------------------------------------


def _config(tmp_path: Path, port: int, interface: str = "socketcand") -> Path:
    cfg = tmp_path / "agent.toml"
    options = f'options = {{host = "127.0.0.1", port = {port}}}' if interface == "socketcand" else ""
    cfg.write_text(f"""
[vehicle]
id = "sc-1"

[[can]]
name = "can0"
interface = "{interface}"
channel = "can0"
reconnect_min_s = 0.2
reconnect_max_s = 1.0
{options}

[model]
path = "{REPO / 'models' / 'harvester-anomaly.int8.onnx'}"

[store]
path = "{tmp_path / 'agent.sqlite'}"
flush_interval_s = 0.5

[mqtt]
host = "127.0.0.1"
port = {_free_port()}
tls = false

[log]
level = "INFO"

[sim]
seed = 3
""")
    return cfg


def _cli(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("ab") as f:
        return subprocess.Popen([sys.executable, "-m", "agent", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO)


def _samples(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'written_samples'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def _kill(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(30)


def test_simulate_and_run_in_two_processes_over_socketcand_survive_restarts(tmp_path: Path) -> None:
    port = _free_port()
    cfg = _config(tmp_path, port)
    db = tmp_path / "agent.sqlite"
    sim_log, agent_log = tmp_path / "sim.log", tmp_path / "agent.log"
    sim = _cli("simulate", "--config", str(cfg), "--socketcand", str(port), log=sim_log)
    agent = _cli("run", "--config", str(cfg), log=agent_log)
    try:
        _wait(lambda: _samples(db) > 300, "samples from the simulator in the agent's store")
        # The simulator dies (SIGKILL) and comes back on the same port: the agent's CAN source reconnects.
        _kill(sim)
        time.sleep(1.0)  # the agent notices the closed connection and starts retrying
        before = _samples(db)
        sim = _cli("simulate", "--config", str(cfg), "--socketcand", str(port), log=sim_log)
        _wait(lambda: _samples(db) > before + 300, "samples again after the simulator restarted")
        text = agent_log.read_text()
        assert "closed the connection" in text, text[-2000:]
        # The agent dies (SIGKILL) and comes back: the simulator serves the new connection.
        _kill(agent)
        before = _samples(db)
        agent = _cli("run", "--config", str(cfg), log=agent_log)
        _wait(lambda: _samples(db) > before + 300, "samples again after the agent restarted")
        assert sim.poll() is None, sim_log.read_text()[-2000:]
    finally:
        _kill(agent)
        _kill(sim)
    for log in (sim_log, agent_log):
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_virtual_bus_warns_that_it_stays_in_one_process(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 0, interface="virtual")
    r = subprocess.run([sys.executable, "-m", "agent", "simulate", "--config", str(cfg), "--duration", "0.5"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert "only reaches buses in this same process" in r.stderr and "--socketcand" in r.stderr
    log = tmp_path / "run.log"
    agent = _cli("run", "--config", str(cfg), log=log)
    try:
        _wait(lambda: "only reaches buses in this same process" in log.read_text(), "the warning from run")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
    assert "socketcand" in log.read_text()


def test_simulate_socketcand_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = _config(tmp_path, port)
        r = subprocess.run([sys.executable, "-m", "agent", "simulate", "--config", str(cfg), "--socketcand",
                            str(port), "--duration", "1"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "cannot serve" in last and str(port) in last, r.stderr


def test_connections_beyond_the_limit_are_refused_not_threaded(server: SocketcandServer) -> None:
    from harvester_sim.socketcand_server import MAX_CLIENTS

    held = [_raw(server) for _ in range(MAX_CLIENTS)]
    try:
        extra = socket.create_connection(server.address, timeout=10)
        assert extra.recv(64).startswith(b"< error too many clients")
        _wait(lambda: _closed_by_server(extra), "the extra connection to close")
        extra.close()
        assert server.stats["clients_refused"] == 1 and server.clients == MAX_CLIENTS
    finally:
        for s in held:
            s.close()
    _wait(lambda: server.clients == 0, "clients gone")
    _raw(server).close()  # room again


def test_agent_side_bus_reports_a_closed_server_and_a_refused_open() -> None:
    """python-can 4.6 reads a closed connection as "no frame" for ever; the agent's bus raises, so the CAN source
    reopens it. A server that is not there fails the open at once (ConnectionRefusedError), for the backoff."""
    from agent.config import CanBusConfig
    from agent.sources.can import open_bus

    srv = SocketcandServer(0, "can0")
    cfg = CanBusConfig(interface="socketcand", channel="can0", options={"host": "127.0.0.1", "port": srv.address[1]})
    bus = open_bus(cfg)
    try:
        _wait(lambda: srv.clients == 1, "the agent's connection")
        srv.shutdown()
        with pytest.raises(can.CanError, match="closed the connection"):
            end = time.monotonic() + 60
            while time.monotonic() < end:
                bus.recv(0.1)
    finally:
        bus.shutdown()
    with pytest.raises(ConnectionRefusedError):
        open_bus(cfg)
    with pytest.raises(ValueError, match="needs options"):
        open_bus(CanBusConfig(interface="socketcand", channel="can0"))


def test_tcp_segments_splitting_frames_are_not_logged_as_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """TCP delivers the stream in arbitrary pieces; python-can warns "Got incomplete message" for each piece that
    ends inside a frame, which at real rates would flood the agent's journal. Every frame arrives, nothing warns."""
    from agent.config import CanBusConfig
    from agent.sources.can import open_bus

    srv = SocketcandServer(0, "can0")
    bus = open_bus(CanBusConfig(interface="socketcand", channel="can0",
                                options={"host": "127.0.0.1", "port": srv.address[1]}))
    try:
        msg = _frames()[0]
        _wait(lambda: (srv.send(msg), srv.stats["frames_delivered"] > 0)[1], "the first frame delivered")
        while bus.recv(0.5) is not None:
            pass
        n = 5000
        with caplog.at_level("DEBUG"):
            for _ in range(n):
                srv.send(msg)
            got = _recv_all(bus, n, deadline_s=120)
        assert len(got) == n and srv.stats["frames_dropped_slow_client"] == 0
        assert not [r for r in caplog.records if r.levelname == "WARNING" and "incomplete" in r.getMessage()]
    finally:
        bus.shutdown()
        srv.shutdown()
