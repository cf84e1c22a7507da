"""A minimal TOML writer for the configs the demo generates (stdlib reads TOML but cannot write it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dumps(doc: dict[str, Any]) -> str:
    """Top-level scalars, then [tables] of scalars, then [[arrays of tables]]. None values are left out."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for k, v in doc.items():
        if isinstance(v, dict) and v and all(not isinstance(x, dict) for x in v.values()):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        elif v is not None and not (isinstance(v, dict | list) and not v):
            lines.append(f"{k} = {_value(v)}")
    for name, t in tables:
        lines += ["", f"[{name}]"] + [f"{k} = {_value(x)}" for k, x in t.items() if x is not None]
    for name, arr in arrays:
        for t in arr:
            lines += ["", f"[[{name}]]"] + [f"{k} = {_value(x)}" for k, x in t.items() if x is not None]
    return "\n".join(lines).lstrip("\n") + "\n"
