"""Configuration: defaults, one-line errors naming key and reason, and docs that match the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent.config import AgentConfig, ConfigError, load_config
from cloud_sync.config import load_config as load_cloud_config

REPO = Path(__file__).resolve().parents[1]


def test_empty_file_gives_every_default(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text("")
    cfg = load_config(f)
    d = AgentConfig()
    assert (cfg.vehicle, cfg.mqtt, cfg.store, cfg.log, cfg.can, cfg.serial) == (
        d.vehicle, d.mqtt, d.store, d.log, [], [])
    assert cfg.model.path == tmp_path / d.model.path  # relative default, resolved against the file's folder


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[mqtt]\nport = "x"\n', "mqtt.port"),
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ("[mqt]\nport = 1\n", "mqt: Extra inputs"),
        ('[vehicle]\nid = "has space"\n', "vehicle.id"),
        ("[store]\nmax_bytes = 10\n", "store.max_bytes"),
        ("[[can]]\nbitrate = -1\n", "can.0.bitrate"),
        # limits that were constants before they were keys: out of range is the same one-line error
        ("[[can]]\nbatch_max_frames = 0\n", "can.0.batch_max_frames"),
        ("[[can]]\nbatch_max_s = 0\n", "can.0.batch_max_s"),
        ("[[can]]\nconnect_timeout_s = -1\n", "can.0.connect_timeout_s"),
        ("[[serial]]\nread_timeout_s = 11\n", "serial.0.read_timeout_s"),
        ("[pipeline]\nqueue_max_batches = 0\n", "pipeline.queue_max_batches"),
        ("[model]\nalert_heartbeat_s = 0\n", "model.alert_heartbeat_s"),
        ("[store]\nevict_watermark = 1.0\n", "store.evict_watermark"),
        ("[mqtt]\nsession_expiry_s = 4294967296\n", "mqtt.session_expiry_s"),
        ("[mqtt]\nmax_ack_bytes = 100000\n", "mqtt.max_ack_bytes"),
        ("[mqtt]\nstatus_interval_s = 0.5\n", "mqtt.status_interval_s"),
        ("[mqtt]\nstop_drain_s = -1\n", "mqtt.stop_drain_s"),
        ("[log]\nreport_every_s = 0\n", "log.report_every_s"),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_invalid_files_name_the_key_and_reason(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert needle in msg and str(f) in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[mqtt]\nmax_inflight_messages = 0\n", "mqtt.max_inflight_messages"),
        ("[mqtt]\nreconnect_max_s = 0\n", "mqtt.reconnect_max_s"),
        ("[mqtt]\nsession_expiry_s = -1\n", "mqtt.session_expiry_s"),
        ("[db]\nconnect_timeout_s = 0\n", "db.connect_timeout_s"),
        ("[receiver]\ndb_retry_s = 0\n", "receiver.db_retry_s"),
        ("[web]\nmax_signals = 0\n", "web.max_signals"),
        ("[web]\ncontext_s = -5\n", "web.context_s"),
        ("[log]\nreport_every_s = 0.1\n", "log.report_every_s"),
        ("[web]\ncontext = 5\n", "web.context: Extra inputs"),
    ],
)
def test_invalid_cloud_files_name_the_key_and_reason(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_cloud_config(f)
    msg = str(e.value)
    assert needle in msg and str(f) in msg and "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "a.toml"
    f.write_text('[store]\npath = "state/x.sqlite"\n[[can]]\ndbc = ["my.dbc"]\n')
    cfg = load_config(f)
    assert cfg.store.path == tmp_path / "sub" / "state" / "x.sqlite"
    assert cfg.can[0].dbc == [tmp_path / "sub" / "my.dbc"]


@pytest.mark.parametrize("example", ["systemd/harvester-agent.toml", "docs/examples/demo-agent.toml"])
def test_shipped_examples_are_valid(example: str) -> None:
    load_config(REPO / example)


def _fmt_default(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return f'"{v}"'
    return repr(v)


def test_every_key_is_documented_with_its_default() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    sections = {m.group(1): m.start() for m in re.finditer(r"^## `\[+(\w+)\]+`", doc, re.M)}
    cfg = AgentConfig()
    for section, field in AgentConfig.model_fields.items():
        if section == "sim":
            continue
        assert section in sections, f"docs/configuration.md has no section for [{section}]"
        start = sections[section]
        end = min([p for p in sections.values() if p > start], default=len(doc))
        body = doc[start:end]
        value = getattr(cfg, section)
        model: type[BaseModel] = type(value[0]) if isinstance(value, list) and value else (
            field.annotation.__args__[0] if isinstance(value, list) else type(value))  # type: ignore[union-attr]
        for key, f in model.model_fields.items():
            row = re.search(rf"^\| `{key}` \| ([^|]+) \|", body, re.M)
            assert row, f"[{section}] {key} is not documented"
            default = f.get_default(call_default_factory=True)
            if default is None:
                assert row.group(1).strip() == "none", f"[{section}] {key}: default is none"
            else:
                assert row.group(1).strip() == f"`{_fmt_default(default)}`", f"[{section}] {key}: default {default!r}"
