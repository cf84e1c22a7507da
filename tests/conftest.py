"""Shared fixtures: real parts only (a Mosquitto child process, pty pairs, temp SQLite files)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.testing.broker import MosquittoBroker, find_mosquitto
from agent.testing.pty import PtyPair

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(rel: str) -> Path:
    """A file from ../shared/data, or skip the test with the name of what is missing."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"shared data file {p} is absent (tests read real data from ../shared/data)")
    return p


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: the test command installs it (see README Quickstart)")
    b = MosquittoBroker(workdir=tmp_path / "mosquitto")
    b.start()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def pty_pair() -> Iterator[PtyPair]:
    p = PtyPair()
    try:
        yield p
    finally:
        p.close()
