"""Reconnect delays for everything that reconnects (MQTT, CAN buses, serial devices)."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [lo, min(hi, lo * 2**attempt)]. The jitter keeps a fleet that
    regains coverage together, or several devices on one hub, from retrying in lockstep."""
    cap = min(hi, lo * (2 ** min(attempt, 30)))
    return rng.uniform(lo, max(lo, cap))
