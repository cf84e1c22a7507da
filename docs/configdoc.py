"""Regenerate the config key tables of docs/configuration.md (agent) and docs/cloud_sync.md (cloud) from the models.

    python docs/configdoc.py           rewrite the generated blocks in place (the prose around them stays)
    python docs/configdoc.py --check   change nothing; exit 1 with a diff when a committed document is stale

The models (agent/config.py, cloud_sync/config.py) are the one place for every key's default, allowed range and
meaning; tests/test_config_doc.py fails when a committed document differs from what they give.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def documents() -> dict[Path, dict[str, str]]:
    """Each document and the tables of its generated blocks, by block name."""
    from agent.config import AgentConfig
    from cloud_sync.config import CloudConfig
    from harvester_common.configdoc import key_table, section_models

    return {
        REPO / "docs" / "configuration.md": {f"agent.{name}": key_table(m) for name, m in section_models(AgentConfig)},
        REPO / "docs" / "cloud_sync.md": {"cloud_sync": key_table(CloudConfig, sections=True)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    from harvester_common.configdoc import stale, write

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if a document is stale")
    args = p.parse_args(argv)
    status = 0
    for path, tables in documents().items():
        if args.check:
            diff = stale(path, tables)
            if diff:
                sys.stdout.write(diff)
                status = 1
        elif write(path, tables):
            print(f"{path.relative_to(REPO)}: regenerated")
    if status:
        print("the documents above differ from the config models: run `python docs/configdoc.py` and commit them")
    return status


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # this checkout's models, whichever copy of the packages is installed
    sys.exit(main())
