"""The command-line faces: help that explains, one-line errors with exit status 2, JSON shapes scripts rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.store import Store
from harvester_common import wire


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("cmd", ["run", "simulate", "status", "demo"])
def test_help_explains_every_command(cmd: str) -> None:
    r = _run(cmd, "--help")
    assert r.returncode == 0 and "--config" in r.stdout


def test_config_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = "x"\n')
    for args in (["run", "--config", str(bad)], ["status", "--config", str(tmp_path / "nope.toml")],
                 ["simulate", "--config", str(bad)], ["demo", "--fault", "flat_tyre", "--workdir", str(tmp_path)]):
        r = _run(*args)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("harvester-agent: error: ")


def test_status_json_reports_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('[store]\npath = "s.sqlite"\n[vehicle]\nid = "v7"\n')
    assert main(["status", "--config", str(cfg)]) == 2  # no store yet
    s = Store(tmp_path / "s.sqlite", first_seq=1)
    s.append_samples(wire.SampleColumns([("A", "", "")], np.zeros(3, np.uint16), np.arange(3, dtype=np.int64),
                                        np.ones(3)))
    s.append_records([("alert", {"ts": 1.0})])
    s.ack([(1, 3)])
    s.close()
    capsys.readouterr()
    assert main(["status", "--config", str(cfg), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["records_written"] == {"samples": 3, "records": 1}
    assert st["highest_seq"] == 4 and st["last_acked_seq"] == 3
    assert st["backlog"] == {"alert": {"rows": 1, "records": 1, "bytes": st["backlog"]["alert"]["bytes"]}}
    assert st["vehicle"] == "v7"


def test_simulate_puts_frames_on_the_configured_bus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('[[can]]\ninterface = "virtual"\nchannel = "cli-sim"\n'
                   f'[sim]\nseed = 2\nserial_link = "{tmp_path / "gps"}"\n')
    assert main(["simulate", "--config", str(cfg), "--duration", "2", "--speed", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frames_sent"] > 150 and out["nmea_sentences"] >= 3
    assert not (tmp_path / "gps").exists()  # the pty link is removed at the end
