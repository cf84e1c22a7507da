"""A pseudo-terminal pair standing in for a serial device: write bytes to `master`, open `slave_path` with pyserial."""

from __future__ import annotations

import contextlib
import os
import tty
from pathlib import Path


class PtyPair:
    """Writes never block: when nobody reads the slave and the kernel buffer is full, bytes are dropped and
    counted in `dropped_bytes`, as a UART with no listener loses them."""

    def __init__(self, link: Path | None = None) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line discipline: bytes pass as on a real UART
        os.set_blocking(self.master, False)
        self.dropped_bytes = 0
        self.slave_path = os.ttyname(self.slave)
        self.link = link
        if link is not None:
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(link.name + ".tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.slave_path)
            tmp.replace(link)

    @property
    def path(self) -> str:
        return str(self.link) if self.link is not None else self.slave_path

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                self.dropped_bytes += len(view)
                return
            view = view[n:]

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.link is not None:
            self.link.unlink(missing_ok=True)

    def __enter__(self) -> PtyPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
