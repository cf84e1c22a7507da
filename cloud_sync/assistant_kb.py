"""The maintenance knowledge base: Markdown procedures, searched with SQLite FTS5 (BM25).

The shipped documents live in cloud_sync/kb; a site adds its own folders (`[assistant] kb_dirs`) and nothing else.
Each document may open with front matter naming what it covers (docs/assistant.md, "Knowledge base"):

    ---
    title: Coolant leak
    faults: coolant_leak
    spns: 110, 111
    signals: ET1.EngCoolantTemp, EFL_P1.EngCoolantLevel
    ---

and is indexed per `##` section, so an answer names the document and the heading it read. The index is a SQLite
file kept beside the config (`[assistant] index_path`): a document is read again only when its size or mtime moved,
and parsed again only when its bytes did (sha256), so a question does not pay for the whole knowledge base.

A document that cannot be text (larger than MAX_DOC_BYTES, a NUL byte, not UTF-8) is skipped and listed in
`skipped` with the reason; it never stops the others from being indexed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harvester_common.clirun import UserError

SHIPPED = Path(__file__).resolve().parent / "kb"
SHIPPED_LABEL = "cloud_sync/kb"  # how a shipped document is named in an answer's sources
MAX_DOC_BYTES = 256 * 1024  # a procedure is a few KB; anything this large is not one
MAX_DOCS = 5000  # per folder: a kb_dirs entry pointed at a whole disk stops here (and says so)
INDEX_VERSION = 1  # bumped when the index's tables change: an older index is rebuilt from the documents

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset((
    "a", "an", "and", "are", "at", "be", "by", "can", "do", "does", "did", "for", "from", "how", "i", "in", "is", "it",
    "its", "of", "on", "or", "our", "the", "this", "that", "to", "we", "what", "when", "which", "who", "why", "with",
    "you", "me", "my", "should", "there", "any", "have", "has", "had", "was", "were", "will"))


@dataclass(frozen=True, slots=True)
class Hit:
    """One section of one document, as a search found it."""

    path: str  # SHIPPED_LABEL/name.md for a shipped document; the file's path for a site's
    title: str
    heading: str
    body: str
    faults: tuple[str, ...] = ()
    spns: tuple[int, ...] = ()
    rank: float = 0.0  # bm25: lower is better


@dataclass(slots=True)
class _Doc:
    title: str
    faults: list[str] = field(default_factory=list)
    spns: list[int] = field(default_factory=list)
    signals: list[str] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, body)


def parse_doc(text: str, fallback_title: str) -> _Doc:
    """Front matter (optional) and `#` sections of one Markdown document."""
    lines = text.splitlines()
    meta: dict[str, str] = {}
    if lines and lines[0].strip() == "---":
        for i in range(1, min(len(lines), 60)):
            if lines[i].strip() == "---":
                for ln in lines[1:i]:
                    key, sep, value = ln.partition(":")
                    if sep:
                        meta[key.strip().lower()] = value.strip().strip("[]")
                lines = lines[i + 1:]
                break
    items = {k: [x.strip().strip("'\"") for x in v.split(",") if x.strip()] for k, v in meta.items()}
    doc = _Doc(title=meta.get("title", ""),
               faults=[f.lower() for f in items.get("faults", [])],
               spns=[int(s) for s in items.get("spns", []) if s.isdigit()],
               signals=items.get("signals", []))
    heading, body = "", list[str]()
    for ln in lines:
        m = _HEADING.match(ln)
        if m and len(m.group(1)) == 1 and not doc.title:
            doc.title = m.group(2)
            continue
        if m and len(m.group(1)) <= 2:
            if "".join(body).strip():
                doc.sections.append((heading or doc.title or fallback_title, "\n".join(body).strip()))
            heading, body = m.group(2), []
            continue
        body.append(ln)
    if "".join(body).strip():
        doc.sections.append((heading or doc.title or fallback_title, "\n".join(body).strip()))
    doc.title = doc.title or fallback_title
    return doc


def fts_query(text: str) -> str:
    """The words of a question as an FTS5 query: any of them (BM25 ranks those matching more, and rarer, first);
    each quoted, so no word is taken for FTS syntax."""
    words = [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 1]
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words))


class KnowledgeBase:
    """The shipped documents and the site's folders, indexed into `index_path` (None: in memory)."""

    def __init__(self, dirs: Sequence[Path] = (), index_path: Path | None = None, *, shipped: bool = True) -> None:
        self.roots: list[tuple[Path, str]] = ([(SHIPPED, SHIPPED_LABEL)] if shipped else []) + [
            (Path(d), str(d)) for d in dirs]
        self.skipped: list[tuple[str, str]] = []  # (document, why) of the last refresh
        self._lock = threading.Lock()
        where = str(index_path) if index_path is not None else ":memory:"
        try:
            if index_path is not None:
                Path(index_path).parent.mkdir(parents=True, exist_ok=True)
            # One connection, used under `_lock`: a web server's threads may share the knowledge base.
            self.con = sqlite3.connect(where, isolation_level=None, timeout=30, check_same_thread=False)
            self._schema()
        except (OSError, sqlite3.DatabaseError) as e:
            raise UserError(f"{where}: cannot use it as the knowledge base index: {e}") from None
        self.refresh()

    def _schema(self) -> None:
        c = self.con
        (version,) = c.execute("PRAGMA user_version").fetchone()
        if version != INDEX_VERSION:
            c.execute("BEGIN IMMEDIATE")
            c.execute("DROP TABLE IF EXISTS docs")
            c.execute("DROP TABLE IF EXISTS sections")
            c.execute("CREATE TABLE docs (path TEXT PRIMARY KEY, mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL, "
                      "sha256 TEXT NOT NULL, skipped TEXT NOT NULL, title TEXT NOT NULL, faults TEXT NOT NULL, "
                      "spns TEXT NOT NULL, signals TEXT NOT NULL)")
            c.execute("CREATE VIRTUAL TABLE sections USING fts5(path UNINDEXED, title, heading, body, "
                      "tokenize='porter unicode61')")
            c.execute(f"PRAGMA user_version={INDEX_VERSION}")
            c.execute("COMMIT")

    def _files(self) -> Iterable[tuple[str, Path]]:
        for root, label in self.roots:
            if not root.is_dir():
                self.skipped.append((str(root), "not a folder"))
                continue
            n = 0
            for p in sorted(root.rglob("*.md")):
                if n >= MAX_DOCS:
                    self.skipped.append((str(root), f"more than {MAX_DOCS} documents: the rest are not indexed"))
                    break
                if p.is_file():
                    n += 1
                    yield (f"{label}/{p.relative_to(root).as_posix()}" if label == SHIPPED_LABEL else str(p)), p

    def refresh(self) -> None:
        """Bring the index to the documents on disk: new, changed and removed ones; the rest are not read."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        self.skipped = []
        c = self.con
        c.execute("BEGIN IMMEDIATE")  # one process rebuilds at a time; the others then find it current
        try:
            known = {str(r[0]): (int(r[1]), int(r[2]), str(r[3]), str(r[4])) for r in
                     c.execute("SELECT path, mtime_ns, size, sha256, skipped FROM docs")}
            seen: set[str] = set()
            for name, p in self._files():
                seen.add(name)
                try:
                    st = p.stat()
                except OSError as e:
                    self.skipped.append((name, f"cannot read it: {e.strerror}"))
                    continue
                old = known.get(name)
                if old is not None and old[:2] == (st.st_mtime_ns, st.st_size):
                    if old[3]:
                        self.skipped.append((name, old[3]))
                    continue
                self._index(name, p, st.st_mtime_ns, st.st_size, old[2] if old else None)
            for name in set(known) - seen:
                c.execute("DELETE FROM docs WHERE path=?", (name,))
                c.execute("DELETE FROM sections WHERE path=?", (name,))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _index(self, name: str, p: Path, mtime_ns: int, size: int, old_sha: str | None) -> None:
        c = self.con
        why, data = "", b""
        if size > MAX_DOC_BYTES:
            why = f"{size:,} bytes: larger than {MAX_DOC_BYTES:,}"
        else:
            try:
                with open(p, "rb") as f:
                    data = f.read(MAX_DOC_BYTES + 1)
            except OSError as e:
                why = f"cannot read it: {e.strerror}"
            if not why and len(data) > MAX_DOC_BYTES:
                why = f"larger than {MAX_DOC_BYTES:,} bytes"
        sha = hashlib.sha256(data).hexdigest() if not why else ""
        if not why and sha == old_sha:  # touched, not changed: the sections stand
            c.execute("UPDATE docs SET mtime_ns=?, size=? WHERE path=?", (mtime_ns, size, name))
            return
        text = ""
        if not why and b"\x00" in data:
            why = "binary (a NUL byte), not Markdown"
        if not why:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                why = f"not UTF-8 (byte {e.start})"
        c.execute("DELETE FROM sections WHERE path=?", (name,))
        doc = _Doc(title="") if why else parse_doc(text, os.path.splitext(p.name)[0])
        if why:
            self.skipped.append((name, why))
        c.execute("INSERT OR REPLACE INTO docs VALUES (?,?,?,?,?,?,?,?,?)",
                  (name, mtime_ns, size, sha, why, doc.title, json.dumps(doc.faults), json.dumps(doc.spns),
                   json.dumps(doc.signals)))
        c.executemany("INSERT INTO sections (path, title, heading, body) VALUES (?,?,?,?)",
                      [(name, doc.title, h, b) for h, b in doc.sections])

    def _hits(self, sql: str, args: Sequence[object]) -> list[Hit]:
        out = []
        with self._lock:
            rows = self.con.execute(sql, tuple(args)).fetchall()
        for path, title, heading, body, faults, spns, rank in rows:
            out.append(Hit(str(path), str(title), str(heading), str(body), tuple(json.loads(faults)),
                           tuple(json.loads(spns)), float(rank)))
        return out

    _SELECT = ("SELECT s.path, s.title, s.heading, s.body, d.faults, d.spns, {rank} FROM sections s "
               "JOIN docs d ON d.path = s.path")

    def search(self, text: str, limit: int = 5) -> list[Hit]:
        """Sections by BM25 over title, heading and body (heading and title count more)."""
        q = fts_query(text)
        if not q:
            return []
        return self._hits(self._SELECT.format(rank="bm25(sections, 0, 3.0, 2.0, 1.0)")
                          + " WHERE sections MATCH ? ORDER BY 7 LIMIT ?", (q, limit))

    def covering(self, *, fault: str | None = None, spn: int | None = None) -> list[Hit]:
        """Every section of the documents whose front matter names `fault` or `spn`, in document order."""
        rows = self._hits(self._SELECT.format(rank="s.rowid") + " ORDER BY d.path, s.rowid", ())
        return [h for h in rows if (fault is not None and fault in h.faults) or (spn is not None and spn in h.spns)]

    def close(self) -> None:
        with self._lock:
            self.con.close()
