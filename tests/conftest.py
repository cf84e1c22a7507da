"""Shared fixtures: real parts only (a Mosquitto child process, pty pairs, temp SQLite files)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.database import open_db
from cloud_sync.db import FleetDB
from cloud_sync.db_sqlite import CloudDB
from harvester_sim.pty import PtyPair
from harvester_testing import postgres
from harvester_testing.broker import MosquittoBroker, find_mosquitto
from harvester_testing.data import SHARED_DATA, shared_file

__all__ = ["SHARED_DATA", "shared_file"]

# The DBC tables cache (agent/decode/dbc_cache.py) of this run, child processes included: a fresh folder, not the
# user's ~/.cache. Tests of the cache itself point it elsewhere.
if "HARVESTER_DBC_CACHE" not in os.environ:
    os.environ["HARVESTER_DBC_CACHE"] = tempfile.mkdtemp(prefix="harvester-dbc-cache-")
    atexit.register(shutil.rmtree, os.environ["HARVESTER_DBC_CACHE"], True)


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


@pytest.fixture(scope="session")
def pg_server() -> Iterator[postgres.TempPostgres]:
    """A real PostgreSQL server in a temp dir for the whole run (initdb takes a second); tests make databases."""
    why = postgres.unavailable()
    if why:
        pytest.skip(f"PostgreSQL tests need a server: {why}")
    with postgres.TempPostgres() as pg:
        yield pg


_cloud_dbs = 0


@pytest.fixture(params=["sqlite", "postgres"])
def cloud_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetDB]:
    """A fresh cloud database on each engine: a SQLite file, and a new database on the session's PostgreSQL."""
    global _cloud_dbs
    if request.param == "sqlite":
        d: FleetDB = CloudDB(tmp_path / "cloud.sqlite")
    else:
        pg: postgres.TempPostgres = request.getfixturevalue("pg_server")
        _cloud_dbs += 1
        d = open_db(pg.new_database(f"c{_cloud_dbs}"), tmp_path / "unused.sqlite")
    yield d
    d.close()
