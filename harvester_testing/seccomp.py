"""Run a command under the seccomp filters systemd would install for a unit, for tests (systemd as PID 1 cannot run
here, the kernel's seccomp can).

    python -m harvester_testing.seccomp --allow-file NAMES [--errno EPERM] [--mdwe] -- COMMAND ARGS...

`--allow-file`: the allowed system calls, one name a line (the unit's SystemCallFilter= expanded by the caller);
every other call fails with `--errno`, as SystemCallErrorNumber= makes it. `--mdwe`: a second filter with the
rules systemd 252 uses for MemoryDenyWriteExecute= (src/shared/seccomp-util.c): mmap with PROT_WRITE and
PROT_EXEC, mprotect and pkey_mprotect with PROT_EXEC, shmat with SHM_EXEC fail with EPERM. Both set no_new_privs
(NoNewPrivileges=), and then the command is exec'd, so the filters hold for it and everything it starts.
Through libseccomp (the library systemd uses), loaded with ctypes.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import mmap
import os
from pathlib import Path

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
SHM_EXEC = 0o100000


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class SeccompError(OSError):
    pass


def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.restype = ctypes.c_int
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def available() -> str | None:
    """None when filters can be loaded here, else why not."""
    try:
        _lib()
    except OSError as e:
        return f"libseccomp not loadable: {e}"
    return None


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise SeccompError(-rc, f"{what}: {os.strerror(-rc)}")


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str, cmps: list[_ArgCmp]) -> bool:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:  # not a system call of this architecture (systemd skips these too)
        return False
    arr = (_ArgCmp * max(1, len(cmps)))(*cmps)
    _check(lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr), f"rule for {name}")
    return True


def load_allow_list(names: list[str], errno_code: int = errno.EPERM) -> int:
    """Allow exactly `names`; everything else fails with `errno_code`. Returns how many rules were added."""
    lib = _lib()
    ctx = lib.seccomp_init(_act_errno(errno_code))
    if not ctx:
        raise SeccompError(errno.EINVAL, "seccomp_init failed")
    try:
        added = sum(_rule(lib, ctx, SCMP_ACT_ALLOW, n, []) for n in sorted(set(names)))
        _check(lib.seccomp_load(ctx), "seccomp_load (allow list)")
    finally:
        lib.seccomp_release(ctx)
    return added


def load_mdwe() -> None:
    """systemd 252's MemoryDenyWriteExecute= filter."""
    lib = _lib()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompError(errno.EINVAL, "seccomp_init failed")
    wx = mmap.PROT_WRITE | mmap.PROT_EXEC
    deny = _act_errno(errno.EPERM)
    try:
        for name in ("mmap", "mmap2"):
            _rule(lib, ctx, deny, name, [_ArgCmp(2, SCMP_CMP_MASKED_EQ, wx, wx)])
        for name in ("mprotect", "pkey_mprotect"):
            _rule(lib, ctx, deny, name, [_ArgCmp(2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC)])
        _rule(lib, ctx, deny, "shmat", [_ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)])
        _check(lib.seccomp_load(ctx), "seccomp_load (MemoryDenyWriteExecute)")
    finally:
        lib.seccomp_release(ctx)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m harvester_testing.seccomp")
    p.add_argument("--allow-file", type=Path, default=None)
    p.add_argument("--errno", default="EPERM", help="errno name for calls outside the allow list")
    p.add_argument("--mdwe", action="store_true")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("no command")
    if args.mdwe:
        load_mdwe()
    if args.allow_file is not None:
        names = [ln.strip() for ln in args.allow_file.read_text().splitlines() if ln.strip()]
        load_allow_list(names, getattr(errno, args.errno))
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
