"""The vehicle's model update: a state machine driven by `model/desired`, persisted in `state.json`.

```
idle ─desired─▶ downloading ─all chunks, hash─▶ verified ─▶ shadow ─passes, no alert open─▶ active (watch)
                   │  │                           │           │                               │        │
                   │  └─▶ failed                   └▶ rejected └─▶ rejected                     │        └─▶ rolled_back
                   └─▶ cancelled (the desired model changed or was cleared under a step)      └─▶ active (healthy)
```

Every step is reported on the retained `model/status` (mw.ModelStatus) with a `seq` one above the last, saved in
`state.json` (agent/update/modeldir.py: written whole, fsynced) before the report leaves, and never below the
clock in milliseconds at start: it increases strictly across restarts, even if `state.json` is lost.

- A desired model that is already active is reported `active` again (nothing else happens); one whose step
  ended in `rejected`, `rolled_back` or `failed` is not tried again unless the cloud issues it anew (another
  `issued_at`): the report is sent again instead.
- An empty desired message cancels the step in progress (`cancelled`); a new desired model does the same to the
  step of the previous one, then starts. While a new model is watched, a new desired model waits for the watch
  to end, except a `rollback` to the previous model, which is immediate.
- `mode: "rollback"` (an operator's decision): the package (kept here, or downloaded) is verified and switched
  to without a shadow run and without a watch.
- A verified package is kept in the model directory before the pipeline gets it; the pointer (`active.json`) is
  rewritten at the switch and at a rollback, so a restart scores with what scored before it. After a restart
  mid-watch the watch starts again (the previous model is loaded and kept warm); a step cut short before the
  switch starts again when the retained desired message arrives (the download resumes from its partial file).

Threads: `on_desired`, `on_chunk`, `outgoing`, `unsent` and `on_connect` run on the uplink thread (downloads are
file writes, verification loads the model); `drive` and `on_update` on the pipeline thread, which alone scores.
One lock.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.config import ModelConfig
from agent.metrics import counts
from agent.scoring import Scorer
from agent.update.download import Download, DownloadError
from agent.update.modeldir import Choice, LoadError, ModelDir, ModelDirError, ModelRef, choose, load_ref
from agent.update.shadow import Figures, ShadowBounds, UpdateEvent
from agent.update.verify import check_package
from harvester_common import modelwire as mw
from harvester_common.modelpkg import PackageError, PublicKey

log = logging.getLogger("agent.update")

IN_PROGRESS = ("downloading", "verified", "shadow")
STICKY = ("rejected", "rolled_back", "failed")  # not tried again for the same desired message
MAX_QUEUED_STATUS = 64  # reports waiting for a connection; the oldest go first (each newer one supersedes them)
T = TypeVar("T")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _label(s: str) -> str:
    """A contract's name or version as model/status carries it (wire.valid_label)."""
    return _CONTROL.sub("_", s)[:256] or "_"


def _decoded(decode: Callable[[bytes], T | None], value: Any) -> T | None:
    """A value saved in its wire form, back through the wire's decoder; None if it is not one."""
    if not isinstance(value, dict):
        return None
    try:
        return decode(json.dumps(value).encode())
    except (mw.ModelWireError, TypeError, ValueError):
        return None


def _ref_status(ref: ModelRef | None) -> dict[str, str] | None:
    if ref is None:
        return None
    return {"name": _label(ref.name), "version": _label(ref.version), "sha256": ref.sha256}


class UpdatingPipeline(Protocol):
    """What the manager asks of the pipeline (agent/pipeline.py), between batches on its thread."""

    def shadow(self, scorer: Scorer, tag: Any, bounds: ShadowBounds) -> bool: ...

    def switch_to(self, scorer: Scorer, tag: Any, bounds: ShadowBounds) -> bool: ...

    def cancel(self) -> bool: ...

    def roll_back(self, reason: str) -> bool: ...

    def watch(self, previous: Scorer | None, tag: Any, base: Figures, bounds: ShadowBounds) -> None: ...


