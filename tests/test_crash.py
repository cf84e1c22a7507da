"""Crash and power loss: every record the store reported written survives SIGKILL at random instants (many times
over the same file) and a snapshot of the files taken mid-write (what a power cut leaves), and the file stays
sound."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from agent.store import Store


def _start(path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "harvester_testing.crashwriter", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    return proc


def _read_reported(proc: subprocess.Popen[bytes], seconds: float, pending: bytearray,
                   from_first_report: bool = True) -> list[tuple[int, int]]:
    """Ranges the writer printed (each only after its commit) within `seconds`; a half line stays in `pending`.
    `from_first_report`: the `seconds` start at the first bytes read (else at once: for a writer that is stopped,
    which reports nothing new however long one waits)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    # The random instant counts from the writer's first report, not from its start: on a busy machine the child can
    # take longer than `seconds` just to import, and would then be killed before it wrote anything.
    started = time.monotonic()
    end: float | None = None if from_first_report else started + seconds
    while end is None or time.monotonic() < end:
        if end is None and time.monotonic() - started > 120:
            raise AssertionError("the writer reported nothing within 120 s of its start")
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            chunk = None
        if chunk:
            pending += chunk
            if end is None:
                end = time.monotonic() + seconds
        else:
            time.sleep(0.005)
    *lines, rest = bytes(pending).split(b"\n")
    pending[:] = rest
    return [(int(a), int(b)) for a, b in (line.split() for line in lines)]


def _stored_seqs(path: Path) -> set[int]:
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = con.execute("SELECT seq_lo, seq_hi FROM outbox").fetchall()
    con.close()
    return {q for lo, hi in rows for q in range(lo, hi + 1)}


def test_sigkill_at_random_instants_loses_nothing_reported(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite"
    rng = random.Random(7)
    reported: list[tuple[int, int]] = []
    for _ in range(12):
        proc = _start(path)
        reported += _read_reported(proc, rng.uniform(0.2, 0.8), bytearray())
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert len(reported) > 100
    stored = _stored_seqs(path)
    missing = [r for r in reported if not all(q in stored for q in range(r[0], r[1] + 1))]
    assert missing == []
    s = Store(path)  # reopens cleanly and numbers on past everything
    assert s.status()["highest_seq"] >= max(hi for _, hi in reported)
    s.close()


def test_power_cut_snapshot_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "live.sqlite"
    proc = _start(path)
    pending = bytearray()
    reported: list[tuple[int, int]] = []
    try:
        # Snapshots only once the writer has committed something: on a loaded machine its start-up (imports,
        # schema) can outlast the first snapshot, which then holds no store at all.
        end = time.monotonic() + 60
        while not reported and time.monotonic() < end:
            reported += _read_reported(proc, 0.1, pending)
        assert reported, "the writer committed nothing within 60 s"
        for i in range(5):
            reported += _read_reported(proc, 0.3 + 0.1 * i, pending)
            # Freeze the writer wherever it is (maybe mid-transaction) and copy its files: the state a power
            # cut leaves on disk, since every commit was fsynced (synchronous=FULL).
            proc.send_signal(signal.SIGSTOP)
            # What it reported before it stopped, still in the pipe (a slow writer may have said nothing since).
            reported += _read_reported(proc, 0.05, pending, from_first_report=False)
            snap = tmp_path / f"snap{i}"
            snap.mkdir()
            for suffix in ("", "-wal"):
                src = Path(str(path) + suffix)
                if src.exists():
                    shutil.copyfile(src, snap / (path.name + suffix))
            proc.send_signal(signal.SIGCONT)
            stored = _stored_seqs(snap / path.name)
            assert all(q in stored for lo, hi in reported for q in range(lo, hi + 1))
    finally:
        proc.kill()
        proc.wait(10)
