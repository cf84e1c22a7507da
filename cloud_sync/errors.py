"""The two ways a database write fails, told apart because they are handled apart: an outage holds messages
unacknowledged until the database is back; a refusal because of content rejects that one message (docs/delivery.md)."""

from __future__ import annotations


class CloudDBError(RuntimeError):
    """The database cannot be used (unreachable, locked, full, I/O error): nothing was stored; try again later."""


class UnstorableError(ValueError):
    """A batch the database refused because of what it holds (a value out of range, a constraint): storing it again
    fails again. The transaction rolled back; the database itself is fine."""
