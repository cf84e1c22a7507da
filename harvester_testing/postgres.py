"""A throwaway PostgreSQL server for tests and benchmarks: `initdb` into a temp dir, `postgres` on a free port.

PostgreSQL refuses to run as root, so when we are root the server runs as the `postgres` system user (present
wherever Debian's postgresql package is) and the data directory is handed to it. `unavailable()` says, in one
line, why a server cannot be started here, for a test to skip with.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from harvester_testing.broker import free_port


def _bindir() -> Path | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists():
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _run_as() -> str | None:
    """The user to run the server as, or None for ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return ""
    return "postgres"


def unavailable() -> str | None:
    if _bindir() is None:
        return "PostgreSQL server binaries (initdb, postgres) are not installed: apt-get install postgresql"
    if _run_as() == "":
        return "running as root without a 'postgres' system user to run the server as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (.ci/quickstart test installs it)"
    return None


class TempPostgres:
    def __init__(self, port: int | None = None) -> None:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        self.bindir = _bindir()
        self.user = _run_as()
        self.port = port or free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="harvester-pg-"))
        self.data = self.tmp / "data"
        self.sock = self.tmp / "sock"
        self.sock.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.tmp / "postgres.log"
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chmod(self.tmp, 0o755)
            for p in (self.tmp, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self._as(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                 check=True)

    def _cmd(self, argv: list[str]) -> list[str]:
        assert self.bindir is not None
        full = [str(self.bindir / argv[0]), *argv[1:]]
        return ["runuser", "-u", self.user, "--", *full] if self.user else full

    def _as(self, argv: list[str], check: bool) -> None:
        subprocess.run(self._cmd(argv), check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def new_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name

    def start(self, timeout_s: float = 30.0) -> None:
        import psycopg

        log = open(self.log, "ab")  # noqa: SIM115 - the server writes it for its whole life
        self.proc = subprocess.Popen(
            self._cmd(["postgres", "-D", str(self.data), "-p", str(self.port), "-k", str(self.sock),
                       "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=50", "-c", "shared_buffers=128MB"]),
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown through pg_ctl, which waits for the server to be gone (signalling our child would
        signal `runuser`, which kills the server instead of stopping it)."""
        if self.proc is not None and self.proc.poll() is None:
            self._as(["pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30"], check=False)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.tmp)

    def __enter__(self) -> TempPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
