"""The chunk download on real files: resume by re-hashing the partial file (only what is missing is asked for
again), a bounded window of requests, timeouts on silence (not on a request's age) that back off, requests kept
across a resumed session, and every kind of wrong chunk dropped and counted; fuzzed with hypothesis (any order,
duplicates and corruptions end in the exact package or a stated failure)."""

from __future__ import annotations

import hashlib
import random
from collections import Counter, deque
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.update.download import Download, DownloadError
from harvester_common import modelwire as mw

PKG = random.Random(3).randbytes(10_000)
SHA = hashlib.sha256(PKG).hexdigest()
CB = 1000  # ten chunks


def desired(pkg: bytes = PKG, chunk_bytes: int = CB) -> mw.Desired:
    return mw.desired_for(pkg, "m", "2.0", "0" * 16, "1", chunk_bytes=chunk_bytes, issued_at=1.0)


def chunk(i: int, pkg: bytes = PKG) -> mw.Chunk:
    return mw.chunk_of(pkg, hashlib.sha256(pkg).hexdigest(), i, CB)


def asked(reqs: list[mw.GetRequest]) -> list[int]:
    return [i for g in reqs for i in range(g.first, g.first + g.count)]


def dl(tmp: Path, window: int = 4, timeout: float = 30.0, max_bad: int = 3) -> Download:
    d = Download(desired(), tmp / f"{SHA}.part", window, timeout, max_bad)
    d.open()
    return d


def test_a_bounded_window_in_contiguous_runs_then_the_exact_file(tmp_path: Path) -> None:
    d = dl(tmp_path, window=4)
    assert d.part.stat().st_size == len(PKG)  # pre-sized
    reqs = d.requests(0.0)
    assert reqs == [mw.GetRequest(SHA, 0, 4)] and d.requests(0.0) == []  # nothing more while 4 are out
    for i in (0, 1):
        assert d.accept(chunk(i), 0.0) == "stored"
    assert asked(d.requests(0.0)) == [4, 5]
    for i in range(2, 10):
        d.accept(chunk(i), 0.0)
    assert d.complete
    d.finish()
    assert d.part.read_bytes() == PKG and d.bytes_received == len(PKG)


def test_resume_asks_only_for_what_the_partial_file_lacks(tmp_path: Path) -> None:
    d = dl(tmp_path)
    for i in (0, 1, 2, 5):
        d.accept(chunk(i), 0.0)
    d.close()  # the process dies here; what it wrote is on disk
    with open(d.part, "r+b") as f:  # and chunk 2's slot was torn
        f.seek(2 * CB + 10)
        f.write(b"\x00\x00")
    again = dl(tmp_path, window=16)
    assert again.resumed == 3 and again.progress() == {"chunks_have": 3, "chunks": 10, "bytes": 3000}
    got = asked(again.requests(0.0))
    assert got == [2, 3, 4, 6, 7, 8, 9] and again.bytes_requested == 7 * CB  # not from zero
    for i in got:
        again.accept(chunk(i), 0.0)
    again.finish()
    assert again.part.read_bytes() == PKG


def test_wrong_chunks_are_dropped_and_counted(tmp_path: Path) -> None:
    d = dl(tmp_path)
    d.requests(0.0)
    other = random.Random(4).randbytes(10_000)
    assert d.accept(chunk(0, other), 0.0) == "other_package"
    assert d.accept(mw.Chunk(SHA, 0, 11, PKG[:CB]), 0.0) == "wrong_total"
    assert d.accept(mw.Chunk(SHA, 9, 10, PKG[9 * CB :] + b"x"), 0.0) == "wrong_size"
    assert d.accept(mw.Chunk(SHA, 1, 10, bytes(CB)), 0.0) == "hash_mismatch"
    assert 1 not in d.asked and asked(d.requests(0.0)) == [1]  # asked for again at once
    assert d.accept(chunk(0), 0.0) == "stored"
    assert d.accept(chunk(0), 0.0) == "duplicate"
    assert d.accept(mw.Chunk(SHA, 0, 10, bytes(CB)), 0.0) == "duplicate"  # even one that would not match
    assert d.bytes_received == CB and d.part.read_bytes()[:CB] == PKG[:CB]  # written once, the first time
    assert dict(d.dropped) == {"other_package": 1, "wrong_total": 1, "wrong_size": 1, "hash_mismatch": 1,
                               "duplicate": 2}
    assert d.n_have == 1


