"""The one shape of every decoder: a batch from one source in, columnar samples and events out.

A source is one CAN bus (its batches are `FrameBatch`es) or one serial device (its batches are lines with the time
they were read). The pipeline holds one decoder per source and treats them all alike (agent/pipeline.py); what a
decoder carries from batch to batch (transport sessions, the DM1 active set, the current GPS fix) stays inside it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from agent.records import Event, SampleArrays

Lines = Sequence[tuple[float, bytes]]  # a serial device's batch: (time read, line)
Batch = TypeVar("Batch", contravariant=True)


@dataclass(slots=True)
class Decoded:
    samples: SampleArrays
    events: list[Event] = field(default_factory=list)
    # The decoder's `state()` moved with these events: it is saved in their transaction, so that a restart
    # continues from exactly what was announced.
    state_changed: bool = False
    # ... and in a way no later input will tell again (an address claim: ECUs claim at power-up): the state is
    # written at once, not with the next flush, so a crash right after cannot lose it.
    state_urgent: bool = False


@runtime_checkable
class Decoder(Protocol[Batch]):
    """Decodes the batches of one source. Never raises on bad input: what it cannot decode is counted in `errors`
    by reason and yields nothing."""

    @property
    def input_kind(self) -> str:
        """What one item of a batch is: "frames" or "lines" (the pipeline counts them apart)."""
        ...

    @property
    def errors(self) -> Counter[str]: ...

    @property
    def state_key(self) -> str | None:
        """Where `state()` is saved (a store state key), or None: nothing to carry over a restart."""
        ...

    def decode(self, batch: Batch) -> Decoded: ...

    def signals(self) -> set[str]:
        """Every signal name it can produce (a model's contract is checked against these)."""
        ...

    def counters(self) -> dict[str, int]:
        """What it has seen, by name (frames decoded, sentences...); errors are apart, in `errors`."""
        ...

    def state(self) -> Any:
        """What a restart must continue from, as JSON; saved under `state_key` when a batch changes it."""
        ...

    def restore(self, saved: object) -> bool:
        """Take back a saved `state()`; False, and nothing changed, if it is damaged."""
        ...


class NoState:
    """For a decoder with nothing that must outlive a restart."""

    state_key: str | None = None

    def state(self) -> None:
        return None

    def restore(self, saved: object) -> bool:
        return saved is None


def decode_lines(lines: Lines, decode_line: Callable[[bytes], list[tuple[str, float]]],
                 sid: Callable[[str], int]) -> SampleArrays:
    """Each line's readings as samples at the time the line was read."""
    ts: list[float] = []
    sids: list[int] = []
    val: list[float] = []
    for t, line in lines:
        for name, v in decode_line(line):
            ts.append(t)
            sids.append(sid(name))
            val.append(v)
    return SampleArrays(np.array(ts), np.array(sids, np.int32), np.array(val))
