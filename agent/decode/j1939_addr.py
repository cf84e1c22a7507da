"""J1939-81 address claim: which ECU (its 64-bit NAME) holds which source address on one bus, as a listener sees it.

Address Claimed (PGN 60928) carries the claimant's NAME in 8 data bytes, little-endian; the frame's source address is
the address claimed. An ECU may claim a new address (the same NAME from a new SA: it moved), and a claim of an address
by a different NAME means the previous holder lost it. A claim from the null address 254 is "Cannot Claim": that NAME
holds no address now. So the book keeps SA -> NAME, at most one NAME per SA and one SA per NAME.

Counted, never raised: claims with a data length other than 8 (`address_claim_malformed`) or from the global
address 255, which no ECU can hold (`address_claim_bad_source`).

Not done here: Commanded Address (PGN 65240) is not followed; an ECU that a tool re-addresses is seen when it claims
its new address, as J1939-81 requires it to.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

PGN_ADDRESS_CLAIMED = 0xEE00
NULL_ADDRESS = 254  # the source of "Cannot Claim"
GLOBAL_ADDRESS = 255
_SA_HEX = re.compile(r"[0-9A-F]{2}")
_NAME_HEX = re.compile(r"[0-9A-F]{16}")


def name_hex(name: int) -> str:
    """A NAME as 16 uppercase hex digits, as it appears in a signal's source (`can0/200234000430744D`)."""
    return f"{name:016X}"


@dataclass(frozen=True, slots=True)
class NameFields:
    """A NAME's fields (J1939-81), for a mechanic to tell ECUs apart: who made it and what it does."""

    identity: int  # 21 bits, unique per manufacturer
    manufacturer: int  # 11 bits, SAE-assigned manufacturer code
    ecu_instance: int  # 3 bits
    function_instance: int  # 5 bits
    function: int  # 8 bits (0 engine, 3 transmission, ... per J1939 table)
    vehicle_system: int  # 7 bits
    vehicle_system_instance: int  # 4 bits
    industry_group: int  # 3 bits (2: agricultural and forestry equipment)
    arbitrary_address_capable: bool


def name_fields(name: int) -> NameFields:
    return NameFields(
        name & 0x1FFFFF, (name >> 21) & 0x7FF, (name >> 32) & 0x7, (name >> 35) & 0x1F, (name >> 40) & 0xFF,
        (name >> 49) & 0x7F, (name >> 56) & 0xF, (name >> 60) & 0x7, bool(name >> 63),
    )


@dataclass(frozen=True, slots=True)
class AddressChange:
    """What one claim changed: the addresses whose holder is now different, and whether `sa` went from no known
    holder to `name` (then what was tracked under the bare address belongs to that NAME)."""

    sa: int
    name: int
    moved: tuple[int, ...]  # addresses whose holder changed (the claimed one, the one the NAME left)
    first_holder: bool


class AddressBook:
    """SA -> NAME for one bus. Pure: claims in, answers out."""

    def __init__(self, errors: Counter[str]) -> None:
        self.errors = errors
        self.names: dict[int, int] = {}
        self.claims = 0
        self.changes = 0
        self.cannot_claim = 0

    def parse(self, sa: int, data: bytes) -> int | None:
        """The NAME a claim frame carries, or None (counted) for one that is malformed."""
        if len(data) != 8:
            self.errors["address_claim_malformed"] += 1
            return None
        if sa == GLOBAL_ADDRESS:
            self.errors["address_claim_bad_source"] += 1
            return None
        return int.from_bytes(data, "little")

    def name_of(self, sa: int) -> int | None:
        return self.names.get(sa)

    def key(self, sa: int) -> str:
        """What identifies the ECU at `sa`: its NAME (16 hex digits) once claimed, else the address (2 hex digits)."""
        name = self.names.get(sa)
        return f"{sa:02X}" if name is None else name_hex(name)

    def would_change(self, sa: int, name: int) -> bool:
        if sa == NULL_ADDRESS:
            return name in self.names.values()
        return self.names.get(sa) != name

    def apply(self, sa: int, name: int) -> AddressChange | None:
        """Take a parsed claim; what it changed, or None when the book already said so (ECUs repeat their claim
        whenever anyone requests it)."""
        self.claims += 1
        left = [a for a, n in self.names.items() if n == name and a != sa]
        if sa == NULL_ADDRESS:
            self.cannot_claim += 1
            for a in left:
                del self.names[a]
            if not left:
                return None
            self.changes += 1
            return AddressChange(sa, name, tuple(left), False)
        before = self.names.get(sa)
        if before == name:
            return None
        for a in left:
            del self.names[a]
        self.names[sa] = name
        self.changes += 1
        return AddressChange(sa, name, (sa, *left), before is None)

    def state(self) -> dict[str, str]:
        return {f"{sa:02X}": name_hex(n) for sa, n in sorted(self.names.items())}

    @staticmethod
    def parse_state(saved: object) -> dict[int, int] | None:
        """A saved `state()` back as SA -> NAME, or None if it is damaged (one NAME per SA, one SA per NAME)."""
        if not isinstance(saved, dict):
            return None
        out: dict[int, int] = {}
        for k, v in saved.items():
            if not (isinstance(k, str) and _SA_HEX.fullmatch(k) and isinstance(v, str) and _NAME_HEX.fullmatch(v)):
                return None
            sa, name = int(k, 16), int(v, 16)
            if sa >= NULL_ADDRESS or name in out.values():
                return None
            out[sa] = name
        return out
