"""Agent configuration: one TOML file, validated once at start into typed pydantic models.

Every limit and tunable of the agent is a key here, with its default, its allowed range and its meaning in one
place: the components read them from the config object they are given, and docs/configuration.md's key tables are
generated from these models (`python docs/configdoc.py`). Unknown keys are errors so that a typo never silently
falls back to a default. Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.drift import DriftPolicy
from agent.dtcdebounce import DtcPolicy
from harvester_common import wire

# Re-exported: the agent's code and users say agent.config.ConfigError.
from harvester_common.configfile import ConfigError as ConfigError
from harvester_common.configfile import load_model as load_model


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VehicleConfig(_Section):
    # The receiver checks the same pattern (wire.ID_PATTERN): a vehicle it would refuse cannot be configured.
    fleet: str = Field("default", pattern=wire.ID_PATTERN, description=(
        "fleet name; first level of the MQTT topic tree (`fleet/{fleet}/vehicle/{id}/...`). Letters, digits, "
        "`_.-`."))
    id: str = Field("vehicle-0001", pattern=wire.ID_PATTERN, description=(
        "this vehicle's id; must match its client certificate when the broker enforces ACLs."))


class CanBusConfig(_Section):
    name: str = Field("can0", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description=(
        "label of the bus; signals from it have source `name/NAME` once their ECU has claimed its address (its "
        "J1939 NAME in 16 hex digits), else `name/SA` (e.g. `can0/00`; docs/j1939.md)."))
    interface: str = Field("socketcan", description=(
        "any python-can interface: `socketcan`, `slcan`, `pcan`, `socketcand`, `virtual`, ... `virtual` reaches "
        "only buses in the same process (the agent warns at start); for a simulator in another process on the "
        "same host use `socketcand` (below). `udp_multicast` sends its datagrams out through the network "
        "interface: not for one host (and needs `pip install msgpack`, which the package no longer pulls in for "
        "it)."))
    channel: str = Field("can0", description=(
        "the interface's channel (`can0`, `/dev/ttyACM0@115200` for slcan, a group for virtual)."))
    bitrate: int | None = Field(None, gt=0, description=(
        "bit rate for interfaces that set it (slcan, pcan); SocketCAN's is set with `ip link`."))
    dbc: list[Path] = Field(default_factory=list, description=(
        "extra DBC files, merged by PGN over the built-in J1939 definitions (a later file wins)."))
    receive_timeout_s: float = Field(0.2, gt=0, le=10, description=(
        "how long one read waits for a frame when none is pending; bounds shutdown latency."))
    batch_max_frames: int = Field(2000, ge=1, le=100_000, description=(
        "frames are handed to the pipeline in batches of at most this many ..."))
    batch_max_s: float = Field(0.2, gt=0, le=10, description=(
        "... or after this long since a batch's first frame, or as soon as a read finds the bus quiet. "
        "One batch is one entry of the pipeline's queue (`[pipeline] queue_max_batches`)."))
    read_interval_s: float = Field(0.05, gt=0, le=1, description=(
        "while a batch fills, the source sleeps this long between reads and takes all that arrived meanwhile: "
        "one thread wake-up per read instead of one per frame. The interface queues frames meanwhile: a "
        "SocketCAN socket's receive buffer (the agent asks for 1 MiB; the kernel caps it at "
        "`net.core.rmem_max`) must hold this long of traffic; its overflows are counted "
        "(`source.<name>.dropped{rx_overflow}`)."))
    reconnect_min_s: float = Field(0.5, gt=0, description=(
        "first delay before reopening a bus that failed (doubles each time). The outage is a `source_down` "
        "event, its end `source_up` (docs/delivery.md)."))
    reconnect_max_s: float = Field(30.0, gt=0, description="longest delay between attempts.")
    connect_timeout_s: float = Field(5.0, gt=0, le=300, description=(
        "`socketcand` only: how long opening the TCP connection to the server may take before the open fails "
        "(and is retried with the backoff above)."))
    options: dict[str, Any] = Field(default_factory=dict, description=(
        "extra keyword arguments passed to `can.Bus(...)` as they are."))


class SerialConfig(_Section):
    name: str = Field("gps", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description=(
        "label; signals get this as their source. Not the `name` of a CAN bus (the agent refuses to start)."))
    port: str = Field("/dev/ttyUSB0", description=(
        "device path (a stable `/dev/serial/by-id/...` link is best on a vehicle)."))
    baudrate: int = Field(4800, gt=0, description="NMEA's standard; many receivers use 9600 or 115200.")
    protocol: Literal["nmea", "csv", "kv"] = Field("nmea", description=(
        "line protocol: `nmea` (GGA, RMC, VTG from any talker; one value per signal and fix, see "
        "agent/decode/nmea.py), `csv` (comma-separated numbers, named by `fields` in order) or `kv` (`key=value` "
        "pairs). Signals of `csv`/`kv` are `{name}.{field}`."))
    fields: list[str] = Field(default_factory=list, description=(
        "`csv`: the name of each column in order (`\"\"` skips one); `kv`: the keys to keep (empty keeps all)."))
    units: dict[str, str] = Field(default_factory=dict, description="unit per field, e.g. `{AccelRms = \"g\"}`.")
    reconnect_min_s: float = Field(0.5, gt=0, description=(
        "first delay before reopening a missing or lost device (doubles each time). The outage is a "
        "`source_down` event, its end `source_up` (docs/delivery.md)."))
    reconnect_max_s: float = Field(30.0, gt=0, description="longest delay between attempts.")
    max_line_bytes: int = Field(256, ge=82, le=65536, description=(
        "longer lines are dropped and counted (NMEA's limit is 82)."))
    read_timeout_s: float = Field(0.2, gt=0, le=10, description=(
        "how long one read of the device waits for bytes; bounds shutdown latency."))


class PipelineConfig(_Section):
    queue_max_batches: int = Field(2000, ge=1, le=1_000_000, description=(
        "batches (of CAN frames or serial lines) waiting for the processing thread. A source never waits: when "
        "the queue is full its batch is dropped and counted (`queue_full_can`, `queue_full_serial` in the "
        "status message's `dropped`, by frame or line). Source events (`source_down`, `source_up`) wait in a "
        "queue of their own with the same bound, drained first, so a full data queue never drops them."))
    dtc_debounce_s: float = Field(60.0, ge=0, le=3600, description=(
        "quiet period of a DTC (source, SPN, FMI), in data time, from its first transition: that one and the next "
        "go out at once; more within it (a flapping DTC) become one `dtc_flapping` event with their count and "
        "first and last time, sent when the period ends (or at a stop), one per period while it flaps. A DTC's "
        "`dtc_update`s have a period of their own: the first goes out at once, the rest within it become one "
        "`dtc_update` (the last, with their count and first and last time); 0: every transition and update goes "
        "out as itself (docs/delivery.md, \"DTC storms\")."))
    dtc_max_events_per_min: int = Field(30, ge=0, le=100_000, description=(
        "at most this many DTC events per source address per minute of data time, half of which (rounded down) "
        "only first opens may use (a DTC new or quiet for a period: other events cannot crowd those out); the rest "
        "are merged into one `dtc_storm` summary per source and minute (counts by kind, first and last time, DTCs "
        "left open) and counted (`pipeline.dtc_events_merged`); 0: no bound."))

    def dtc_policy(self) -> DtcPolicy:
        return DtcPolicy(self.dtc_debounce_s, self.dtc_max_events_per_min)


class ModelConfig(_Section):
    path: Path = Field(Path("models/harvester-anomaly.int8.onnx"), description=(
        "the ONNX model with its contract in `metadata_props` (docs/models.md). A model that cannot be loaded or "
        "fed is refused with the reason; the agent then runs without scoring and still stores and syncs data."))
    threads: int = Field(1, ge=1, le=16, description=(
        "onnxruntime intra-op threads; one keeps a core free for ingest on a small computer."))
    batch_windows: int = Field(16, ge=1, le=4096, description="most windows scored in one onnxruntime call.")
    drift_interval_s: float = Field(3600.0, ge=10, le=7 * 86400, description=(
        "a `drift` event (running per-feature statistics vs the training statistics in the model's contract) is "
        "stored and synced this often in data time, and at once whenever the drift flag changes (docs/models.md, "
        "\"Drift\")."))
    drift_z_max: float = Field(3.0, gt=0, description=(
        "a feature drifts when its running mean is more than this many training standard deviations from the "
        "training mean ..."))
    drift_std_ratio_max: float = Field(3.0, gt=1, description=(
        "... or its standard deviation is more than this many times training's (a narrower spread is normal for "
        "one vehicle) ..."))
    drift_missing_max: float = Field(0.2, gt=0, le=1, description=(
        "... or it is missing this much more often than in training ..."))
    drift_unfamiliar_max: float = Field(0.05, gt=0, le=1, description=(
        "... or it lies outside the range the model was trained on (the familiarity guard, docs/models.md) in "
        "more than this share of windows."))
    drift_min_windows: int = Field(60, ge=1, description=(
        "no verdict before this many windows (five minutes at a 5 s hop)."))
    alert_resume_s: float = Field(120.0, ge=0, le=86400, description=(
        "an alert left open by a run that ended without a clean stop (crash, power cut, SIGKILL) is carried on "
        "under the same id if the agent starts again within this many seconds of the previous run's last sign of "
        "life (saved every `alert_heartbeat_s` while the alert is open) with the same model name and version; "
        "otherwise it is closed at start with `reason` `agent_restart` (or `model_changed`). 0: always close. A "
        "clean stop closes the open alert (`reason` `agent_stop`). docs/delivery.md, \"Restarts\"."))
    alert_heartbeat_s: float = Field(10.0, gt=0, le=3600, description=(
        "while an alert is open, its owner's sign of life is saved in the store this often (wall clock): what "
        "`alert_resume_s` is measured from after an unclean stop. Keep it well below `alert_resume_s`."))
    trusted_keys: list[Path] = Field(default_factory=list, description=(
        "the public keys a model package must be signed with (docs/models.md, \"Signed packages\"): Ed25519 "
        "public key files (PEM), or directories whose every `*.pub` is one. A key is known by the SHA-256 of the "
        "key itself, not by its file name: rotate keys by adding the new one's file, then removing the old. A "
        "named file that is missing or not such a key is an error. Empty (the default): no package is accepted."))
    # Model updates on the vehicle (docs/models.md, "On the vehicle: download, shadow, switch, rollback").
    dir: Path | None = Field(None, description=(
        "the model directory: packages received from the cloud (by package hash), a partial download, the pointer "
        "to the active and previous package (`active.json`) and the update step (`state.json`). Unset: `models` "
        "beside the store (`/var/lib/harvester-agent/models` with the default `[store] path`, inside the unit's "
        "StateDirectory). At start the agent scores with the pointer's active package if it loads and verifies, "
        "else the previous one, else `path`."))
    download_window: int = Field(4, ge=1, le=64, description=(
        "chunks of a package requested and not yet received at any time (`model/get`): bounds what a lost link "
        "wastes and what the cloud sends at once."))
    chunk_timeout_s: float = Field(30.0, gt=0, le=3600, description=(
        "when no answer (a chunk with its slot's size and hash, or such a copy of one requested again) arrived "
        "for this long, the chunks requested and not received are requested again (a slow link whose chunks keep "
        "coming is not asked twice; forged chunks do not hold it off); each further timeout without an answer "
        "doubles the wait, up to 8x, and an answer resets it. A reconnect to a session the broker kept does not "
        "ask again."))
    chunk_max_bad: int = Field(5, ge=1, le=1000, description=(
        "a chunk that arrives this many times, in answer to a request, with data that does not match its hash "
        "fails the download (`failed`, the reason names the chunk; the chunks held are kept for a next attempt); "
        "each bad one is dropped, counted and requested again. Bad data nobody asked for is dropped and counted "
        "only."))
    shadow_windows: int = Field(120, ge=1, le=100_000, description=(
        "a verified candidate scores this many windows beside the active model (its own feature windows, once "
        "they hold a full window of data) before the decision (ten minutes at a 5 s hop)."))
    shadow_max_invalid_rate: float = Field(0.01, ge=0, le=1, description=(
        "the candidate is rejected when its share of windows with a non-finite output is more than this above "
        "the active model's ..."))
    shadow_max_alert_rate_increase: float = Field(0.05, ge=0, le=1, description=(
        "... or its share of windows in alert state (its own alert logic, with its contract's policy) is more "
        "than this above the active model's ..."))
    shadow_max_latency_ratio: float = Field(4.0, ge=1, le=1000, description=(
        "... or the 95th percentile of its time per scoring call is more than this many times the active "
        "model's ..."))
    shadow_latency_floor_ms: float = Field(5.0, ge=0, le=10_000, description=(
        "... and above this (a floor: both models in microseconds says nothing about a vehicle's CPU) ..."))
    shadow_min_scored_ratio: float = Field(0.9, ge=0, le=1, description=(
        "... or it scores fewer windows than this share of what the active model scored. A scoring call that "
        "raises rejects it at once."))
    watch_windows: int = Field(120, ge=1, le=100_000, description=(
        "after the switch the new model is watched for this many windows with the same bounds, against the "
        "figures the previous model had in the shadow run; it is rolled back at once (at a window boundary) "
        "when they fail, and reported healthy when they pass."))
    progress_interval_s: float = Field(10.0, ge=1, le=3600, description=(
        "while a package downloads or a candidate shadows, `model/status` reports progress at most this often "
        "(every step change is reported at once)."))

    def drift_policy(self) -> DriftPolicy:
        return DriftPolicy(self.drift_z_max, self.drift_std_ratio_max, self.drift_missing_max, self.drift_min_windows,
                           self.drift_unfamiliar_max)


class StoreConfig(_Section):
    path: Path = Field(Path("/var/lib/harvester-agent/buffer.sqlite"), description="the outbox (SQLite, WAL).")
    max_bytes: int = Field(512 * 1024 * 1024, ge=1024 * 1024, description=(
        "size bound (512 MiB). Past it the oldest samples are evicted first, alerts and events last; each eviction "
        "is counted and reported upstream."))
    evict_watermark: float = Field(0.9, ge=0.1, lt=1, description=(
        "an eviction frees space down to this share of `max_bytes`, so that a store at its bound does not evict "
        "on every write."))
    flush_interval_s: float = Field(1.0, gt=0, le=60, description=(
        "samples are written as one segment at least this often; DTC and other decoder events wait for the same "
        "flush, in one transaction (alerts and a DTC's first open are written at once)."))
    # At most one wire segment's worth (wire.MAX_SEGMENT_SAMPLES); the store splits anything larger anyway.
    flush_max_samples: int = Field(20_000, ge=1, le=wire.MAX_SEGMENT_SAMPLES, description=(
        "... or when this many samples wait in memory. At most a wire segment's worth (`harvester_common/wire.py` "
        "`MAX_SEGMENT_SAMPLES`); the store writes anything larger as several segments within the wire's limits "
        "(docs/protocol.md, Limits)."))
    memory_max_samples: int = Field(500_000, ge=1000, description=(
        "while the store cannot be written (disk full, read-only, I/O error), at most this many samples wait in "
        "memory; the oldest beyond it are dropped and counted (`samples_dropped_store_unavailable`)."))
    memory_max_records: int = Field(10_000, ge=10, description=(
        "the same for alerts and events (`records_dropped_store_unavailable`); scoring goes on meanwhile."))


class MqttConfig(_Section):
    host: str = Field("localhost", description="broker host.")
    port: int = Field(1883, gt=0, lt=65536, description="broker port (8883 for TLS by convention).")
    client_id: str = Field("", description="MQTT client id; empty means `{fleet}.{id}`.")
    keepalive_s: int = Field(30, ge=5, le=3600, description=(
        "MQTT keepalive; the broker publishes the Last Will after 1.5 x this of silence."))
    tls: bool = Field(True, description=(
        "TLS with the files below. Plain TCP (`false`) is for a lab: the agent logs a warning when it runs so."))
    ca_file: Path | None = Field(None, description="CA certificate that signed the broker's certificate.")
    cert_file: Path | None = Field(None, description="this vehicle's client certificate.")
    key_file: Path | None = Field(None, description="its private key.")
    session_expiry_s: int = Field(3600, ge=0, le=wire.MQTT_SESSION_EXPIRY_MAX, description=(
        "how long the broker keeps this vehicle's session (its subscriptions, and the acks and model chunks "
        "queued for it) while the vehicle is away. A reconnect within it resumes the session: the batches in "
        "flight stay in flight (their acks are queued in it; their `ack_timeout_s` starts over) and the chunks "
        "asked for are waited for. Past it, the acks and chunks were lost with the session: the batches in flight "
        "are sent again at the reconnect (the cloud dedups) and the chunks asked for again."))
    connack_timeout_s: float = Field(30.0, gt=0, le=600, description=(
        "a connection the broker has not accepted (CONNACK) within this time is dropped and tried again with "
        "the reconnect backoff."))
    # Bounded by wire.MAX_BATCH_BYTES so that every batch fits the receiver's caps (docs/protocol.md).
    batch_max_bytes: int = Field(256 * 1024, ge=1024, le=wire.MAX_BATCH_BYTES, description=(
        "a sample batch closes at this many (uncompressed) bytes... At most `harvester_common/wire.py` "
        "`MAX_BATCH_BYTES`, so that every batch fits what the cloud accepts (docs/protocol.md, Limits)."))
    batch_max_age_s: float = Field(5.0, gt=0, le=600, description=(
        "... or when its oldest segment is this old. Alerts and events never wait."))
    max_inflight_batches: int = Field(4, ge=1, le=1000, description=(
        "batches sent and not yet acknowledged by the cloud."))
    live_lane_s: float = Field(60.0, ge=0, le=86400, description=(
        "the **live lane**: the newest sample segments whose data ends within this many seconds of the newest "
        "sample stored since the agent started go ahead of the older backlog, which backfills oldest first behind "
        "them, so that after an outage the cloud sees the vehicle's present at once, not when its history has "
        "drained; samples stored during the backfill join the lane. 0 sends every sample oldest first "
        "(docs/delivery.md, \"The live lane\")."))
    ack_timeout_s: float = Field(30.0, gt=0, description=(
        "a batch not acknowledged in this time is sent again (the cloud dedups)."))
    # An ack names the ranges of one batch; the wire's own cap on an ack (wire.decode_ack) is 1 MiB. Never below
    # what the ack of the largest legal batch takes (wire.MAX_ACK_BYTES), or that batch would be resent for ever.
    max_ack_bytes: int = Field(256 * 1024, ge=wire.MAX_ACK_BYTES, le=1024 * 1024, description=(
        "a message on the ack topic larger than this is dropped unread and counted (`acks_rejected` "
        "`oversized`). At least the ack of the largest batch the wire allows (harvester_common/wire.py "
        "MAX_ACK_BYTES)."))
    recent_batches: int = Field(1024, ge=1, le=1_000_000, description=(
        "batch ids remembered after their ack, to tell a replayed ack (harmless, counted as `acks_replayed`) from "
        "one for a batch never sent (`acks_rejected` `not_in_flight`)."))
    status_interval_s: float = Field(30.0, ge=1, le=86400, description=(
        "while connected, the retained `status` message (backlog, drift, model, counters) is published this "
        "often, besides at each connect."))
    reconnect_min_s: float = Field(1.0, gt=0, description=(
        "first reconnect delay; doubles per failure, with full jitter."))
    reconnect_max_s: float = Field(60.0, gt=0, description="longest reconnect delay.")
    daily_budget_bytes: int = Field(0, ge=0, description=(
        "bytes the vehicle may send per UTC day on a metered (cellular) link; 0 means no limit. When the day's "
        "budget is spent, sample batches are **held back** in the store (nothing is dropped: the size bound still "
        "applies) until the next UTC day; alerts, events and status always go, and count towards the budget."))
    stop_drain_s: float = Field(5.0, ge=0, le=300, description=(
        "at a clean stop (SIGTERM), how long the uplink keeps sending the backlog and waiting for acks before the "
        "store is closed; `harvester-agent run --drain-s` overrides it. Keep the whole stop inside the unit's "
        "`TimeoutStopSec` (systemd/harvester-agent.service)."))

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _no_empty(cls, v: Path | None) -> Path | None:
        return None if v is not None and str(v) == "" else v


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description=(
        "logs go to stderr (journald on the vehicle)."))
    report_every_s: float = Field(60.0, ge=1, le=86400, description=(
        "`harvester-agent run` logs a progress line (frames, windows, alerts, backlog, synced, connected) this "
        "often."))
    warn_every_s: float = Field(60.0, ge=1, le=86400, description=(
        "a repeated warning (a source that keeps failing, dropped data, bad acks) is logged at most once per "
        "component and reason this often, with how many happened in between: a flood must not flood the journal "
        "(agent/metrics.py; every occurrence is still counted)."))


class AgentConfig(_Section):
    vehicle: VehicleConfig = VehicleConfig()
    can: list[CanBusConfig] = Field(default_factory=list)
    serial: list[SerialConfig] = Field(default_factory=list)
    pipeline: PipelineConfig = PipelineConfig()
    model: ModelConfig = ModelConfig()
    store: StoreConfig = StoreConfig()
    mqtt: MqttConfig = MqttConfig()
    log: LogConfig = LogConfig()
    # The simulator's own settings live in the same file so that the demo is one file; the agent ignores them.
    sim: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _source_names_unique(self) -> AgentConfig:
        # Batches, decoders, saved DTC state, metrics and source events are all keyed by the source's name: two
        # sources with one name would share them (and their frames be decoded as one bus). Buses and serial devices
        # share the name space.
        seen: set[str] = set()
        for kind, name in [("can", b.name) for b in self.can] + [("serial", s.name) for s in self.serial]:
            if name in seen:
                raise ValueError(f"source name {name!r} is used twice ([[{kind}]] and another [[can]] or "
                                 "[[serial]]); every bus and serial device needs its own name")
            seen.add(name)
        return self


def model_dir(cfg: AgentConfig) -> Path:
    """`[model] dir`, or `models` beside the store."""
    return cfg.model.dir if cfg.model.dir is not None else cfg.store.path.parent / "models"


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent config file; raise ConfigError with a one-line reason."""
    return load_model(path, AgentConfig)
