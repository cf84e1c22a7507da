"""The chunk download on real files: resume by re-hashing the partial file (only what is missing is asked for
again), a bounded window of requests, timeouts, and every kind of wrong chunk dropped and counted; fuzzed with
hypothesis (any order, duplicates and corruptions end in the exact package or a stated failure)."""

from __future__ import annotations

import hashlib
import random
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
        assert d.accept(chunk(i)) == "stored"
    assert asked(d.requests(0.0)) == [4, 5]
    for i in range(2, 10):
        d.accept(chunk(i))
    assert d.complete
    d.finish()
    assert d.part.read_bytes() == PKG and d.bytes_received == len(PKG)


def test_resume_asks_only_for_what_the_partial_file_lacks(tmp_path: Path) -> None:
    d = dl(tmp_path)
    for i in (0, 1, 2, 5):
        d.accept(chunk(i))
    d.close()  # the process dies here; what it wrote is on disk
    with open(d.part, "r+b") as f:  # and chunk 2's slot was torn
        f.seek(2 * CB + 10)
        f.write(b"\x00\x00")
    again = dl(tmp_path, window=16)
    assert again.resumed == 3 and again.progress() == {"chunks_have": 3, "chunks": 10, "bytes": 3000}
    got = asked(again.requests(0.0))
    assert got == [2, 3, 4, 6, 7, 8, 9] and again.bytes_requested == 7 * CB  # not from zero
    for i in got:
        again.accept(chunk(i))
    again.finish()
    assert again.part.read_bytes() == PKG


def test_wrong_chunks_are_dropped_and_counted(tmp_path: Path) -> None:
    d = dl(tmp_path)
    d.requests(0.0)
    other = random.Random(4).randbytes(10_000)
    assert d.accept(chunk(0, other)) == "other_package"
    assert d.accept(mw.Chunk(SHA, 0, 11, PKG[:CB])) == "wrong_total"
    assert d.accept(mw.Chunk(SHA, 9, 10, PKG[9 * CB :] + b"x")) == "wrong_size"
    assert d.accept(mw.Chunk(SHA, 1, 10, bytes(CB))) == "hash_mismatch"
    assert 1 not in d.asked and asked(d.requests(0.0)) == [1]  # asked for again at once
    assert d.accept(chunk(0)) == "stored"
    assert d.accept(chunk(0)) == "duplicate"
    assert dict(d.dropped) == {"other_package": 1, "wrong_total": 1, "wrong_size": 1, "hash_mismatch": 1,
                               "duplicate": 1}
    assert d.n_have == 1


def test_a_chunk_never_matching_its_hash_fails_the_download(tmp_path: Path) -> None:
    d = dl(tmp_path, max_bad=3)
    for _ in range(2):
        assert d.accept(mw.Chunk(SHA, 4, 10, bytes(CB))) == "hash_mismatch"
    with pytest.raises(DownloadError) as e:
        d.accept(mw.Chunk(SHA, 4, 10, bytes(CB)))
    assert e.value.code == "chunk_never_matches" and "chunk 4" in str(e.value)


def test_a_request_not_answered_in_time_is_made_again(tmp_path: Path) -> None:
    d = dl(tmp_path, window=2, timeout=10.0)
    assert asked(d.requests(0.0)) == [0, 1]
    d.accept(chunk(1))
    assert asked(d.requests(5.0)) == [2]
    assert asked(d.requests(11.0)) == [0]  # 0 timed out; 2 still out
    assert d.timeouts == 1
    d.forget_requests()  # the link went down
    assert asked(d.requests(12.0)) == [0, 2]


def test_hashes_that_agree_but_a_package_that_does_not(tmp_path: Path) -> None:
    """A desired message whose chunk hashes are of other bytes than its package hash says: refused at the end."""
    other = random.Random(5).randbytes(len(PKG))
    d0 = desired(other)
    lie = mw.Desired(d0.name, d0.version, SHA, d0.size, d0.chunk_bytes, d0.chunk_sha256, d0.key_id, d0.rollout)
    d = Download(lie, tmp_path / "x.part", 16, 30, 3)
    d.open()
    for i in range(10):
        assert d.accept(mw.Chunk(SHA, i, 10, other[i * CB : (i + 1) * CB])) == "stored"
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
            d.accept(c)
            assert len(d.asked) <= window
        for i in range(10):  # then every chunk, once, as a good server sends
            d.accept(chunk(i))
        d.finish()
    except DownloadError as e:
        assert e.code == "chunk_never_matches"
        return
    assert d.part.read_bytes() == PKG
