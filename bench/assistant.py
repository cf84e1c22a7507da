"""The maintenance assistant (docs/assistant.md): `assistant_accuracy`, the question set scored against a keyword
retriever over the same knowledge base, and `assistant_p95_ms`, its answer time on a database holding 100 M samples."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchkit import Figure, figure

ROUNDS = 3  # the question set asked this many times over, for the p95


def _baseline(kb: Any, question: str) -> dict[str, Any]:
    """What a search box over the same documents answers: the best BM25 section, no intents, no database."""
    hits = kb.search(question, limit=1)
    if not hits:
        return {"answer": "", "intent": "kb_search", "slots": {}, "sources": []}
    h = hits[0]
    return {"answer": f"{h.title}, {h.heading}:\n{h.body}", "intent": "kb_search", "slots": {},
            "sources": [{"kind": "kb", "path": h.path, "heading": h.heading}]}


@figure("assistant_accuracy")
def assistant_accuracy() -> Figure:
    """Answer accuracy (%) of `Assistant.ask` over tests/assistant_questions.json on the workshop fleet (SQLite,
    harvester_testing/workshop.py): every fact in the text and every source cited (harvester_testing.workshop.check);
    baseline: the best BM25 section of the same knowledge base for the question (FTS5 alone, no intents, no
    database), scored by the same checker. Intent accuracy (intent and slots) of both in the note."""
    from cloud_sync.assistant import Assistant, KnowledgeBase
    from cloud_sync.db_sqlite import CloudDB
    from harvester_testing import workshop

    cases = workshop.questions()
    with tempfile.TemporaryDirectory() as d:
        db = CloudDB(Path(d) / "cloud.sqlite")
        workshop.build(db)
        kb = KnowledgeBase()
        ours = [workshop.check(Assistant(db, kb).ask(c["q"], now=workshop.NOW).to_dict(), c) for c in cases]
        base = [workshop.check(_baseline(kb, c["q"]), c) for c in cases]
        kb.close()
        db.close()

    def pct(xs: list[bool]) -> float:
        return 100.0 * sum(xs) / len(xs)

    a, b = pct([s.answer_ok for s in ours]), pct([s.answer_ok for s in base])
    ia, ib = pct([s.intent_ok for s in ours]), pct([s.intent_ok for s in base])
    return Figure(a, "%", b, a / b if b else float("inf"),
                  f"{len(cases)} questions; intent accuracy {ia:.1f} % vs {ib:.1f} % (the retriever has no intents)",
                  extra={"intent_accuracy": ia, "baseline_intent_accuracy": ib, "questions": len(cases)})


def _times(dbs: list[Any], cases: list[dict[str, Any]]) -> list[list[float]]:
    """ms per answer on each database, the question set asked ROUNDS times after a warm-up, each question asked of
    every database in turn (so drift in the machine's load falls on all alike)."""
    from cloud_sync.assistant import Assistant, KnowledgeBase
    from harvester_testing import workshop

    kb = KnowledgeBase()
    assistants = [Assistant(db, kb) for db in dbs]
    for a in assistants:  # warm-up: the page cache, the KB index
        for c in cases:
            a.ask(c["q"], now=workshop.NOW)
    out: list[list[float]] = [[] for _ in dbs]
    for _ in range(ROUNDS):
        for c in cases:
            for a, times in zip(assistants, out, strict=True):
                t0 = time.perf_counter()
                a.ask(c["q"], now=workshop.NOW)
                times.append((time.perf_counter() - t0) * 1000)
    kb.close()
    return out


def _p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[-1]


@figure("assistant_p95_ms")
def assistant_p95_ms() -> Figure:
    """p95 answer time (ms) of `Assistant.ask` over the question set, asked ROUNDS times after a warm-up, on a SQLite
    database holding 100,000,000 samples (bench/benchmarks.py `_fleet_db`: 10 bulk vehicles, filled with generated
    rows) plus the workshop fleet the questions are about; baseline: the same fleet with 1,000 bulk samples instead,
    each question asked of both in turn. The ratio is what 100 M stored samples cost an answer (1 =
    nothing). FLEET_BENCH_SAMPLES sets a smaller count for a trial; the note says the count measured, and the intent
    whose answers are slowest."""
    from benchmarks import _fleet_db

    from cloud_sync.db_sqlite import CloudDB
    from harvester_testing import workshop

    n = int(os.environ.get("FLEET_BENCH_SAMPLES", 100_000_000))
    cases = workshop.questions()
    with tempfile.TemporaryDirectory() as d:
        small, big = Path(d) / "small.sqlite", Path(d) / "big.sqlite"
        _fleet_db(small, 1_000, prefix="bulk")  # the same vehicles, almost no history
        fill_s = _fleet_db(big, n, prefix="bulk")
        dbs = [CloudDB(small), CloudDB(big)]
        for db in dbs:
            workshop.build(db)
        stored = sum(int(r[0]) for r in dbs[1].read("SELECT value FROM counters WHERE name='stored:samples'"))
        base_stored = sum(int(r[0]) for r in dbs[0].read("SELECT value FROM counters WHERE name='stored:samples'"))
        base, ours = _times(dbs, cases)
        for db in dbs:
            db.close()
    p, pb = _p95(ours), _p95(base)
    by_intent: dict[str, list[float]] = {}
    for i, ms in enumerate(ours):
        by_intent.setdefault(cases[i % len(cases)]["intent"], []).append(ms)
    slow = max(by_intent, key=lambda k: _p95(by_intent[k]) if len(by_intent[k]) > 1 else by_intent[k][0])
    return Figure(p, "ms", pb, p / pb,
                  f"{stored:,} samples stored ({n:,} bulk, filled in {fill_s:.0f} s) vs {base_stored:,} (the same "
                  f"vehicles, 1,000 bulk samples), questions alternating between the two; "
                  f"{len(cases)} questions x {ROUNDS}; median {statistics.median(ours):.2f} ms vs "
                  f"{statistics.median(base):.2f} ms, max {max(ours):.1f} ms; slowest intent {slow} "
                  f"(p95 {_p95(by_intent[slow]):.2f} ms)",
                  extra={"samples": stored, "questions": len(cases)})
