"""cloud_sync configuration: a TOML file validated into pydantic models (docs/cloud_sync.md lists every key)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from harvester_common import wire
from harvester_common.configfile import ConfigError, load_model

__all__ = ["CloudConfig", "ConfigError", "load_config"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CloudMqttConfig(_Section):
    host: str = "localhost"
    port: int = Field(1883, gt=0, lt=65536)
    client_id: str = Field("cloud-sync-1", min_length=1, max_length=128)
    share_group: str = Field("cloud_sync", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    fleet: str = Field("+", pattern=r"^(\+|[A-Za-z0-9_.-]{1,64})$")
    keepalive_s: int = Field(30, ge=5, le=3600)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    session_expiry_s: int = Field(86400, ge=0)
    # While the broker cannot be reached, `serve` says so at once and then again at most this often.
    unreachable_report_s: float = Field(30.0, ge=1, le=3600)
    # Payloads above this are rejected before decoding. It may not go below wire.MAX_MESSAGE_BYTES, the most a
    # correctly configured vehicle can send (docs/protocol.md "Limits").
    max_message_bytes: int = Field(wire.MAX_MESSAGE_BYTES, ge=wire.MAX_MESSAGE_BYTES)


class DbConfig(_Section):
    path: Path = Path("cloud.sqlite")
    # PostgreSQL for a fleet: "postgresql://user:password@host:5432/dbname" (libpq URL or key=value string).
    # Empty: the SQLite file at `path`.
    url: str = Field("", pattern=r"^(|postgres(ql)?://.*|.*dbname=.*)$")


class ReceiverConfig(_Section):
    queue_max: int = Field(1000, ge=1)
    commit_max_messages: int = Field(50, ge=1, le=10_000)


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class CloudConfig(_Section):
    mqtt: CloudMqttConfig = CloudMqttConfig()
    db: DbConfig = DbConfig()
    receiver: ReceiverConfig = ReceiverConfig()
    log: LogConfig = LogConfig()


def load_config(path: str | Path) -> CloudConfig:
    return load_model(path, CloudConfig)
