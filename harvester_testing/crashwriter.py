"""A child process for crash tests: writes to a Store as fast as it can and prints each sequence range on stdout
only after the write returned (i.e. was committed). Run: python -m harvester_testing.crashwriter PATH."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np

from agent.store import Store
from harvester_common import wire


def main() -> None:
    store = Store(Path(sys.argv[1]), max_bytes=int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 30)
    rng = random.Random()
    t = 0
    while True:
        if rng.random() < 0.1:
            seqs = store.append_records([("alert", {"ts": float(t), "alert_id": str(t)})])
            lo, hi = seqs[0], seqs[-1]
        else:
            n = rng.randint(1, 3000)
            cols = wire.SampleColumns([("S", "", "")], np.zeros(n, np.uint16),
                                      np.arange(t, t + n, dtype=np.int64), np.full(n, float(t)))
            lo, hi = store.append_samples(cols)
        t += 1
        print(lo, hi, flush=True)


if __name__ == "__main__":
    main()
