"""Which database backs the cloud: the engine is chosen here, so that the shared logic (cloud_sync/db.py) and each
engine's backend (SQLite in db_sqlite.py, PostgreSQL in db_postgres.py) never import each other's callers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cloud_sync.config import CloudConfig, DbConfig, load_config
from cloud_sync.db import CloudDBError, FleetDB
from cloud_sync.db_sqlite import CloudDB

T = TypeVar("T")
_DB = DbConfig()  # the default of `[db] connect_timeout_s`, for callers without a config


def open_db(url: str, path: Path, connect_timeout_s: int = _DB.connect_timeout_s) -> FleetDB:
    """PostgreSQL when `url` is set (`postgresql://...`), else the SQLite file at `path`."""
    if url:
        # Imported only here: psycopg is an extra (harvester-cloud-sync[postgres]) that SQLite users do without.
        from cloud_sync.db_postgres import PostgresDB

        return PostgresDB(url, connect_timeout_s)
    return CloudDB(path)


def existing_db(cfg: CloudConfig) -> FleetDB:
    """The database a report reads: it must exist already (a report never creates an empty one)."""
    if not cfg.db.url and not cfg.db.path.exists():
        raise CloudDBError(f"{cfg.db.path}: no database yet (cloud-sync serve has not run with this config)")
    return open_db(cfg.db.url, cfg.db.path, cfg.db.connect_timeout_s)


def read_db(config: str | Path, query: Callable[[FleetDB], T]) -> T:
    """Run `query` against the existing database of the config file `config`, and close it: what the report and
    record commands do (`cloud-sync stats`, `alerts`, `alerts verdict`, `quality`...)."""
    db = existing_db(load_config(config))
    try:
        return query(db)
    finally:
        db.close()
