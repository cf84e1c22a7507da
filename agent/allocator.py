"""Which memory allocator this process runs on, read from what the loader mapped (/proc/self/maps), and whether the
one the environment asked for (LD_PRELOAD) is it.

The systemd unit preloads jemalloc (docs/deploy.md, "Memory"): under glibc's malloc the agent's resident memory
kept growing for its first hour, by fragmentation. Where the package is missing the loader prints one line to the
journal and the agent carries on with glibc's malloc; this says so in the agent's own log and in its status
(`allocator`), so a fleet engineer sees which vehicles lack it without a shell on each.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Library file name -> the allocator's name, in the order they are looked for.
KNOWN = (("libjemalloc", "jemalloc"), ("libmimalloc", "mimalloc"), ("libtcmalloc", "tcmalloc"))
GLIBC = "glibc malloc"
_LIB = re.compile(r"(lib[a-z]+)\S*\.so")


def running(maps: str | None = None) -> str:
    """The allocator mapped into this process (`maps`: the text of /proc/PID/maps; default this process's):
    a preloaded one by name, else glibc's malloc; "unknown" where there is no /proc."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "unknown"
    libs = {m.group(1) for m in _LIB.finditer(maps)}
    return next((name for lib, name in KNOWN if lib in libs), GLIBC)


def asked(preload: str | None = None) -> str | None:
    """The allocator LD_PRELOAD names (`preload`: its value; default this process's environment), or None."""
    preload = os.environ.get("LD_PRELOAD", "") if preload is None else preload
    for word in re.split(r"[\s:]+", preload):
        base = word.rsplit("/", 1)[-1]
        for lib, name in KNOWN:
            if base.startswith(lib):
                return name
    return None


def problem(run: str, want: str | None) -> str | None:
    """What to tell the operator when the environment asked for an allocator the process does not run on."""
    if want is None or want == run:
        return None
    hint = " (install Debian's libjemalloc2)" if want == "jemalloc" else ""
    return f"LD_PRELOAD asks for {want} but this process runs on {run}{hint}; memory may grow by fragmentation"
