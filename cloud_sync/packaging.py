"""`cloud-sync model keygen` and `cloud-sync model sign`: the fleet engineer's side of signed model packages
(harvester_common/modelpkg.py; docs/models.md, "Signed packages").

keygen writes a new Ed25519 key pair; sign wraps a model and its card into a package signed with the private key,
named and versioned by the model's own contract (read from the ONNX file's metadata without onnx or onnxruntime:
harvester_common/onnxmeta.py). Every failure is one line and exit status 2 (clirun.UserError).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harvester_common.clirun import UserError, read_limited, write_atomically

# The first agent that reads packages: what `sign` asks of a vehicle unless told otherwise.
DEFAULT_MIN_AGENT_VERSION = "0.1.0"


def add_commands(model_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k = model_sub.add_parser(
        "keygen", help="write a new signing key pair (KEY_ID.key, KEY_ID.pub) into a directory",
        description="Write a new Ed25519 key pair into DIR: KEY_ID.key (the private key, PKCS8 PEM, unencrypted, "
        "mode 0600: keep it off vehicles and out of version control) and KEY_ID.pub (the public key: install it "
        "on vehicles and name it in [model] trusted_keys). Never overwrites a file.")
    k.add_argument("--out", required=True, metavar="DIR", help="directory for the two files (created if missing)")
    k.set_defaults(func=cmd_keygen)
    s = model_sub.add_parser(
        "sign", help="package and sign a model with its card",
        description="Write a signed model package: the model, its card and a manifest (name and version from the "
        "model's contract, hashes, sizes, the contract itself, the oldest agent that may run it, the key id), "
        "signed with an Ed25519 private key (cloud-sync model keygen).")
    s.add_argument("model", metavar="MODEL.onnx", help="the ONNX model with its contract in its metadata")
    s.add_argument("--key", required=True, metavar="KEY", help="the private key file (KEY_ID.key)")
    s.add_argument("--out", required=True, metavar="PKG", help="the package file to write (replaced if it exists)")
    s.add_argument("--card", metavar="CARD", help="the model card, JSON (default: NAME.card.json next to the "
                   "model, NAME being the model file's name without .onnx and .int8)")
    s.add_argument("--min-agent-version", default=DEFAULT_MIN_AGENT_VERSION, metavar="V", type=_version,
                   help=f"the oldest agent version that may run the model (default {DEFAULT_MIN_AGENT_VERSION})")
    s.set_defaults(func=cmd_sign)


def _version(text: str) -> str:
    from harvester_common.modelpkg import PackageError, version_tuple

    try:
        version_tuple(text)
    except PackageError:
        raise argparse.ArgumentTypeError(f"not 1 to 4 dot-separated integers: {text!r}") from None
    return text


def default_card(model: Path) -> Path:
    """`models/harvester-anomaly.int8.onnx` → `models/harvester-anomaly.card.json`."""
    stem = model.name
    for suffix in (".onnx", ".int8"):
        stem = stem.removesuffix(suffix)
    return model.with_name(f"{stem}.card.json")


def cmd_keygen(args: argparse.Namespace) -> int:
    from harvester_common.modelpkg import PackageError, generate_keypair

    try:
        key, pub, kid = generate_keypair(Path(args.out))
    except PackageError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{e.filename or args.out}: cannot write the key pair: {e.strerror or e}") from None
    print(f"key {kid}: wrote {key} (private, mode 0600: keep it secret) and {pub} (public: install it on vehicles, "
          "[model] trusted_keys)")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from harvester_common.modelpkg import (
        MAX_PACKAGE_BYTES,
        PackageError,
        build_package,
        check_card,
        key_id,
        load_private_key,
        package_sha256,
    )
    from harvester_common.onnxmeta import read_contract

    model_path = Path(args.model)
    model = read_limited(model_path, "model", MAX_PACKAGE_BYTES)
    try:
        contract = read_contract(model)
    except PackageError as e:
        raise UserError(f"{model_path}: {e}") from None
    card_path = Path(args.card) if args.card else default_card(model_path)
    if not args.card and not card_path.exists():
        raise UserError(f"no card for {model_path}: looked for {card_path} (give --card)")
    card = read_limited(card_path, "card", MAX_PACKAGE_BYTES)
    try:
        check_card(card)
    except PackageError as e:
        raise UserError(f"{card_path}: {e}") from None
    name, version = contract["model"]["name"], contract["model"]["version"]
    try:
        key = load_private_key(Path(args.key))
    except PackageError as e:
        raise UserError(str(e)) from None
    try:
        package = build_package(model, card, key, name=name, version=version, contract=contract,
                                min_agent_version=args.min_agent_version)
    except PackageError as e:
        raise UserError(f"{model_path}: cannot be packaged: {e}") from None
    out = Path(args.out)
    write_atomically(out, package, "package")
    print(f"wrote {out}: {name} {version}, key {key_id(key.public_key())}, package sha256 "
          f"{package_sha256(package)}, {len(package)} bytes")
    return 0