def test_a_chunk_never_matching_its_hash_fails_the_download(tmp_path: Path) -> None:
    d = dl(tmp_path, window=10, max_bad=3)
    for _ in range(2):
        assert 4 in asked(d.requests(0.0))  # asked (again at once after each wrong answer)
        assert d.accept(mw.Chunk(SHA, 4, 10, bytes(CB)), 0.0) == "hash_mismatch"
    assert 4 in asked(d.requests(0.0))
    with pytest.raises(DownloadError) as e:
        d.accept(mw.Chunk(SHA, 4, 10, bytes(CB)), 0.0)
    assert e.value.code == "chunk_never_matches" and "chunk 4" in str(e.value)


def test_forged_chunks_nobody_asked_for_cannot_fail_the_download(tmp_path: Path) -> None:
    """Wrong bytes for a slot with no request outstanding are dropped and counted, not held against the slot: a
    forger on the model topic cannot end the download with `max_bad` of them."""
    d = dl(tmp_path, window=2, max_bad=3)
    assert asked(d.requests(0.0)) == [0, 1]
    for _ in range(10):
        assert d.accept(mw.Chunk(SHA, 4, 10, bytes(CB)), 0.0) == "hash_mismatch"
    assert d.dropped["hash_mismatch"] == 10 and not d.bad
    for i in range(10):
        d.requests(0.0)
        assert d.accept(chunk(i), 0.0) == "stored"
    d.finish()
    assert d.part.read_bytes() == PKG


def test_requests_time_out_on_silence_not_on_age(tmp_path: Path) -> None:
    """A slow link: chunks keep coming, each later than the one before, so the window's tail is older than the
    timeout when it arrives. It is on its way: not asked again (that would pay for it twice)."""
    d = dl(tmp_path, window=2, timeout=10.0)
    assert asked(d.requests(0.0)) == [0, 1]
    d.accept(chunk(1), 8.0)
    assert asked(d.requests(8.0)) == [2]
    assert d.requests(15.0) == []  # chunk 0 was asked for 15 s ago, but a chunk came 7 s ago
    d.accept(chunk(2), 17.0)
    assert asked(d.requests(17.0)) == [3]
    assert d.requests(27.0) == []  # 10 s without a chunk: not more than the timeout yet
    assert asked(d.requests(27.5)) == [0, 3]  # silence past it: every outstanding chunk again
    assert (d.stalls, d.backoffs, d.timeouts) == (1, 0, 2)


def test_repeated_timeouts_back_off_up_to_a_cap_and_a_chunk_resets_them(tmp_path: Path) -> None:
    d = dl(tmp_path, window=2, timeout=10.0)
    assert asked(d.requests(0.0)) == [0, 1]
    assert asked(d.requests(10.5)) == [0, 1]  # the first timeout: then 20 s
    assert d.requests(30.0) == []
    assert asked(d.requests(30.6)) == [0, 1]  # then 40 s
    assert d.requests(70.5) == []
    assert asked(d.requests(70.7)) == [0, 1]  # then 80 s: the cap (MAX_BACKOFF)
    assert asked(d.requests(150.8)) == [0, 1]
    assert d.requests(230.7) == []  # still 80 s
    assert asked(d.requests(230.9)) == [0, 1]
    assert (d.stalls, d.backoffs, d.timeouts) == (5, 4, 10)
    d.accept(chunk(0), 231.0)  # the link is back: the plain timeout again
    assert asked(d.requests(231.0)) == [2]
    assert d.wait_s() == 10.0 and asked(d.requests(241.1)) == [1, 2]
    assert (d.stalls, d.backoffs) == (6, 4)