class ModelManager:
    def __init__(
        self,
        cfg: ModelConfig,
        mdir: ModelDir,
        signals: set[str],
        trusted: Mapping[str, PublicKey],
        active: ModelRef | None,
        previous: ModelRef | None,
        installed_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.mdir = mdir
        self.signals = signals
        self.trusted = trusted
        self.installed_path = installed_path or cfg.path
        self.clock = clock
        self.bounds = ShadowBounds.of(cfg)
        self.active = active  # what scores now
        self.previous = previous  # what a rollback goes back to
        self.counters: Counter[str] = Counter()  # chunks dropped by reason, reports not saved, ...
        self._lock = threading.RLock()
        self._out: deque[tuple[str, bytes, bool]] = deque()  # (leaf, payload, retain) for the uplink
        self._handoff: list[tuple[Any, ...]] = []  # for the pipeline thread (`drive`)
        self._step = "idle"
        self._desired: mw.Desired | None = None  # what the step in progress (or the last one) is about
        self._wanted: mw.Desired | None = None  # the latest desired message (None: none, or cleared)
        self._pending: mw.Desired | None = None  # waits for the watch to end
        self._candidate: ModelRef | None = None
        self._download: Download | None = None
        self._base: dict[str, Any] | None = None  # the old model's shadow figures, for the watch
        self._operator_rollback = False  # the watch is being ended by an operator's rollback
        self._last: dict[str, Any] | None = None  # the latest status, as a dict
        self._last_payload = b""
        self._progress_at = 0.0
        self._seq = int(clock() * 1000)
        self._restore()

    # --- persistence ---------------------------------------------------------------------------------------------

    def _restore(self) -> None:
        saved, err = self.mdir.read_state()
        if err:
            log.error("model update state unreadable, starting afresh: %s", err)
        if not isinstance(saved, dict):
            return
        seq = saved.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
            # Above both the last report and the clock: increasing even if the clock went back.
            self._seq = max(self._seq, seq)
        # Both saved as their wire form: read back through the wire's own checks.
        status = _decoded(mw.decode_status, saved.get("status"))
        if status is None:
            return
        self._last = status.to_dict()
        self._last_payload = mw.encode_status(status)
        self._desired = _decoded(mw.decode_desired, saved.get("desired"))
        base = saved.get("base")
        self._base = base if isinstance(base, dict) else None
        target = (status.target or {}).get("package_sha256", "")
        active_pkg = self.active.package if self.active is not None else ""
        if status.state == "verified" and target and target == active_pkg and self._desired is not None \
                and self._desired.mode == "rollback":
            # An operator's rollback cut short between its pointer and its report: done, and never watched.
            self._step = "active"
            self._report("active", healthy=True, reason="an operator's rollback: no shadow run")
        elif (status.state == "active" and target == active_pkg and status.healthy is None) \
                or (status.state in ("verified", "shadow") and target and target == active_pkg):
            # Cut short in the watch (or between the switch's pointer and its report): watch again from zero.
            self._resume_watch(status.state != "active")
        elif status.state == "active" and target and target != active_pkg and status.healthy is not False:
            self._step = "rolled_back"
            what = self.active.label() if self.active else "no model"
            self._report("rolled_back", healthy=None,
                         reason=f"the active package {target[:12]} did not load at start; scoring with {what}")
        elif status.state in STICKY or status.state == "active":
            self._step = status.state

    def _save(self) -> None:
        state = {"seq": self._seq, "status": self._last, "base": self._base,
                 "desired": self._desired.to_dict() if self._desired else None}
        try:
            self.mdir.write_state(state)
        except ModelDirError as e:
            self.counters["state_not_saved"] += 1
            log.error("model update step not saved: %s", e)

    def _target(self, d: mw.Desired | None) -> dict[str, str] | None:
        if d is None:
            return None
        return {"name": d.name, "version": d.version, "package_sha256": d.package_sha256, "rollout": d.rollout}

    def _report(self, state: str, healthy: bool | None = None, reason: str = "", figures: dict[str, Any] | None = None,
                progress: dict[str, Any] | None = None, target: mw.Desired | None = None) -> None:
        """A step: the next seq, saved, then queued for the uplink (retained)."""
        self._seq += 1
        st = mw.ModelStatus(state, self._seq, round(self.clock(), 3), self._target(target or self._desired),
                            _ref_status(self.active), _ref_status(self.previous), healthy,
                            reason[: mw.MAX_REASON_CHARS], dict(figures or {}), dict(progress or {}))
        payload = mw.encode_status(st)
        try:
            mw.decode_status(payload)
        except mw.ModelWireError as e:  # a figure out of bounds: the step still goes out, its figures not
            self.counters["status_figures_dropped"] += 1
            log.error("model status figures refused by the wire's checks (%s); sent without them", e)
            st = mw.ModelStatus(state, self._seq, st.ts, st.target, st.active, st.previous, healthy, st.reason)
            payload = mw.encode_status(st)
        self._last = st.to_dict()
        self._last_payload = payload
        self._save()
        if len(self._out) >= MAX_QUEUED_STATUS:
            self._out.popleft()
            self.counters["status_superseded"] += 1
        self._out.append((mw.LEAF_STATUS, payload, True))
        log.info("model step %s (seq %d)%s%s", state, self._seq, f" {st.target['name']} {st.target['version']}"
                 if st.target else "", f": {reason}" if reason else "")

    # --- the uplink thread ----------------------------------------------------------------------------------------

    def on_connect(self, session_present: bool, away_s: float = 0.0) -> None:
        """A (re)connection. When the broker resumed our session, the answers to the requests in flight are queued
        in it for us: they stay asked for (asking again would bring each chunk twice, and pay for it twice);
        otherwise they are lost and asked for again. The latest report goes again (retained, same seq)."""
        with self._lock:
            if self._download is not None:
                if session_present:
                    self._download.session_resumed(time.monotonic(), away_s)
                else:
                    self._download.forget_requests()
            self._resend_report()

    def _resend_report(self) -> None:
        if self._last_payload and not any(leaf == mw.LEAF_STATUS for leaf, _, _ in self._out):
            self._out.append((mw.LEAF_STATUS, self._last_payload, True))

    def unsent(self, items: list[tuple[str, bytes, bool]]) -> None:
        """What `outgoing` gave that the uplink could not publish (the connection went meanwhile). Requests: their
        chunks are asked for again (a resumed session would otherwise wait a whole timeout for them); reports: the
        next connection sends the latest one anyway."""
        with self._lock:
            dl = self._download
            for leaf, payload, _ in items:
                if leaf == mw.LEAF_GET and dl is not None:
                    dl.unask(mw.decode_get(payload))

    def outgoing(self, allow_get: bool = True) -> list[tuple[str, bytes, bool]]:
        """What to publish now: reports, then chunk requests (none when `allow_get` is False: the day's budget)."""
        with self._lock:
            now = time.monotonic()
            dl = self._download
            if dl is not None and now - self._progress_at >= self.cfg.progress_interval_s:
                self._progress_at = now
                if self._last is None or self._last.get("progress") != dl.progress():
                    self._report("downloading", progress=dl.progress())
            out = list(self._out)
            self._out.clear()
            if dl is not None and allow_get:
                was = (dl.timeouts, dl.stalls, dl.backoffs)
                out += [(mw.LEAF_GET, mw.encode_get(g), False) for g in dl.requests(now)]
                for name, before, after in zip(("chunks_timed_out", "download_stalls", "download_backoffs"), was,
                                               (dl.timeouts, dl.stalls, dl.backoffs), strict=True):
                    if after > before:
                        self.counters[name] += after - before
            return out

    def on_desired(self, d: mw.Desired | None) -> None:
        with self._lock:
            self._wanted = d
            if d is None:
                self._pending = None
                self._cancel("the desired model was cleared")
                return
            same = self._desired is not None and self._desired.to_dict() == d.to_dict()
            if same and self._step in (*IN_PROGRESS, "watch", "switching"):
                return  # the retained message again (a reconnect): the step goes on
            if same and self._step in STICKY:
                self._resend_report()  # its outcome again, not a second attempt
                return
            if self.active is not None and d.package_sha256 == self.active.package:
                self._pending = None
                self._cancel(f"the desired model changed to {d.name} {d.version}, which is active")
                self._desired = d
                if self._step == "watch":
                    return  # its report (active, being watched) stands
                last = self._last or {}
                if last.get("state") == "active" and last.get("healthy") is True \
                        and (last.get("target") or {}).get("package_sha256") == d.package_sha256:
                    self._resend_report()
                else:
                    self._step = "active"
                    self._report("active", healthy=True, reason="already active")
                return
            if self._step == "watch":
                if d.mode == "rollback" and self.previous is not None and d.package_sha256 == self.previous.package:
                    self._desired = d
                    self._operator_rollback = True
                    self._handoff.append(("rollback", f"an operator's rollback to {d.name} {d.version}"))
                else:
                    self._pending = d  # after the watch
                return
            self._cancel(f"the desired model changed to {d.name} {d.version}")
            self._start(d)

    def on_chunk(self, c: mw.Chunk) -> None:
        with self._lock:
            dl = self._download
            if dl is None:
                self.counters["chunks_not_downloading"] += 1
                return
            try:
                got = dl.accept(c, time.monotonic())
            except DownloadError as e:
                self.counters[f"chunks_{'hash_mismatch' if e.code == 'chunk_never_matches' else e.code}"] += 1
                self._fail(e)
                return
            if got != "stored":
                self.counters[f"chunks_{got}"] += 1
                if got != "duplicate":
                    log.warning("model chunk %d dropped: %s", c.index, got)
                return
            if dl.complete:
                self._finish_download()

    # --- steps -----------------------------------------------------------------------------------------------------

    def _start(self, d: mw.Desired) -> None:
        self._desired = d
        self._candidate = None
        self._operator_rollback = False
        sha = d.package_sha256
        if self.mdir.has_package(sha):
            try:
                self._verify(self.mdir.read_package(sha), kept=True)
            except ModelDirError as e:
                self._step = "failed"
                self._report("failed", reason=str(e))
            return
        dl = Download(d, self.mdir.part_path(sha), self.cfg.download_window, self.cfg.chunk_timeout_s,
                      self.cfg.chunk_max_bad)
        try:
            had = dl.open()
        except DownloadError as e:
            self._fail(e)
            return
        self._download = dl
        self._step = "downloading"
        self._progress_at = time.monotonic()
        self._report("downloading", progress=dl.progress(),
                     figures={"resumed_chunks": had} if had else None)
        if dl.complete:
            self._finish_download()

    def _fail(self, e: DownloadError) -> None:
        dl = self._download
        self._download = None
        if dl is not None:
            if e.code == "chunk_never_matches":
                # The chunks held passed their hashes: kept for the next desired message naming this package
                # (`open` checks each slot again; `prune` deletes the file once another package is desired).
                dl.close()
            else:
                dl.discard()
            self.counters["downloads_failed"] += 1
        self._step = "failed"
        self._report("failed", reason=f"{e.code}: {e}",
                     figures={"bytes_requested": dl.bytes_requested, "timeouts": dl.timeouts, "stalls": dl.stalls,
                              "backoffs": dl.backoffs} | dict(dl.dropped)
                     if dl else None, progress=dl.progress() if dl else None)

    def _finish_download(self) -> None:
        dl = self._download
        assert dl is not None
        try:
            dl.finish()
            data = dl.part.read_bytes()
        except DownloadError as e:
            self._fail(e)
            return
        except OSError as e:
            self._fail(DownloadError("io_error", f"{dl.part}: {e.strerror or e}"))
            return
        self._download = None
        log.info("model package %s downloaded: %d bytes requested for %d (%d chunks already held)",
                 dl.desired.package_sha256[:12], dl.bytes_requested, dl.desired.size, dl.resumed)
        self._verify(data, kept=False, part=dl.part)

    def _verify(self, data: bytes, kept: bool, part: Path | None = None) -> None:
        d = self._desired
        assert d is not None
        try:
            v = check_package(data, self.trusted, self.signals, self.cfg.threads, self.cfg.batch_windows)
            m = v.package.manifest
            if (m.name, m.version, m.key_id) != (d.name, d.version, d.key_id):
                raise PackageError("contract_mismatch", f"the desired message names {d.name} {d.version} (key "
                                   f"{d.key_id}); the package holds {m.name} {m.version} (key {m.key_id})")
            if not kept:
                assert part is not None
                self.mdir.keep_part(part, d.package_sha256)
        except PackageError as e:
            self._step = "rejected"
            self.counters[f"packages_refused.{e.code}"] += 1
            if part is not None:
                part.unlink(missing_ok=True)
            self._prune()
            self._report("rejected", reason=f"{e.code}: {e}")
            return
        except ModelDirError as e:
            self._step = "failed"
            self._report("failed", reason=str(e))
            return
        self._candidate = ModelRef(d.package_sha256, m.name, m.version, m.sha256)
        self._step = "verified"
        self._report("verified")
        if d.mode == "rollback":
            self._handoff.append(("switch", v.scorer, d.package_sha256))
        else:
            self._handoff.append(("shadow", v.scorer, d.package_sha256))

    def _cancel(self, reason: str) -> None:
        if self._step not in (*IN_PROGRESS, "switching"):
            return
        if self._download is not None:
            self._download.discard()
            self._download = None
        self._handoff.append(("cancel",))
        self._step = "cancelled"
        self._candidate = None
        self._prune()
        self._report("cancelled", reason=reason)

    def _prune(self) -> None:
        keep = {r.package for r in (self.active, self.previous, self._candidate) if r is not None}
        if self._download is not None:
            keep.add(self._download.desired.package_sha256)
        for name in self.mdir.prune(keep):
            log.info("model directory: removed %s", name)

    def _next(self) -> None:
        """The watch is over: start what waited for it."""
        d, self._pending = self._pending, None
        if d is not None:
            self.on_desired(d)

    def _resume_watch(self, report: bool) -> None:
        prev: Scorer | None = None
        if self.previous is not None:
            try:
                prev = load_ref(self.mdir, self.previous, self.installed_path, self.trusted, self.signals,
                                self.cfg.threads, self.cfg.batch_windows).scorer
            except LoadError as e:
                log.error("model watch: the previous model %s does not load (%s): no rollback possible",
                          self.previous.label(), e)
        base = Figures.from_dict(self._base) or Figures()
        assert self.active is not None
        self._step = "watch"
        self._handoff.append(("watch", prev, self.active.package, base))
        log.warning("model %s: watched again after a restart", self.active.label())
        if report:
            self._report("active", healthy=None, reason="watched again after a restart")

    # --- the pipeline thread --------------------------------------------------------------------------------------

    def drive(self, pipeline: UpdatingPipeline) -> None:
        """Hand the pipeline what the manager decided (called between batches, on the pipeline thread)."""
        with self._lock:
            todo, self._handoff = self._handoff, []
        for item in todo:
            kind = item[0]
            if kind == "shadow":
                pipeline.shadow(item[1], item[2], self.bounds)
            elif kind == "switch":
                with self._lock:
                    self._step = "switching"
                pipeline.switch_to(item[1], item[2], self.bounds)
            elif kind == "cancel":
                pipeline.cancel()
            elif kind == "rollback":
                pipeline.roll_back(item[1])
            elif kind == "watch":
                pipeline.watch(item[1], item[2], item[3], self.bounds)

    def on_update(self, ev: UpdateEvent) -> None:
        """The pipeline's word on the candidate (on the pipeline thread)."""
        with self._lock:
            d = self._desired
            watched = self.active.package if self.active is not None else ""
            if ev.kind in ("healthy", "rolled_back") and ev.tag == watched:
                self._after_watch(ev)
                return
            if d is None or ev.tag != d.package_sha256 or self._candidate is None:
                self.counters["stale_update_events"] += 1
                return
            if ev.kind == "shadow":
                self._step = "shadow"
                self._progress_at = time.monotonic()
                self._report("shadow", figures=ev.figures)
            elif ev.kind == "progress":
                if time.monotonic() - self._progress_at >= self.cfg.progress_interval_s:
                    self._progress_at = time.monotonic()
                    self._report("shadow", figures=ev.figures)
            elif ev.kind == "waiting":
                self._report("shadow", reason="passed; the switch waits for the open alert to close",
                             figures=ev.figures)
            elif ev.kind == "rejected":
                self._step = "rejected"
                self._candidate = None
                self._prune()
                self._report("rejected", reason=ev.reason, figures=ev.figures)
            elif ev.kind == "switched":
                self._switched(ev)

    def _switched(self, ev: UpdateEvent) -> None:
        assert self._candidate is not None
        old, self.active, self.previous = self.active, self._candidate, self.active
        self._candidate = None
        try:
            self.mdir.set_pointer(self.active, self.previous)
        except ModelDirError as e:
            self.counters["pointer_not_saved"] += 1
            log.error("model pointer not saved (a restart would score with %s): %s",
                      old.label() if old else "the installed model", e)
        if ev.watch:
            self._step = "watch"
            self._base = ev.base
            self._report("active", healthy=None, figures=ev.figures)
        else:
            self._step = "active"
            self._base = None
            self._prune()
            self._report("active", healthy=True, reason="an operator's rollback: no shadow run", figures=ev.figures)

    def _after_watch(self, ev: UpdateEvent) -> None:
        self._base = None
        if ev.kind == "healthy":
            self._step = "active"
            self._prune()
            self._report("active", healthy=True, figures=ev.figures)
        else:
            rolled_from, self.active, self.previous = self.active, self.previous, None
            try:
                self.mdir.set_pointer(self.active, None)
            except ModelDirError as e:
                self.counters["pointer_not_saved"] += 1
                log.error("model pointer not saved after the rollback: %s", e)
            if self._operator_rollback:
                self._operator_rollback = False
                self._step = "active"
                self._report("active", healthy=True, reason="an operator's rollback: no shadow run")
            else:
                self._step = "rolled_back"
                self._report("rolled_back", reason=ev.reason, figures=ev.figures)
            log.warning("model %s rolled back", rolled_from.label() if rolled_from else "?")
            self._prune()
        self._next()

    def close(self) -> None:
        """At a stop: the partial download's file is closed (kept: the next start goes on from it)."""
        with self._lock:
            if self._download is not None:
                self._download.close()

    # --- for the status message ------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The vehicle status's `model` object: what scores, what the cloud wants, the step."""
        with self._lock:
            w = self._wanted
            return {
                "active": {"name": self.active.name, "version": self.active.version} if self.active else None,
                "desired": {"name": w.name, "version": w.version, "mode": w.mode} if w else None,
                # As model/status says it (mw.STATES, or idle): the watch is `active`, a warm-up `verified`.
                "state": {"watch": "active", "switching": "verified"}.get(self._step, self._step),
                "healthy": None if self._step == "watch" else (self._last or {}).get("healthy"),
                "seq": (self._last or {}).get("seq"),
            }

    def metrics(self) -> dict[str, Any]:
        dl = self._download
        return {"events": counts(self.counters),
                "download_chunks_have": float(dl.n_have) if dl else 0.0,
                "download_bytes_requested": float(dl.bytes_requested) if dl else 0.0}


def start(cfg: ModelConfig, root: Path, trusted: Mapping[str, PublicKey],
          signals: set[str]) -> tuple[Choice, ModelManager | None]:
    """What the agent scores with at start (modeldir.choose) and the manager that carries on from the saved step;
    no manager (updates off, said) when the model directory cannot be used."""
    mdir: ModelDir | None = None
    try:
        mdir = ModelDir(root)
    except ModelDirError as e:
        log.error("model updates disabled: %s", e)
    choice = choose(mdir, cfg.path, trusted, signals, cfg.threads, cfg.batch_windows)
    if mdir is None:
        return choice, None
    active = choice.loaded.ref if choice.loaded is not None else None
    # The pointer's previous model is the rollback target only when its active one is what loaded.
    previous = choice.pointer.previous if active is not None and active == choice.pointer.active else None
    return choice, ModelManager(cfg, mdir, signals, trusted, active, previous)
