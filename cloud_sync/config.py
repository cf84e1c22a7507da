"""cloud_sync configuration: a TOML file validated into pydantic models.

Every limit and tunable of the cloud side is a key here, with its default, its allowed range and its meaning in one
place; docs/cloud_sync.md's key table is generated from these models (`python docs/configdoc.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from harvester_common import modelwire as mw
from harvester_common import wire
from harvester_common.configfile import ConfigError, load_model

__all__ = ["CloudConfig", "ConfigError", "load_config"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CloudMqttConfig(_Section):
    host: str = Field("localhost", description="broker")
    port: int = Field(1883, gt=0, lt=65536, description="broker port")
    client_id: str = Field("cloud-sync-1", min_length=1, max_length=128, description=(
        "stable per receiver: the broker keeps its session (and queued QoS 1 messages) across restarts"))
    share_group: str = Field("cloud_sync", pattern=r"^[A-Za-z0-9_-]{1,64}$", description=(
        "shared-subscription group; receivers in one group split the messages (behind the `acl_file` broker "
        "fallback, make it a secret random name: docs/deploy.md, \"Broker security\")"))
    fleet: str = Field("+", pattern=r"^(\+|[A-Za-z0-9_.-]{1,64})$", description="which fleet(s) to receive")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive")
    tls: bool = Field(False, description="TLS to the broker, with the three files below")
    ca_file: Path | None = Field(None, description="CA certificate that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="this receiver's client certificate")
    key_file: Path | None = Field(None, description="its private key")
    session_expiry_s: int = Field(86400, ge=0, le=wire.MQTT_SESSION_EXPIRY_MAX, description=(
        "how long the broker keeps the session while the receiver is away"))
    reconnect_min_s: int = Field(1, ge=1, le=3600, description=(
        "first delay before reconnecting to a broker that went away or cannot be reached; doubles per failure"))
    reconnect_max_s: int = Field(30, ge=1, le=3600, description="longest delay between reconnect attempts")
    max_inflight_messages: int = Field(100, ge=1, le=65535, description=(
        "acks (QoS 1) published to vehicles and not yet confirmed by the broker; more wait in the client's queue"))
    unreachable_report_s: float = Field(30.0, ge=1, le=3600, description=(
        "while the broker cannot be reached, `serve` says so at once and then at most this often"))
    max_message_bytes: int = Field(wire.MAX_MESSAGE_BYTES, ge=wire.MAX_MESSAGE_BYTES, description=(
        "larger payloads are rejected before decoding; may not be set below `harvester_common/wire.py` "
        "`MAX_MESSAGE_BYTES` (16 MiB), the most a correctly configured vehicle sends (docs/protocol.md, Limits)"))


class DbConfig(_Section):
    path: Path = Field(Path("cloud.sqlite"), description=(
        "the SQLite database (relative to the config file), used when `url` is empty"))
    url: str = Field("", pattern=r"^(|postgres(ql)?://.*|.*dbname=.*)$", description=(
        "PostgreSQL for a fleet: `postgresql://user:password@host:5432/dbname` (a libpq URL or key=value "
        "string; psycopg 3; `pip install './cloud_sync[postgres]'`: the harvester-cloud-sync distribution with its "
        "`postgres` extra). Several receivers may share it (docs/deploy.md)."))
    connect_timeout_s: int = Field(10, ge=1, le=600, description=(
        "PostgreSQL: how long one connection attempt may take before it counts as the database being away"))


class ReceiverConfig(_Section):
    queue_max: int = Field(1000, ge=1, description=(
        "messages waiting for the worker; when full, the broker is slowed down, nothing dropped"))
    commit_max_messages: int = Field(50, ge=1, le=10_000, description="most messages stored in one transaction")
    db_retry_s: float = Field(1.0, gt=0, le=300, description=(
        "while the database is away, the messages held are retried this often"))


class WebConfig(_Section):
    context_s: float = Field(120.0, ge=0, le=86400, description=(
        "`cloud-sync web`: an alert's plot shows the vehicle's signals this long either side of the window the "
        "model saw"))
    max_signals: int = Field(8, ge=1, le=100, description=(
        "signals plotted for one alert: those of its top features first, then those of its snapshot"))
    max_points: int = Field(20_000, ge=1, le=1_000_000, description=(
        "most points of one signal in an alert's plot (270 s of a 10 Hz signal is ~2,700)"))
    password_hash: str = Field("", pattern=r"^(|scrypt\$[0-9]+\$[0-9]+\$[0-9]+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+)$",
                               description=(
        "the page's sign-in secret (a password or a long token) as `cloud-sync hash-password` prints it: a salted "
        "scrypt hash, never the secret itself. Required when `cloud-sync web` listens off loopback or answers an "
        "`--allow-host` name; it refuses to start without it"))
    require_sign_in: bool = Field(False, description=(
        "ask for the secret on loopback too (off loopback it is always asked for)"))
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description=(
        "a sign-in lasts this long (sessions live in the server's memory: a restart signs everyone out)"))
    secure_cookie: bool = Field(False, description=(
        "mark the session cookie Secure even when the request came over http: for an https reverse proxy that does "
        "not send `X-Forwarded-Proto` (one that does, from 127.0.0.1, gets a Secure cookie without this)"))
    stream_poll_s: float = Field(2.0, ge=0.2, le=600, description=(
        "live updates (`/api/stream`): how often the server reads the fleet and new alerts from the database for "
        "the pages open (one read serves every open page)"))
    max_streams: int = Field(16, ge=1, le=1000, description=(
        "pages open with live updates at once; one more is refused (503) and polls instead"))


class RolloutConfig(_Section):
    trusted_keys: list[Path] = Field(default_factory=list, description=(
        "Ed25519 public key files (`cloud-sync model keygen`); `model publish` refuses a package that does not "
        "verify against one of them. Key ids come from the keys, not the file names"))
    chunk_bytes: int = Field(mw.DEFAULT_CHUNK_BYTES, ge=1, le=mw.MAX_CHUNK_BYTES, description=(
        "size of the chunks a package is sent in (`model/chunk`); the same on every receiver, and not changed "
        "while a rollout runs: a vehicle resumes a download by the chunk hashes of its desired message"))
    tick_s: float = Field(1.0, gt=0, le=3600, description=(
        "how often `serve`'s rollout controller sends desired models, folds reports and advances waves"))
    publish_timeout_s: float = Field(5.0, gt=0, le=600, description=(
        "how long a controller tick waits for the broker to confirm its `model/desired` publishes; one not "
        "confirmed by then is sent again at the next tick"))
    cache_bytes: int = Field(256 * 1024 * 1024, ge=mw.MAX_PACKAGE_BYTES, description=(
        "packages kept in memory to answer `model/get`, most recently used first (at least one package of the "
        "largest size)"))
    chunks_in_flight_bytes: int = Field(32 * 1024 * 1024, ge=mw.MAX_GET_COUNT * mw.MAX_CHUNK_BYTES,
                                        description=(
        "chunk bytes published and not yet confirmed by the broker; a `model/get` that would go past it is refused "
        "(`busy`) and the vehicle asks again later: a flood of requests cannot fill the receiver's memory"))


class QualityConfig(_Section):
    min_precision: float = Field(0.7, ge=0, le=1, description=(
        "`cloud-sync quality`: a model version whose precision (confirmed / (confirmed + false alarms)) is below "
        "this is due for retraining, once it has `min_verdicts` of those verdicts"))
    min_verdicts: int = Field(5, ge=1, le=1_000_000, description=(
        "confirmed + false-alarm verdicts a version needs before its precision can make it due for retraining"))
    max_drift_share: float = Field(0.2, ge=0, le=1, description=(
        "a version is due for retraining when, on some vehicle, more than this share of its drift reports naming "
        "the version say drifted (with at least `min_drift_reports` of them)"))
    min_drift_reports: int = Field(10, ge=1, le=1_000_000, description=(
        "drift reports a vehicle must have sent about a version before its drift share counts"))
    lead_window_h: float = Field(72.0, gt=0, le=8760, description=(
        "a breakdown is caught when an alert of its vehicle, not judged a false alarm, opened at most this many "
        "hours before it; the lead time is measured from the earliest such alert"))


class AssistantConfig(_Section):
    kb_dirs: list[Path] = Field(default_factory=list, description=(
        "`cloud-sync ask` and the fleet page's assistant panel: folders of the site's own Markdown maintenance "
        "documents (`*.md`, searched below each folder), indexed beside the ones shipped in cloud_sync/kb; "
        "docs/assistant.md gives their format"))
    index_path: Path = Field(Path("assistant-kb.sqlite"), description=(
        "the knowledge base's full-text index (SQLite FTS5; relative to the config file): brought up to date at each "
        "start (and by `cloud-sync web` before a question, every `refresh_s`) for the documents whose size, time or "
        "content changed; it may be deleted at any time"))
    season_start: str = Field("10-01", pattern=r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$", description=(
        "`this season` in a question starts on this month-day (UTC) of the current or the previous year"))
    refresh_s: float = Field(30.0, ge=0, le=86400, description=(
        "`cloud-sync web`'s chat panel: before a question, the knowledge base is brought up to date with its folders "
        "when it was last looked at longer ago than this (0: before every question); a document added or edited "
        "is found by the next question after that"))


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description=(
        "logs go to stderr"))
    report_every_s: float = Field(60.0, ge=1, le=86400, description=(
        "`serve` logs a progress line (batches, new records, duplicates, rejected) this often; "
        "`serve --report-every-s` overrides it"))


class CloudConfig(_Section):
    mqtt: CloudMqttConfig = CloudMqttConfig()
    db: DbConfig = DbConfig()
    receiver: ReceiverConfig = ReceiverConfig()
    web: WebConfig = WebConfig()
    rollout: RolloutConfig = RolloutConfig()
    quality: QualityConfig = QualityConfig()
    assistant: AssistantConfig = AssistantConfig()
    log: LogConfig = LogConfig()


def load_config(path: str | Path) -> CloudConfig:
    return load_model(path, CloudConfig)
