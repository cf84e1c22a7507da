"""The vehicle's checks of a model package, in the design's order (docs/model_updates.md, "The package"):

1. size and structure, key id trusted, signature, model and card hashes (`modelpkg.verify_package`);
2. `agent_too_old`: the manifest's `min_agent_version` is later than this agent's version;
3. `model_unloadable`: onnxruntime cannot load the model bytes;
4. `contract_mismatch`: the contract embedded in the model (its `harvester.contract` metadata) is not the
   manifest's `contract`, JSON value for JSON value (an integer is not a float), or names another model name or
   version than the manifest;
5. `incompatible_contract`: a contract this agent cannot read (agent/contract.py refuses it) ...
   `model_unloadable` again: ... or a model that does not take what its contract says (input, output, width) ...
   `incompatible_contract`: ... or features on signals this vehicle does not decode (named).

`check_package` raises modelpkg.PackageError with the code and one line of text, never anything else for what
the package holds; what passes comes back with a Scorer ready to score (`Verified`). `harvester-agent model verify`
runs exactly this (agent/update/cli.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.config import ModelConfig
from agent.contract import CONTRACT_KEY, ContractError, parse_contract
from agent.scoring import ModelLoadError, Scorer, open_session
from harvester_common import wire
from harvester_common.modelpkg import Package, PackageError, PublicKey, verify_package, version_at_least

_MODEL = ModelConfig()


@dataclass(frozen=True)
class Verified:
    package: Package
    scorer: Scorer


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def agent_version(version: str = __version__) -> str:
    """The dotted-integer part of an agent version ("0.2.0.dev1" → "0.2.0"), compared with min_agent_version."""
    m = re.match(r"[0-9]{1,9}(\.[0-9]{1,9}){0,3}", version)
    return m.group(0) if m else "0"


def check_package(data: bytes, trusted: Mapping[str, PublicKey], signals: set[str],
                  threads: int = _MODEL.threads, batch: int = _MODEL.batch_windows, *,
                  version: str = __version__) -> Verified:
    """Every check a vehicle makes before a package's model may score, in order (the module's docstring).
    `trusted`: modelpkg.load_public_keys of `[model] trusted_keys`; `signals`: what this vehicle's decoders
    produce; `version`: this agent's (a parameter for tests)."""
    pkg = verify_package(data, trusted)
    m = pkg.manifest
    if not version_at_least(agent_version(version), m.min_agent_version):
        raise PackageError("agent_too_old", f"{m.name} {m.version} needs agent {m.min_agent_version} or later; "
                                            f"this is {version}")
    try:
        session = open_session(pkg.model, threads)
    except ModelLoadError as e:
        raise PackageError("model_unloadable", str(e)) from None
    meta = session.get_modelmeta().custom_metadata_map
    raw = meta.get(CONTRACT_KEY)
    if raw is None:
        raise PackageError("contract_mismatch", f"the model has no {CONTRACT_KEY!r} metadata; the manifest has a "
                                                "contract")
    try:
        embedded = wire.loads_json(raw, "the model's contract")
    except wire.WireError as e:
        raise PackageError("contract_mismatch", f"{e}; the manifest's contract is JSON") from None
    if _canonical(embedded) != _canonical(m.contract):
        raise PackageError("contract_mismatch", "the contract embedded in the model is not the manifest's")
    named = m.contract.get("model")
    if not isinstance(named, dict) or (named.get("name"), named.get("version")) != (m.name, m.version):
        raise PackageError("contract_mismatch", f"the manifest names {m.name} {m.version}, the model's contract "
                                                "another model.name or model.version")
    try:
        contract = parse_contract(meta)
    except ContractError as e:
        raise PackageError("incompatible_contract", f"this agent cannot use the contract: {e}") from None
    try:
        scorer = Scorer(session, contract, None, batch)
    except ContractError as e:
        raise PackageError("model_unloadable", f"the model does not take what its contract says: {e}") from None
    try:
        scorer.check_signals(signals)
    except ContractError as e:
        raise PackageError("incompatible_contract", str(e)) from None
    return Verified(pkg, scorer)
