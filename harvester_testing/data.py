"""Where the real public data lives (../shared/data beside the repo) and how tests reach it."""

from __future__ import annotations

import os
from pathlib import Path

_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_DATA = Path(os.environ.get("HARVESTER_SHARED_DATA", _DEFAULT))


def shared_file(rel: str) -> Path:
    """A file from ../shared/data, or skip the calling test with the name of what is missing."""
    p = SHARED_DATA / rel
    if not p.exists():
        import pytest

        pytest.skip(f"shared data file {p} is absent (tests read real data from ../shared/data)")
    return p
