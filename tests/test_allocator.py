"""Which allocator the agent runs on (agent/allocator.py): read from the process's own mappings, in a real child
process with and without jemalloc preloaded as the systemd unit does, and said when what the environment asked for
is missing."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from agent import allocator
from tests.vehicle import unit_environment

JEMALLOC = "libjemalloc.so.2"
HAVE_JEMALLOC = bool(glob.glob(f"/usr/lib/*/{JEMALLOC}") or glob.glob(f"/usr/lib/{JEMALLOC}"))
needs_jemalloc = pytest.mark.skipif(not HAVE_JEMALLOC, reason=f"{JEMALLOC} is not installed (apt-get install "
                                    "libjemalloc2; the test command installs it)")
PROBE = "from agent import allocator as a; print(a.running()); print(a.problem(a.running(), a.asked()))"


def child(preload: str | None) -> tuple[str, str, str]:
    """(allocator, problem, stderr) as a fresh interpreter sees itself with LD_PRELOAD=`preload`."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    if preload is not None:
        env["LD_PRELOAD"] = preload
    p = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    run, problem = p.stdout.splitlines()
    return run, problem, p.stderr


def test_the_unit_preloads_jemalloc_by_name_with_glibcs_setting_beside_it() -> None:
    env = unit_environment()
    assert env["LD_PRELOAD"] == JEMALLOC  # a bare name: the loader finds it on any architecture's library path
    assert allocator.asked(env["LD_PRELOAD"]) == "jemalloc"
    assert "narenas:1" in env["MALLOC_CONF"] and env["MALLOC_ARENA_MAX"] == "1"


def test_without_preload_it_is_glibcs_malloc_and_nothing_to_say() -> None:
    assert child(None)[:2] == (allocator.GLIBC, "None")


@needs_jemalloc
def test_with_jemalloc_preloaded_as_the_unit_does_it_is_jemalloc() -> None:
    assert child(JEMALLOC)[:2] == ("jemalloc", "None")


def test_a_preload_the_loader_cannot_find_is_said() -> None:
    run, problem, err = child("libjemalloc.so.99")
    assert run == allocator.GLIBC and "cannot be preloaded" in err  # the loader's own line, then it carries on
    assert problem == ("LD_PRELOAD asks for jemalloc but this process runs on glibc malloc (install Debian's "
                       "libjemalloc2); memory may grow by fragmentation")


@pytest.mark.parametrize(("preload", "want"), [
    ("", None), ("libfoo.so", None), (JEMALLOC, "jemalloc"), (f"/usr/lib/aarch64-linux-gnu/{JEMALLOC}", "jemalloc"),
    (f"libfoo.so:{JEMALLOC}", "jemalloc"), ("libfoo.so libmimalloc.so.2", "mimalloc"), ("libtcmalloc_minimal.so.4",
                                                                                        "tcmalloc"),
])
def test_what_ld_preload_asks_for(preload: str, want: str | None) -> None:
    assert allocator.asked(preload) == want


def test_running_reads_the_mappings() -> None:
    glibc = "7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    assert allocator.running(glibc) == allocator.GLIBC
    assert allocator.running(glibc + "7f20-7f30 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n") \
        == "jemalloc"
    assert allocator.problem("jemalloc", "jemalloc") is None and allocator.problem(allocator.GLIBC, None) is None
