"""Shared fixtures: real parts only (a Mosquitto child process, pty pairs, temp SQLite files)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.testing.broker import MosquittoBroker, find_mosquitto
from agent.testing.data import SHARED_DATA, shared_file
from agent.testing.pty import PtyPair

__all__ = ["SHARED_DATA", "shared_file"]


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
