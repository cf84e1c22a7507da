"""Sequence-number ranges `[lo, hi]` (inclusive): merging, holes, differences. Shared by the vehicle's store and
the cloud's gap accounting so that both count the same way."""

from __future__ import annotations

from collections.abc import Iterable


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def holes(covered: list[list[int]], upto: int) -> list[list[int]]:
    """Missing ranges between the first covered number and `upto` (`covered` merged and sorted)."""
    out: list[list[int]] = []
    nxt = covered[0][0] if covered else 1
    for lo, hi in covered:
        if lo > nxt:
            out.append([nxt, lo - 1])
        nxt = max(nxt, hi + 1)
    if nxt <= upto:
        out.append([nxt, upto])
    return out


def subtract(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    """Ranges in `a` not covered by `b` (both merged and sorted)."""
    out: list[list[int]] = []
    for lo, hi in a:
        cur = lo
        for blo, bhi in b:
            if bhi < cur or blo > hi:
                continue
            if blo > cur:
                out.append([cur, blo - 1])
            cur = max(cur, bhi + 1)
            if cur > hi:
                break
        if cur <= hi:
            out.append([cur, hi])
    return out
