"""The records that flow through the pipeline.

Samples travel in bulk as `SampleBatch` (columnar numpy arrays), never one Python object per reading: the
hot path decodes tens of thousands of frames per second. Alerts and DTC events are rare and small, so they are
plain dataclasses serialised to JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Alert:
    """A model alert. `state` is "open" when raised and "closed" when the condition clears; both are records."""

    alert_id: str
    state: str
    model: str
    model_version: str
    score: float
    threshold: float
    window_start: float
    window_end: float
    ts: float
    label: str = ""
    top_features: list[tuple[str, float]] = field(default_factory=list)
    snapshot: dict[str, float] = field(default_factory=dict)
    # Why a close was not the model's own: "agent_stop", "agent_restart", "model_changed"; empty otherwise.
    reason: str = ""
    # The model's features this window had (a machine may not send them all): what the score was based on.
    features_present: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Event:
    """Anything else worth telling the cloud: DTC open/close, source down/up, evictions, model changes."""

    kind: str
    ts: float
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy was most of the cost of a DTC storm. The record is encoded soon
        # after and an event's data is built afresh by whoever emits it, so a copy of the top level is enough.
        return {"kind": self.kind, "ts": self.ts, "data": dict(self.data)}


@dataclass(slots=True)
class SampleArrays:
    """Decoded samples in columnar form: timestamps (s), signal ids (SignalRegistry), values."""

    ts: Any  # npt.NDArray[np.float64]
    sid: Any  # npt.NDArray[np.int32]
    value: Any  # npt.NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.ts.shape[0])
