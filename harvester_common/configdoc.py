"""Config key tables rendered from the pydantic models, so that the docs cannot drift from the code.

Each side's models hold every key's default, allowed range and meaning (`Field(default, ge=..., description=...)`);
this renders them as Markdown tables and puts each between marker comments in a hand-written document, leaving the
prose around the markers alone:

    <!-- generated: NAME -->
    | key | default | allowed | meaning |
    ...
    <!-- end generated -->

Generic on purpose: it knows pydantic, not the agent or cloud_sync (it may import neither); `docs/configdoc.py`
names the models and the documents, and `tests/test_config_doc.py` fails when a committed document differs.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

MARKER = re.compile(r"^<!-- generated: (?P<name>\S+) -->\n(?P<body>.*?)^<!-- end generated -->$", re.M | re.S)
_OPEN = re.compile(r"^<!-- generated: (?P<name>\S+) -->$", re.M)


class DocError(ValueError):
    """A document whose markers do not match the tables to put in it."""


def _toml(v: Any) -> str:
    """A default as it would be written in the TOML file."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if isinstance(v, str | Path):
        return f'`"{v}"`'
    if isinstance(v, list):
        return "`[" + ", ".join(_toml(x).strip("`") for x in v) + "]`"
    if isinstance(v, dict):
        return "`{" + ", ".join(f"{k} = {_toml(x).strip('`')}" for k, x in v.items()) + "}`"
    return f"`{v!r}`"


def _number(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def allowed(f: FieldInfo) -> str:
    """What validation accepts besides the type: choices, bounds, pattern, length."""
    lo: tuple[str, Any] | None = None
    hi: tuple[str, Any] | None = None
    short: int | None = None
    long: int | None = None
    pattern = ""
    # pydantic keeps each constraint as one metadata object (annotated_types.Ge, ...), read by attribute name.
    for m in f.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">")):
            if getattr(m, attr, None) is not None:
                lo = (sign, getattr(m, attr))
        for attr, sign in (("le", "≤"), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                hi = (sign, getattr(m, attr))
        if (n := getattr(m, "min_length", None)) is not None:
            short = n
        if (n := getattr(m, "max_length", None)) is not None:
            long = n
        pattern = getattr(m, "pattern", None) or pattern
    out: list[str] = []
    choices = _literal(f.annotation)
    if choices:
        out.append(", ".join(f"`{c}`" for c in choices))
    if lo and hi and (lo[0], hi[0]) == ("≥", "≤"):
        out.append(f"{_number(lo[1])} to {_number(hi[1])}")
    elif lo or hi:
        out.append(", ".join(f"{b[0]} {_number(b[1])}" for b in (lo, hi) if b is not None))
    if pattern:
        out.append(f"`{pattern}`")
    if short is not None and long is not None:
        out.append(f"{short} to {long} characters")
    elif short is not None or long is not None:
        out.append(f"at least {short} characters" if short is not None else f"at most {long} characters")
    return "; ".join(out)


def _literal(t: Any) -> tuple[Any, ...]:
    if typing.get_origin(t) is typing.Literal:
        return typing.get_args(t)
    return ()


def _cell(text: str) -> str:
    # A `|` inside a cell (regular expressions) would end it, in code spans too.
    return text.replace("|", "\\|").replace("\n", " ")


def key_table(model: type[BaseModel], sections: bool = False) -> str:
    """The key table of one section model; with `sections`, of every section of a root model, each key written
    `[section] key`."""
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    parts = list(section_models(model)) if sections else [("", model)]
    for section, m in parts:
        for name, f in m.model_fields.items():
            key = f"`[{section}] {name}`" if section else f"`{name}`"
            default = f.get_default(call_default_factory=True)
            rows.append("| " + " | ".join(_cell(c) for c in (key, _toml(default), allowed(f), f.description or ""))
                        + " |")
    return "\n".join(rows) + "\n"


def section_models(root: type[BaseModel]) -> Iterator[tuple[str, type[BaseModel]]]:
    """(name, model) of each field of `root` that is a section: a model, or a list of models (`[[can]]`)."""
    for name, f in root.model_fields.items():
        m = _model_of(f.annotation)
        if m is not None:
            yield name, m


def _model_of(t: Any) -> type[BaseModel] | None:
    if isinstance(t, type) and issubclass(t, BaseModel):
        return t
    if typing.get_origin(t) in (list, types.UnionType, typing.Union):
        for a in typing.get_args(t):
            m = _model_of(a)
            if m is not None:
                return m
    return None


def undocumented(root: type[BaseModel]) -> list[str]:
    """`section.key` of every key of `root`'s sections without a description (the doc text)."""
    return [f"{s}.{k}" for s, m in section_models(root) for k, f in m.model_fields.items()
            if not (f.description or "").strip()]


def fill(text: str, tables: Mapping[str, str]) -> str:
    """`text` with each generated block replaced by its table; DocError when a block has no table, a table no
    block, a name is used twice, or a marker is not closed."""
    opened = [m.group("name") for m in _OPEN.finditer(text)]
    blocks = [m.group("name") for m in MARKER.finditer(text)]
    if opened != blocks:
        raise DocError(f"a generated block is not closed with <!-- end generated --> (opened: {opened})")
    if len(set(blocks)) != len(blocks):
        raise DocError(f"a generated block appears twice: {sorted(n for n in blocks if blocks.count(n) > 1)}")
    if set(blocks) != set(tables):
        missing, extra = sorted(set(tables) - set(blocks)), sorted(set(blocks) - set(tables))
        raise DocError(f"no block for {missing}" if missing else f"no table for the block(s) {extra}")

    def one(m: re.Match[str]) -> str:
        return f"<!-- generated: {m.group('name')} -->\n{tables[m.group('name')]}<!-- end generated -->"

    return MARKER.sub(one, text)


def stale(path: Path, tables: Mapping[str, str]) -> str:
    """A unified diff from the committed document to the regenerated one; empty when they agree."""
    old = path.read_text()
    new = fill(old, tables)
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{path} (committed)",
                                        f"{path} (from the models)"))


def write(path: Path, tables: Mapping[str, str]) -> bool:
    """Regenerate the blocks of `path` in place; True when it changed."""
    old = path.read_text()
    new = fill(old, tables)
    if new != old:
        path.write_text(new)
    return new != old
