"""The assistant behind the fleet page's chat panel (`POST /api/ask`), without HTTP (app.py has that).

One knowledge base per server, opened from the `[assistant]` section when the server is made (a bad index path is
a start-up error, not a failed question), and brought up to date with its folders before a question when it was
last looked at more than `[assistant] refresh_s` ago: a document a site adds or edits is found without a restart,
and a question does not pay for a walk of the folders each time. Questions run in the server's worker threads
(`Assistant` is read-only and shared); at most MAX_ASKING at once, so a flood of slow questions cannot take every
thread the pages' other requests need: one more is told to come back (Busy).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cloud_sync.assistant import Assistant, KnowledgeBase
from cloud_sync.assistant_understand import MAX_QUESTION_CHARS
from cloud_sync.config import AssistantConfig
from cloud_sync.db import FleetDB
from cloud_sync.web.api import BadRequest

log = logging.getLogger("cloud_sync.web")

MAX_ASKING = 4  # questions answered at once; the server has 40 worker threads for everything else too


class Busy(Exception):
    """MAX_ASKING questions are being answered already."""


def question_of(body: object) -> str:
    """The question of a POST to /api/ask: `{"question": text}`, 1 to MAX_QUESTION_CHARS characters once trimmed;
    BadRequest with the reason otherwise (the assistant itself would cut a longer one: the page says so instead)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(str(k) for k in body if k != "question")
    if unknown:
        raise BadRequest(f"unknown field {unknown[0][:40]!r} (a question has only \"question\")")
    q = body.get("question")
    if not isinstance(q, str):
        raise BadRequest("question must be text")
    q = q.strip()
    if not q:
        raise BadRequest("the question is empty")
    if len(q) > MAX_QUESTION_CHARS:
        raise BadRequest(f"the question is {len(q):,} characters: at most {MAX_QUESTION_CHARS} are read")
    return q


class Chat:
    """`Chat(db, cfg).ask(question_of(body))` → the answer as `cloud-sync ask --json` prints it. `cfg` None: the shipped
    documents only, indexed in memory. `clock` is where "today" is read from (a test fixes it)."""

    def __init__(self, db: FleetDB, cfg: AssistantConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.refresh_s = cfg.refresh_s if cfg is not None else AssistantConfig().refresh_s
        self.kb = KnowledgeBase(cfg.kb_dirs, cfg.index_path) if cfg is not None else KnowledgeBase()
        for doc, why in self.kb.skipped:  # said once at start; again only when a refresh finds it still bad
            log.warning("assistant knowledge base: skipped %s: %s", doc, why)
        self.assistant = Assistant(db, self.kb, cfg.season_start if cfg is not None else "10-01")
        self._refreshed = time.monotonic()  # KnowledgeBase() has just brought the index up to date
        self._refresh_lock = threading.Lock()
        self._asking = 0
        self._count_lock = threading.Lock()

    def _fresh(self) -> None:
        with self._refresh_lock:  # one thread walks the folders; the others then find it fresh
            if time.monotonic() - self._refreshed < self.refresh_s:
                return
            before = set(self.kb.skipped)
            try:
                self.kb.refresh()
            except Exception:  # a folder or index gone bad: answer from the index as it stands, and say why
                log.warning("assistant knowledge base: refresh failed; answering from the index as it was",
                            exc_info=True)
            for doc, why in set(self.kb.skipped) - before:
                log.warning("assistant knowledge base: skipped %s: %s", doc, why)
            self._refreshed = time.monotonic()

    def begin(self) -> None:
        """Take one of the MAX_ASKING places (Busy when none is free); `end` gives it back."""
        with self._count_lock:
            if self._asking >= MAX_ASKING:
                raise Busy(f"{MAX_ASKING} questions are being answered: ask again in a moment")
            self._asking += 1

    @property
    def asking(self) -> int:
        """Questions being answered now."""
        return self._asking

    def end(self) -> None:
        with self._count_lock:
            self._asking -= 1

    def ask(self, question: str) -> dict[str, Any]:
        """The answer to a question `question_of` passed (run in a worker thread, between `begin` and `end`)."""
        self._fresh()
        return self.assistant.ask(question, now=self.clock()).to_dict()

    def close(self) -> None:
        self.kb.close()
