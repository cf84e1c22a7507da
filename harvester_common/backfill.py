"""The vehicle's backfill position, carried in a batch header's `extra` (docs/protocol.md, "Backfill position").

A vehicle that sends its newest samples ahead of an older backlog (the live lane, docs/delivery.md) leaves holes in
what the cloud has received that are not lost: the vehicle still holds those numbers and sends them behind. So every
batch says where the backfill stands, `{"extra": {"backfill_from": N}}`: the lowest sequence number the vehicle holds
and has not sent yet, leaving out this batch, the batches before it still awaiting their ack, and rows it keeps but
will not send (those the cloud rejected, or too large for any batch); when it holds nothing else, the next number it
will give. Nothing below N will come from the vehicle except in those earlier batches, so a hole below N is missing,
and a hole at or above it is *backfilling*.

Both sides read the claim here. A claim is a plain integer in `1 .. 2^63-1`; anything else is ignored (and counted
by the cloud with the reason `claim` gives), never a reason to refuse the batch it rides on. How far the cloud
believes a good one is its business (cloud_sync/db.py, `_ingest_one`): never beyond the numbers the vehicle has sent,
and never lower than a position the vehicle already stated.
"""

from __future__ import annotations

from collections.abc import Mapping

KEY = "backfill_from"
MAX_SEQ = 2**63 - 1  # as harvester_common/wire.py bounds every sequence number


def claim(extra: Mapping[str, object]) -> tuple[int | None, str]:
    """A header `extra`'s backfill position: (N, "") for a usable one, (None, "") when there is none (an older
    vehicle), (None, reason) for one that is not a sequence number."""
    if KEY not in extra:
        return None, ""
    v = extra[KEY]
    if isinstance(v, bool) or not isinstance(v, int):
        return None, "not_an_integer"
    if not 1 <= v <= MAX_SEQ:
        return None, "out_of_range"
    return v, ""


def split(missing: list[list[int]], position: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """Missing ranges (merged, sorted) → (gaps: below `position`, lost; backfilling: at or above it, which the
    vehicle still holds). A range across the position is cut in two. No position (an older vehicle, or none
    believed yet): every range is a gap, as before."""
    if position is None:
        return [list(r) for r in missing], []
    gaps: list[list[int]] = []
    backfilling: list[list[int]] = []
    for lo, hi in missing:
        if hi < position:
            gaps.append([lo, hi])
        elif lo >= position:
            backfilling.append([lo, hi])
        else:
            gaps.append([lo, position - 1])
            backfilling.append([position, hi])
    return gaps, backfilling
