"""`harvester-agent model verify PKG --config FILE [--json]`: a package checked exactly as this vehicle would
check it (agent/update/verify.py), with the config's trusted keys and the signals its decoders produce.

Exit status 0: the vehicle would accept the package; 1: it would refuse it (the reason code and why); 2: the
command cannot judge (a config, key file or DBC that cannot be used, a package file that cannot be read).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, ConfigError, load_config
from harvester_common.clirun import UserError
from harvester_common.modelpkg import MAX_PACKAGE_BYTES, PackageError, load_public_keys, package_sha256, parse_package

EXIT_REFUSED = 1

# What the running agent's decoders produce for a config: handed in by agent/cli.py, so that this package does not
# import agent.service (which will run it).
SignalsOf = Callable[[AgentConfig], set[str]]


def add_commands(model_sub: argparse._SubParsersAction[argparse.ArgumentParser], signals_of: SignalsOf) -> None:
    v = model_sub.add_parser(
        "verify", help="check a model package as this vehicle would, without installing it",
        description="Check a signed model package (cloud-sync model sign) as the vehicle would before running its "
        "model: structure, a trusted key ([model] trusted_keys), signature, hashes, agent version, the model "
        "loads, its contract is the manifest's and needs only signals this config decodes. Exit 0: accepted; 1: "
        "refused, with the reason code; 2: the config, a key file or the package file cannot be used.")
    v.add_argument("package", metavar="PKG", help="the package file")
    v.add_argument("--config", required=True, help="agent TOML config (docs/configuration.md)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=lambda args: cmd_verify(args, signals_of))


def _read_package(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            # One byte past the cap is enough for the parser to refuse it as too_large, without reading it all.
            return f.read(MAX_PACKAGE_BYTES + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot read the package: {e.strerror or e}") from None


def cmd_verify(args: argparse.Namespace, signals_of: SignalsOf) -> int:
    from agent.update.verify import check_package

    cfg = load_config(args.config)
    try:
        trusted = load_public_keys(cfg.model.trusted_keys)
    except PackageError as e:
        raise ConfigError(f"{args.config}: model.trusted_keys: {e}") from None
    signals = signals_of(cfg)
    data = _read_package(Path(args.package))
    out: dict[str, Any] = {"ok": False, "reason": "", "detail": "", "name": None, "version": None,
                           "package_sha256": package_sha256(data), "key_id": None, "min_agent_version": None,
                           "size": len(data)}
    try:
        # Structure only, for the report's fields: a package refused further on still says what it claims to be.
        m = parse_package(data).manifest
        out.update(name=m.name, version=m.version, key_id=m.key_id, min_agent_version=m.min_agent_version)
    except PackageError:
        pass  # check_package refuses it with the same code and says why
    try:
        verified = check_package(data, trusted, signals, cfg.model.threads, cfg.model.batch_windows)
    except PackageError as e:
        out.update(reason=e.code, detail=e.detail)
    else:
        c = verified.scorer.contract
        out.update(ok=True, detail=f"{len(c.features)} features from {len(c.signals)} signals this config decodes")
    if args.json:
        print(json.dumps(out))
    elif out["ok"]:
        print(f"ok: {out['name']} {out['version']} (package {out['package_sha256']}, key {out['key_id']})")
    else:
        print(f"refused ({out['reason']}): {out['detail']}")
    return 0 if out["ok"] else EXIT_REFUSED
