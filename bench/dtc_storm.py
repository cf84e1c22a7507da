"""DTC storms (docs/delivery.md, "DTC storms"): `dtc_storm_frames_per_s`, a fuzzed DM1-heavy storm replayed through
the whole on-vehicle pipeline beside the same replay of clean traffic."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

from benchkit import REPO, Figure, figure

FRAMES = 500_000  # 250 s of a busy bus (2,000 frames/s): four minutes of the per-minute bound
ROUNDS = 2  # interleaved, best of: the machine is shared


def _clean_log(path: Path, n: int) -> None:
    """The simulator's J1939 traffic (a healthy harvester: its DM1 once a second, no DTC), `n` frames, on a wall-clock
    epoch, as a candump -L log."""
    import can

    from harvester_sim.j1939_tx import J1939Transmitter
    from harvester_sim.physics import Harvester
    from harvester_testing.storm import STORM_EPOCH

    tx = J1939Transmitter(Harvester(seed=7))
    with can.Logger(str(path)) as w:
        for m in itertools.islice(itertools.chain.from_iterable(tx.frames_until(60.0 * k)
                                                                for k in itertools.count(1)), n):
            m.timestamp += STORM_EPOCH
            m.channel = "can0"
            w.on_message_received(m)


def _replay(log: Path, db: Path, scored: bool) -> dict[str, Any]:
    from agent.replay import replay

    model = REPO / "models" / "harvester-anomaly.int8.onnx"
    return replay([log], db=db, model=model if scored else None)


def _best(logs: dict[str, Path], folder: Path, scored: bool) -> dict[str, dict[str, Any]]:
    """Each log replayed `ROUNDS` times, interleaved; the fastest of each."""
    best: dict[str, dict[str, Any]] = {}
    for i in range(ROUNDS):
        for name, log in logs.items():
            out = _replay(log, folder / f"{name}-{scored}-{i}.sqlite", scored)
            if name not in best or out["frames_per_s"] > best[name]["frames_per_s"]:
                best[name] = out
    return best


@figure("dtc_storm_frames_per_s")
def dtc_storm_frames_per_s() -> Figure:
    """`harvester-agent replay`'s Python API (python-can's reader, J1939 decode with TP and DM1, the DTC debouncer,
    the SQLite store) on a fuzzed storm (harvester_testing/storm.py: random ids and bytes, random TP frames and BAM
    DM1s, 8 % single-frame DM1s with random content from random source addresses, ~0.2 DTC events per frame) vs the
    same replay of the simulator's clean traffic, same frame count. The value is without a model (`--no-model`):
    the storm gives the model nothing to score, so with it the clean side alone would pay for scoring; the same
    pair with the shipped model (replay's default) is reported beside it."""
    from harvester_testing.storm import storm_frames, write_candump

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        logs = {"clean": folder / "clean_candumpL.log", "storm": folder / "storm_candumpL.log"}
        write_candump(logs["storm"], storm_frames(FRAMES, seed=1))
        _clean_log(logs["clean"], FRAMES)
        bare = _best(logs, folder, scored=False)
        model = _best(logs, folder, scored=True)
    storm, clean = bare["storm"], bare["clean"]
    assert storm["frames"] == clean["frames"] == FRAMES
    ours, base = storm["frames_per_s"], clean["frames_per_s"]
    m_storm, m_clean = model["storm"]["frames_per_s"], model["clean"]["frames_per_s"]
    written, decoded = storm["dtc_events_written"], storm["dtc_events"]
    return Figure(
        ours, "frames/s", base, ours / base,
        f"{FRAMES} frames each, no model, best of {ROUNDS} interleaved; storm: {decoded} DTC events decoded, "
        f"{written} records written for them ({storm['dtc_events_merged']} events merged into dtc_flapping/"
        f"dtc_storm summaries), {storm['store_transactions']} store transactions; clean: {clean['dtc_events']} "
        f"DTC events, {clean['store_transactions']} store transactions. With the shipped model: storm "
        f"{m_storm:.0f} frames/s ({model['storm']['windows_scored']} windows scored: its signals are random), "
        f"clean {m_clean:.0f} frames/s ({model['clean']['windows_scored']} windows scored), ratio "
        f"{m_storm / m_clean:.2f}",
        {"frames": FRAMES, "storm_dtc_events": decoded, "storm_dtc_records_written": written,
         "storm_dtc_events_merged": storm["dtc_events_merged"], "storm_store_transactions": storm["store_transactions"],
         "clean_store_transactions": clean["store_transactions"],
         "model_storm_frames_per_s": m_storm, "model_clean_frames_per_s": m_clean, "model_ratio": m_storm / m_clean,
         "model_storm_windows_scored": model["storm"]["windows_scored"],
         "model_clean_windows_scored": model["clean"]["windows_scored"]},
    )