def forgery(k: int) -> tuple[mw.Chunk, str]:
    """The k-th of a rotation of chunks naming this package and its chunk count but not good: what anyone who can
    publish on the vehicle's model topic can send. Wrong bytes go to a different index each time (3 to 9), so that
    no index reaches `max_bad` and the forger can go on."""
    kinds = [(mw.Chunk(SHA, 3 + k // 4 % 7, 10, bytes(CB)), "hash_mismatch"),
             (mw.Chunk(SHA, 2, 10, PKG[2 * CB : 3 * CB - 1]), "wrong_size"),  # chunk 2 is outstanding
             (chunk(0), "duplicate"),  # a replay of a chunk held, asked for once and come once
             (mw.Chunk(SHA, 0, 10, bytes(CB)), "duplicate")]  # a forged copy of a chunk held
    return kinds[k % 4]


def test_forged_chunks_do_not_hold_off_asking_again(tmp_path: Path) -> None:
    """The chunks asked for never come; forged chunks of this package (wrong bytes, wrong size, copies of a chunk
    held) come every 2 s, well inside the 10 s timeout. The outstanding chunks are still asked for again after 10 s
    without a good chunk, then after the backed-off 20 s, as on a silent link; every forgery is dropped and counted.
    Before, each forgery restarted the window's timer, so the vehicle never asked again."""
    d = dl(tmp_path, window=2, timeout=10.0, max_bad=3)
    assert asked(d.requests(0.0)) == [0, 1]
    assert d.accept(chunk(0), 1.0) == "stored"
    assert asked(d.requests(1.0)) == [2]  # outstanding: 1 and 2, from here on never answered
    reasons: list[str] = []

    def forgeries(times: range) -> None:
        for t in times:
            c, why = forgery(len(reasons))
            assert d.accept(c, float(t)) == why
            assert d.requests(float(t)) == []
            reasons.append(why)

    forgeries(range(2, 11, 2))
    assert d.requests(11.0) == []  # 10 s since the last good chunk: not past the timeout yet
    assert asked(d.requests(11.5)) == [1, 2]
    forgeries(range(12, 31, 2))
    assert d.requests(31.0) == []  # backed off: 20 s from the re-ask
    assert asked(d.requests(31.6)) == [1, 2]
    assert (d.stalls, d.backoffs, d.timeouts) == (2, 1, 4)
    assert d.dropped == Counter(reasons) and d.n_have == 1
    assert d.accept(chunk(1), 32.0) == "stored"  # a good chunk: the plain timeout again
    assert d.wait_s() == 10.0


def slow_link(d: Download, per_s: float, quiet_until: float, pkg: bytes, chunk_bytes: int) -> Counter[int]:
    """A link that answers every request in order, one chunk per `per_s` s, and delivers nothing before
    `quiet_until` (its requests wait in the queue, as behind a stalled broker); the vehicle polls every 0.5 s, as
    the manager's loop does. Returns how often each chunk was asked for."""
    sha = hashlib.sha256(pkg).hexdigest()
    queue: deque[int] = deque()
    times: Counter[int] = Counter()
    t, next_at = 0.0, quiet_until
    while not d.complete:
        for i in asked(d.requests(t)):
            queue.append(i)
            times[i] += 1
        if queue and t >= next_at:
            d.accept(mw.chunk_of(pkg, sha, queue.popleft(), chunk_bytes), t)
            next_at = t + per_s
        t += 0.5
        assert t < 10_000, f"no end: {d.progress()}"
    return times


def test_a_slow_link_after_a_stall_pays_for_the_stall_once(tmp_path: Path) -> None:
    """A link slow enough that a window takes longer than the timeout (4 chunks at 4 s each: 16 s, timeout 10 s)
    stalls once at the start: the window is asked for again. The link delivers both answers in turn, the first
    ones, then the copies the re-ask paid for, then the next chunks. The copies are answers to requests (asked for,
    owed, and the true chunk), so they restart the timer as a stored chunk does; were they ignored, every window
    after the stall would wait behind 16 s of copies, time out and be asked again, for ever."""
    pkg = random.Random(6).randbytes(40_000)
    d = Download(desired(pkg, CB), tmp_path / "p.part", 4, 10.0, 3)
    d.open()
    times = slow_link(d, per_s=4.0, quiet_until=12.0, pkg=pkg, chunk_bytes=CB)
    d.finish()
    assert d.part.read_bytes() == pkg
    assert times == Counter({i: 2 if i < 4 else 1 for i in range(40)}), times  # the stalled window twice, once
    assert d.stalls == 1 and d.timeouts == 4 and d.dropped == Counter({"duplicate": 4})


def test_a_copy_restarts_the_timer_only_when_asked_for_and_true(tmp_path: Path) -> None:
    """After a timeout, chunk 0 is owed twice. Its first copy is stored; a forged second copy (wrong bytes) is
    dropped and restarts nothing; the true second copy restarts the timer; a third true copy (a replay: asked for
    twice, come twice already) restarts nothing."""
    d = dl(tmp_path, window=2, timeout=10.0)
    assert asked(d.requests(0.0)) == [0, 1]
    assert asked(d.requests(10.5)) == [0, 1]  # timed out: both owed twice
    assert d.accept(chunk(0), 11.0) == "stored"
    assert asked(d.requests(11.0)) == [2]
    assert d.accept(mw.Chunk(SHA, 0, 10, bytes(CB)), 15.0) == "duplicate"  # forged: the timer runs from 11 s
    assert d.accept(chunk(0), 18.0) == "duplicate"  # the re-ask's answer: the timer runs from 18 s
    assert d.requests(28.0) == []
    assert d.accept(chunk(0), 27.0) == "duplicate"  # a replay beyond what was asked for
    assert asked(d.requests(28.5)) == [1, 2]  # 10.5 s after the last answer
    assert d.dropped == Counter({"duplicate": 3}) and d.bytes_received == CB


def test_a_resumed_session_keeps_the_requests_a_new_one_asks_again(tmp_path: Path) -> None:
    d = dl(tmp_path, window=2, timeout=10.0)
    assert asked(d.requests(0.0)) == [0, 1]
    d.session_resumed(50.0, 45.0)  # away from the broker from 5 s to 50 s: the answers are queued in the session
    assert d.requests(55.0) == []  # the time away is not silence from the cloud
    d.accept(chunk(0), 56.0)
    assert asked(d.requests(56.0)) == [2]
    d.forget_requests()  # a reconnect to a new session: nothing is queued for us
    assert asked(d.requests(57.0)) == [1, 2]
    assert d.timeouts == 0 and d.chunks_requested == 5


def test_a_link_that_keeps_dropping_still_asks_again_for_what_never_came(tmp_path: Path) -> None:
    """Each reconnect resumes the session: the timer stops while away and goes on from where it stood, so 10 s of
    connection without an answer asks again however often the link drops (restarted at each reconnect, it never
    would while the link dropped every 4 s)."""
    d = dl(tmp_path, window=2, timeout=10.0)
    assert asked(d.requests(0.0)) == [0, 1]
    for t in (4.0, 9.0):  # connected 4 s, away 1 s, twice
        d.session_resumed(t + 1.0, 1.0)
        assert d.requests(t + 1.0) == []
    assert d.requests(12.0) == []  # 10 s of connection since the ask
    assert asked(d.requests(12.5)) == [0, 1]  # 10.5 s
    assert d.stalls == 1 and d.timeouts == 2


def test_a_request_that_never_left_is_asked_for_again_and_not_paid_for(tmp_path: Path) -> None:
    d = dl(tmp_path, window=4)
    assert asked(d.requests(0.0)) == [0, 1, 2, 3] and d.bytes_requested == 4 * CB
    d.unask(mw.GetRequest(SHA, 2, 2))
    d.unask(mw.GetRequest("ab" * 32, 0, 4))  # not this package's: nothing
    assert d.asked == {0, 1} and d.bytes_requested == 2 * CB and d.chunks_requested == 2
    assert asked(d.requests(0.0)) == [2, 3]


def test_hashes_that_agree_but_a_package_that_does_not(tmp_path: Path) -> None:
    """A desired message whose chunk hashes are of other bytes than its package hash says: refused at the end."""
    other = random.Random(5).randbytes(len(PKG))
    d0 = desired(other)
    lie = mw.Desired(d0.name, d0.version, SHA, d0.size, d0.chunk_bytes, d0.chunk_sha256, d0.key_id, d0.rollout)
    d = Download(lie, tmp_path / "x.part", 16, 30, 3)
    d.open()
    for i in range(10):
        assert d.accept(mw.Chunk(SHA, i, 10, other[i * CB : (i + 1) * CB]), 0.0) == "stored"
    with pytest.raises(DownloadError) as e:
        d.finish()
    assert e.value.code == "package_hash_mismatch"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.sampled_from(["good", "bad", "other"])), max_size=60),
       st.integers(1, 8))
def test_any_delivery_ends_in_the_exact_package_or_a_stated_failure(
    tmp_path_factory: pytest.TempPathFactory, deliveries: list[tuple[int, str]], window: int
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    d = dl(tmp, window=window, max_bad=4)
    other = bytes(len(PKG))
    try:
        for i, kind in deliveries:
            d.requests(0.0)
            c = chunk(i) if kind == "good" else mw.Chunk(SHA, i, 10, bytes(CB)) if kind == "bad" else chunk(i, other)
            d.accept(c, 0.0)
            assert len(d.asked) <= window
        for i in range(10):  # then every chunk, once, as a good server sends
            d.accept(chunk(i), 0.0)
        d.finish()
    except DownloadError as e:
        assert e.code == "chunk_never_matches"
        return
    assert d.part.read_bytes() == PKG
