"""`cloud-sync serve` in a child process (several make a shared-subscription group), for scale-out tests and
benchmarks: a real process each, so a test can SIGKILL one and a benchmark gets real parallelism."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from harvester_testing.broker import MosquittoBroker


def write_config(path: Path, broker: MosquittoBroker, client_id: str, db_url: str = "", db_path: str = "",
                 group: str = "cloud", commit_max_messages: int = 50) -> Path:
    db = f'url = "{db_url}"' if db_url else f'path = "{db_path}"'
    path.write_text(f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "{client_id}"\n'
                    f'share_group = "{group}"\n[db]\n{db}\n[receiver]\ncommit_max_messages = {commit_max_messages}\n')
    return path


def start_receiver(config: Path, timeout_s: float = 30.0) -> subprocess.Popen[str]:
    """Start one receiver and return once it has subscribed (so the group counts it). Its log is drained in a
    thread so it never blocks on a full pipe."""
    p = subprocess.Popen([sys.executable, "-m", "cloud_sync", "serve", "--config", str(config)],
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    ready = threading.Event()
    lines: list[str] = []

    def drain() -> None:
        assert p.stderr is not None
        for line in p.stderr:
            if len(lines) < 200:
                lines.append(line)
            if "subscribed" in line:
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(timeout_s):
        p.kill()
        raise RuntimeError(f"receiver {config} did not subscribe: {''.join(lines)[-2000:]}")
    return p


def stop_receiver(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
