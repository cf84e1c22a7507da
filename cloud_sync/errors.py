"""The two ways a database write fails, told apart because they are handled apart: an outage holds messages
unacknowledged until the database is back; a refusal because of content rejects that one message (docs/delivery.md).
Two more are a person's request refused for what it asks: RolloutError (the registry, rollouts) and LearningError
(verdicts, breakdowns, the quality report)."""

from __future__ import annotations


class CloudDBError(RuntimeError):
    """The database cannot be used (unreachable, locked, full, I/O error): nothing was stored; try again later."""


class UnstorableError(ValueError):
    """A batch the database refused because of what it holds (a value out of range, a constraint): storing it again
    fails again. The transaction rolled back; the database itself is fine."""


class RolloutError(ValueError):
    """A registry or rollout request refused for what it asks (a package that does not verify, a version published
    under another hash, an unknown version, vehicles already in a rollout, a transition a rollout's state forbids):
    the message says why; nothing was changed."""


class LearningError(ValueError):
    """A verdict, breakdown or quality request refused for what it holds (an unknown or ambiguous alert id, an
    unknown vehicle, a bad label, fault, time or note): the message says why in one sentence; nothing was stored."""
