"""A package's chunks (`model/chunk`) assembled into a pre-sized file, resumable without state of its own.

The desired message (mw.Desired) names the package's hash, size, chunk size and every chunk's SHA-256. The
download writes each chunk at its offset in `download/<package sha256>.part`, created at the package's full size.
After a restart or a lost connection it hashes each chunk slot of that file again against the desired message's
chunk hashes: the slots that match are the chunks it has, so it asks only for the others (a torn write or a
damaged sector is simply a slot that does not match).

Requests (mw.GetRequest, contiguous runs of at most mw.MAX_GET_COUNT chunks) keep at most `window` chunks asked
for and not yet received. They time out on lack of progress, not on their age: one timer for the window, started
when a request goes out into an empty window and restarted by every answer, a chunk of this download that is true
(its slot's size and hash) and stored, or a true copy of one asked for again (its first answer was late, not lost:
the copy is owed); only when no answer arrived for `chunk_timeout_s` are the chunks still outstanding asked for
again (a slow link, whose window takes longer than the timeout to deliver, never pays for its tail twice, nor,
after one stall, for every window behind the copies). A chunk that is not an answer (other bytes, another size, a
copy beyond those asked for) restarts nothing: anyone who can publish on the model topic can send one, and a stream
of them must not hold off asking again. Each further timeout without an answer in between doubles the wait, up to
MAX_BACKOFF times `chunk_timeout_s` (a stalled link is not asked again every `chunk_timeout_s` for the same
chunks); the first answer resets it. A reconnect that resumed the MQTT session keeps the outstanding requests
(their answers are queued in the session for us) and stops the timer for the time away (time away from the broker is
not silence from the cloud); one that did not forgets them: they are asked at once, and no earlier copy is owed.
Every chunk is checked the moment it arrives, and dropped and counted by reason when it is not the one expected:
`duplicate` (already have it: ignored, never written twice), `other_package`, `wrong_total` (a total that is not
the package's), `wrong_size` (not the length its slot must have), `hash_mismatch` (asked for again; `max_bad` of
them for one slot fail the download). When every slot matches, the whole file's hash is checked (`finish`), then
the caller verifies the package (agent/update/verify.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import Counter
from pathlib import Path

from harvester_common import modelwire as mw

# The longest wait for a chunk, as a multiple of `chunk_timeout_s`, after timeouts with no chunk in between: long
# enough that a stall of a few timeouts costs a few re-asks, not one per timeout; short enough that a request the
# cloud really lost (a `busy` refusal, a receiver that died) is asked again within minutes at the default 30 s.
MAX_BACKOFF = 8

class DownloadError(Exception):
    """A download that cannot finish; `code` (`chunk_never_matches`, `package_hash_mismatch`, `io_error`) and why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Download:
    def __init__(self, desired: mw.Desired, part: Path, window: int, chunk_timeout_s: float, max_bad: int) -> None:
        self.desired = desired
        self.part = part
        self.window = window
        self.chunk_timeout_s = chunk_timeout_s
        self.max_bad = max_bad
        n = desired.chunks
        self.have = bytearray(n)  # 1 where the slot holds its chunk
        self.n_have = 0
        self.resumed = 0  # chunks found good in the file at open (not asked for again)
        self.asked: set[int] = set()  # chunks asked for and not yet received
        self.owed: Counter[int] = Counter()  # answers still due per chunk: times asked for, less answers come
        self.bad: Counter[int] = Counter()  # hash mismatches per chunk
        self.dropped: Counter[str] = Counter()  # chunks dropped, by reason
        self.timeouts = 0  # chunks asked for again because no answer arrived for the (backed-off) timeout
        self.stalls = 0  # times the window's timer ran out (each asks every outstanding chunk again)
        self.backoffs = 0  # stalls that came with no answer since the previous one (each doubled the wait, capped)
        self.chunks_requested = 0
        self.bytes_requested = 0
        self.bytes_received = 0  # chunk data accepted into the file
        self.bytes_have = 0
        self._fd: int | None = None
        self._scan = 0  # every chunk below this index is had or asked for (where the next request starts looking)
        self._since = 0.0  # the window's timer: the last answer's arrival, or the request into an empty window
        self._silent = 0  # stalls since the last answer arrived: the wait is chunk_timeout_s * 2**_silent, capped

    # --- the file ------------------------------------------------------------------------------------------------

    def open(self) -> int:
        """Create or reopen the `.part` file at the package's size and find the chunks it already holds; returns
        how many. Raises DownloadError(`io_error`)."""
        d = self.desired
        try:
            self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o640)
            if os.fstat(self._fd).st_size != d.size:
                os.ftruncate(self._fd, d.size)
            for i, want in enumerate(d.chunk_sha256):
                lo, hi = d.chunk_range(i)
                if hashlib.sha256(os.pread(self._fd, hi - lo, lo)).hexdigest() == want:
                    self.have[i] = 1
        except OSError as e:
            self.close()
            raise DownloadError("io_error", f"{self.part}: {e.strerror or e}") from None
        self.n_have = self.resumed = sum(self.have)
        self.bytes_have = sum(d.chunk_range(i)[1] - d.chunk_range(i)[0] for i in range(d.chunks) if self.have[i])
        return self.n_have

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Cancelled or failed: close and delete the partial file."""
        self.close()
        with contextlib.suppress(OSError):
            self.part.unlink()

    # --- requests --------------------------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.n_have == self.desired.chunks

    def wait_s(self) -> float:
        """How long the window waits without an answer before it asks for its outstanding chunks again."""
        return self.chunk_timeout_s * min(1 << self._silent, MAX_BACKOFF)

    def requests(self, now: float) -> list[mw.GetRequest]:
        """What to ask for now: chunks neither had nor asked for, up to the window, in contiguous runs; every
        outstanding chunk again when no answer arrived for `wait_s()`."""
        if self.asked and now - self._since > self.wait_s():
            self.stalls += 1
            if self._silent:
                self.backoffs += 1
            self._silent += 1 if 1 << self._silent < MAX_BACKOFF else 0
            self.timeouts += len(self.asked)
            self._scan = min(self._scan, *self.asked)
            self.asked.clear()
        free = self.window - len(self.asked)
        if free <= 0 or self.complete:
            return []
        d = self.desired
        want: list[int] = []
        i = self._scan
        while i < d.chunks and len(want) < free:
            if not self.have[i] and i not in self.asked:
                want.append(i)
            elif not want:
                self._scan = i + 1
            i += 1
        if want and not self.asked:
            self._since = now  # nothing was outstanding: no silence to count before this request
        out: list[mw.GetRequest] = []
        for i in want:
            if out and out[-1].first + out[-1].count == i and out[-1].count < mw.MAX_GET_COUNT:
                out[-1] = mw.GetRequest(d.package_sha256, out[-1].first, out[-1].count + 1)
            else:
                out.append(mw.GetRequest(d.package_sha256, i, 1))
            self.asked.add(i)
            self.owed[i] += 1
            lo, hi = d.chunk_range(i)
            self.bytes_requested += hi - lo
        self.chunks_requested += len(want)
        return out

    def unask(self, g: mw.GetRequest) -> None:
        """A request that never left (the connection went as the list it was in was being published): its chunks
        are not on their way, nor paid for, so they are asked for at the next call."""
        if g.package_sha256 != self.desired.package_sha256:
            return
        for i in range(g.first, g.first + g.count):
            if i in self.asked:
                self.asked.discard(i)
                self._owe_one_less(i)
                self._scan = min(self._scan, i)
                lo, hi = self.desired.chunk_range(i)
                self.bytes_requested -= hi - lo
                self.chunks_requested -= 1

    def forget_requests(self) -> None:
        """A new MQTT session (the broker kept none for us): whatever was asked for will not be answered to us;
        ask again at once."""
        self.asked.clear()
        self.owed.clear()
        self._scan = 0
        self._silent = 0

    def session_resumed(self, now: float, away_s: float) -> None:
        """A reconnect to the session we had, after `away_s` without a connection: the outstanding requests'
        answers are queued there for us, so they stay asked for (and owed). The window's timer stops for the time
        away, when no chunk could arrive, and goes on from where it stood: restarted at every reconnect instead, a
        link that drops more often than the timeout would never ask again for a chunk the cloud did not send."""
        self._since = min(now, self._since + away_s)

    # --- chunks ----------------------------------------------------------------------------------------------------

    def accept(self, c: mw.Chunk, now: float) -> str:
        """Take one chunk, arrived at `now` (the clock of `requests`): "stored", or the reason it was dropped
        (counted in `dropped`). Raises DownloadError when the download cannot finish (a chunk that keeps failing its
        hash, the file cannot be written)."""
        d = self.desired
        reason = ""
        if c.package_sha256 != d.package_sha256:
            reason = "other_package"
        elif c.total != d.chunks:
            reason = "wrong_total"  # index < total is the decoder's; a total that is not ours says nothing true
        elif self.have[c.index]:
            reason = "duplicate"
            if self.owed[c.index] and not self._flaw(c):
                # The answer to a request made again while the first answer was late, not lost (a timeout): on a
                # slow link it comes in turn, before the chunks asked for after it, so it is progress all the same.
                self._answered(c.index, now)
        else:
            reason = self._flaw(c)
            if reason == "hash_mismatch" and c.index in self.asked:
                # A wrong answer to a request counts toward `max_bad` (the cloud's copy may be damaged: the download
                # must end, not loop). One nobody asked for counts only as dropped: anyone who can publish on the
                # model topic could otherwise fail the download with `max_bad` forgeries.
                self.bad[c.index] += 1
                self.asked.discard(c.index)  # ask again at once
                self._scan = min(self._scan, c.index)
                if self.bad[c.index] >= self.max_bad:
                    self.dropped[reason] += 1
                    raise DownloadError("chunk_never_matches", f"chunk {c.index} of {d.chunks} failed its hash "
                                        f"{self.bad[c.index]} times")
        if reason:
            self.dropped[reason] += 1
            return reason
        assert self._fd is not None, "accept before open"
        try:
            os.pwrite(self._fd, c.data, d.chunk_range(c.index)[0])
        except OSError as e:
            raise DownloadError("io_error", f"{self.part}: {e.strerror or e}") from None
        self.have[c.index] = 1
        self.n_have += 1
        self.asked.discard(c.index)
        self.bytes_received += len(c.data)
        self.bytes_have += len(c.data)
        self._answered(c.index, now)
        return "stored"

    def _flaw(self, c: mw.Chunk) -> str:
        """Why `c` is not its slot's chunk (`wrong_size`, `hash_mismatch`), or "" when it is."""
        lo, hi = self.desired.chunk_range(c.index)
        if len(c.data) != hi - lo:
            return "wrong_size"
        if hashlib.sha256(c.data).hexdigest() != self.desired.chunk_sha256[c.index]:
            return "hash_mismatch"
        return ""

    def _answered(self, i: int, now: float) -> None:
        """Chunk `i` came, true: the link and the cloud are answering, so what is still outstanding is likely
        behind it, not lost, and the window's timer starts over. Only such a chunk restarts it: one with other
        bytes or another size, or a copy beyond those asked for, can come from anyone who can publish on the
        model topic (a forgery, a replay), and says nothing of the cloud; were it to restart the timer, a forger
        would hold off asking again for what is missing for as long as it kept sending."""
        self._owe_one_less(i)
        self._since = now
        self._silent = 0

    def _owe_one_less(self, i: int) -> None:
        if self.owed[i] > 1:
            self.owed[i] -= 1
        else:
            self.owed.pop(i, None)

    def finish(self) -> None:
        """Every chunk is in: check the whole file's hash, make it durable, close it. Raises DownloadError."""
        assert self.complete and self._fd is not None
        h = hashlib.sha256()
        try:
            for i in range(self.desired.chunks):
                lo, hi = self.desired.chunk_range(i)
                h.update(os.pread(self._fd, hi - lo, lo))
            os.fsync(self._fd)
        except OSError as e:
            raise DownloadError("io_error", f"{self.part}: {e.strerror or e}") from None
        finally:
            self.close()
        if h.hexdigest() != self.desired.package_sha256:
            raise DownloadError("package_hash_mismatch", "every chunk matched its hash but the package's SHA-256 is "
                                f"{h.hexdigest()[:12]}, not {self.desired.package_sha256[:12]}")

    def progress(self) -> dict[str, int]:
        """For model/status: chunks had, of how many, and bytes had."""
        return {"chunks_have": self.n_have, "chunks": self.desired.chunks, "bytes": self.bytes_have}
