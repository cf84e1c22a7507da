"""`cloud-sync serve` as a real process: when it cannot reach its broker it says so within seconds, and keeps
saying it (rate-limited) until it connects: refused connection, a name that does not resolve, a TLS handshake that
fails."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harvester_testing.broker import MosquittoBroker, free_port
from harvester_testing.cloudproc import stop_receiver
from harvester_testing.tls import Pki


def _serve(tmp_path: Path, mqtt_lines: str) -> tuple[subprocess.Popen[str], list[str]]:
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(f"[mqtt]\n{mqtt_lines}\nunreachable_report_s = 1\n[db]\npath = \"cloud.sqlite\"\n")
    p = subprocess.Popen([sys.executable, "-m", "cloud_sync", "serve", "--config", str(cfg)],
                         stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def drain() -> None:
        assert p.stderr is not None
        for line in p.stderr:
            lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return p, lines


def _said(lines: list[str], text: str, times: int, deadline_s: float = 60.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if sum(text in line for line in lines) >= times:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("case", ["refused", "dns"])
def test_serve_says_when_it_cannot_reach_the_broker_and_keeps_saying_it(tmp_path: Path, case: str) -> None:
    host, port = ("127.0.0.1", free_port()) if case == "refused" else ("no-such-broker.invalid", 1883)
    p, lines = _serve(tmp_path, f'host = "{host}"\nport = {port}')
    try:
        assert _said(lines, f"cannot reach the broker at {host}:{port}", 2), "".join(lines)[-2000:]
        line = next(ln for ln in lines if "cannot reach the broker" in ln)
        assert ("refused" in line) if case == "refused" else ("resolve" in line or "name" in line.lower())
        assert p.poll() is None  # it keeps trying
    finally:
        stop_receiver(p)


def test_serve_says_when_tls_fails_and_when_it_connects_at_last(tmp_path: Path) -> None:
    broker_pki, other_pki = Pki(tmp_path / "pki"), Pki(tmp_path / "other")
    port = free_port()
    tls = MosquittoBroker(port=port, extra_conf=broker_pki.mosquitto_listener(
        port, broker_pki.issue("localhost", server=True)), workdir=tmp_path / "mosq")
    tls.start()
    # The receiver trusts another CA than the one that signed the broker's certificate: the handshake fails.
    p, lines = _serve(tmp_path, f'host = "127.0.0.1"\nport = {port}\ntls = true\nca_file = "{other_pki.ca}"')
    try:
        assert _said(lines, f"cannot reach the broker at 127.0.0.1:{port}", 2), "".join(lines)[-2000:]
        assert any("TLS handshake failed" in ln for ln in lines if "cannot reach" in ln)
    finally:
        stop_receiver(p)
        tls.close()
    # Nothing listens yet; once a broker starts there, the receiver connects and says so.
    port = free_port()
    p, lines = _serve(tmp_path, f'host = "127.0.0.1"\nport = {port}')
    try:
        assert _said(lines, "cannot reach the broker", 1)
        b = MosquittoBroker(port=port, workdir=tmp_path / "late")
        b.start()
        try:
            assert _said(lines, "subscribed", 1), "".join(lines)[-2000:]
        finally:
            b.close()
    finally:
        stop_receiver(p)
