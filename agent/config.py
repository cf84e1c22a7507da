"""Agent configuration: one TOML file, validated once at start into typed pydantic models.

Every key has a default (documented in docs/configuration.md); unknown keys are errors so that a typo never
silently falls back to a default. Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.drift import DriftPolicy
from harvester_common import wire

# Re-exported: the agent's code and users say agent.config.ConfigError.
from harvester_common.configfile import ConfigError as ConfigError
from harvester_common.configfile import load_model as load_model


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VehicleConfig(_Section):
    # The receiver checks the same pattern (wire.ID_PATTERN): a vehicle it would refuse cannot be configured.
    fleet: str = Field("default", pattern=wire.ID_PATTERN)
    id: str = Field("vehicle-0001", pattern=wire.ID_PATTERN)


class CanBusConfig(_Section):
    name: str = Field("can0", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    interface: str = "socketcan"
    channel: str = "can0"
    bitrate: int | None = Field(None, gt=0)
    dbc: list[Path] = Field(default_factory=list)
    receive_timeout_s: float = Field(0.2, gt=0, le=10)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)


class SerialConfig(_Section):
    name: str = Field("gps", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    port: str = "/dev/ttyUSB0"
    baudrate: int = Field(4800, gt=0)
    protocol: Literal["nmea", "csv", "kv"] = "nmea"
    fields: list[str] = Field(default_factory=list)
    units: dict[str, str] = Field(default_factory=dict)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    max_line_bytes: int = Field(256, ge=82, le=65536)


class ModelConfig(_Section):
    path: Path = Path("models/harvester-anomaly.int8.onnx")
    threads: int = Field(1, ge=1, le=16)
    batch_windows: int = Field(16, ge=1, le=4096)
    drift_interval_s: float = Field(3600.0, ge=10, le=7 * 86400)
    drift_z_max: float = Field(3.0, gt=0)
    drift_std_ratio_max: float = Field(3.0, gt=1)
    drift_missing_max: float = Field(0.2, gt=0, le=1)
    drift_min_windows: int = Field(60, ge=1)
    alert_resume_s: float = Field(120.0, ge=0, le=86400)
    drift_unfamiliar_max: float = Field(0.05, gt=0, le=1)

    def drift_policy(self) -> DriftPolicy:
        return DriftPolicy(self.drift_z_max, self.drift_std_ratio_max, self.drift_missing_max, self.drift_min_windows,
                           self.drift_unfamiliar_max)


class StoreConfig(_Section):
    path: Path = Path("/var/lib/harvester-agent/buffer.sqlite")
    max_bytes: int = Field(512 * 1024 * 1024, ge=1024 * 1024)
    flush_interval_s: float = Field(1.0, gt=0, le=60)
    # At most one wire segment's worth (wire.MAX_SEGMENT_SAMPLES); the store splits anything larger anyway.
    flush_max_samples: int = Field(20_000, ge=1, le=wire.MAX_SEGMENT_SAMPLES)
    memory_max_samples: int = Field(500_000, ge=1000)
    memory_max_records: int = Field(10_000, ge=10)


class MqttConfig(_Section):
    host: str = "localhost"
    port: int = Field(1883, gt=0, lt=65536)
    client_id: str = ""
    keepalive_s: int = Field(30, ge=5, le=3600)
    tls: bool = True  # plain TCP only when a lab config says so
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Bounded by wire.MAX_BATCH_BYTES so that every batch fits the receiver's caps (docs/protocol.md).
    batch_max_bytes: int = Field(256 * 1024, ge=1024, le=wire.MAX_BATCH_BYTES)
    batch_max_age_s: float = Field(5.0, gt=0, le=600)
    max_inflight_batches: int = Field(4, ge=1, le=1000)
    ack_timeout_s: float = Field(30.0, gt=0)
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(60.0, gt=0)
    daily_budget_bytes: int = Field(0, ge=0)

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _no_empty(cls, v: Path | None) -> Path | None:
        return None if v is not None and str(v) == "" else v


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class AgentConfig(_Section):
    vehicle: VehicleConfig = VehicleConfig()
    can: list[CanBusConfig] = Field(default_factory=list)
    serial: list[SerialConfig] = Field(default_factory=list)
    model: ModelConfig = ModelConfig()
    store: StoreConfig = StoreConfig()
    mqtt: MqttConfig = MqttConfig()
    log: LogConfig = LogConfig()
    # The simulator's own settings live in the same file so that the demo is one file; the agent ignores them.
    sim: dict[str, Any] = Field(default_factory=dict)


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent config file; raise ConfigError with a one-line reason."""
    return load_model(path, AgentConfig)
