"""What `harvester-agent run` must not load even where it is installed: the modules only log replay uses.

python-can's package imports every log reader it has (`can/__init__` imports `can.io`, which imports its MF4
reader), and that reader imports asammdf when it is installed (the `mf4` extra: a fleet engineer's replay tool),
which imports pandas: ~90 MB of resident memory and half a second of start for a vehicle's agent that never reads
a log file. Any `import can` does it (cantools imports python-can too), so no import order avoids it.

`keep_out()` marks those modules absent for this process: a None in `sys.modules`, which makes `import` raise
ImportError exactly as for a package that is not installed. python-can then goes without its MF4 reader, as it
does on a vehicle, whose install has no `mf4` extra. Only `run` calls it, first thing: replay and the tests
(one process for many commands) keep their MF4 reader.
"""

from __future__ import annotations

import sys

REPLAY_ONLY = ("asammdf", "pandas")


def keep_out(names: tuple[str, ...] = REPLAY_ONLY) -> list[str]:
    """Make `names` unimportable in this process; returns those already imported (too late to keep out)."""
    late = [n for n in names if sys.modules.get(n) is not None]
    for n in names:
        if n not in sys.modules:
            sys.modules[n] = None  # type: ignore[assignment]  # documented: import then raises ImportError
    return late
