"""What the assistant hands back: the answer's text, what it understood, and every row and document it used."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cloud_sync.present import plain


@dataclass(frozen=True, slots=True)
class Source:
    """A database read (`kind="db"`: the table, the keys of the rows used, the query) or a knowledge base section
    (`kind="kb"`: the document's path and the heading)."""

    kind: str
    table: str = ""
    keys: list[dict[str, Any]] = field(default_factory=list)
    query: str = ""
    path: str = ""
    heading: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v or k == "kind"}

    def cite(self) -> str:
        """One line for people."""
        if self.kind == "kb":
            return f"{self.path}, \"{self.heading}\""
        keys = ", ".join(",".join(f"{k}={v}" for k, v in row.items()) for row in self.keys[:6])
        more = f" (+{len(self.keys) - 6} more)" if len(self.keys) > 6 else ""
        return f"table {self.table}: {keys or 'no rows'}{more}"


@dataclass(slots=True)
class Answer:
    answer: str
    intent: str
    slots: dict[str, Any] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    clarify: list[str] | None = None  # the choices, when a slot matched several

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "intent": self.intent, "slots": self.slots,
                "sources": [s.to_dict() for s in self.sources], "clarify": self.clarify}

    def to_json(self) -> str:
        return json.dumps(plain(self.to_dict()), ensure_ascii=False, allow_nan=False, default=str)
