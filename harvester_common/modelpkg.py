"""Signed model packages: a model, its card and a manifest in one file under one Ed25519 signature, shared by the
cloud (`cloud-sync model sign`, publish) and the vehicle (`agent/update/verify.py`). docs/model_updates.md ("The
package") is the design; docs/protocol.md ("Model package") the reference.

Format 1, integers little-endian:

    offset   size   field
    0        4      magic b"HVMP"
    4        1      format version (1)
    5        4      u32le manifest length M (1 .. MAX_MANIFEST_BYTES)
    9        M      manifest: a UTF-8 JSON object (below)
    9+M      S      the ONNX model, S = manifest.model_size (at least 1)
    9+M+S    C      the card, a UTF-8 JSON object, C = manifest.card_size
    end-64   64     Ed25519 signature over every byte before it

A package is exactly 9 + M + S + C + 64 bytes, and at most MAX_PACKAGE_BYTES. Its identity on the wire is the
SHA-256 of the whole file (`package_sha256`).

Manifest: exactly these keys, in this order when written:
  format             1 (the header's format version)
  name, version      the model's name and version: non-empty text of at most 256 characters without control
                     characters (wire.valid_label)
  sha256             SHA-256 of the model bytes, 64 lowercase hex digits
  card_sha256        SHA-256 of the card bytes, the same
  model_size         bytes of the model (>= 1)
  card_size          bytes of the card (>= 0)
  contract           a JSON object: the model's `harvester.contract` metadata exactly (the vehicle compares them)
  min_agent_version  the oldest agent that may run the model: 1 to 4 dot-separated integers ("0.1.0")
  created            when it was built, Unix time (a number, 0 .. MAX_CREATED)
  key_id             the signing key's id (`key_id`): 16 lowercase hex digits
Manifest JSON follows wire.loads_json (no NaN, integers in signed 64 bits, nesting at most wire.MAX_JSON_DEPTH).

A key id is the first 16 hex digits of the SHA-256 of the raw 32-byte Ed25519 public key. Readers compute it from
the public keys they trust (`load_public_keys`), never from a file name: keys rotate by adding a file.

`parse_package` checks structure only; `verify_package` then that the key id is trusted, the signature, and the
model and card hashes, in that order. The card's content is the signer's: `build_package` refuses a card that is
not a UTF-8 JSON object, readers take it as the signed bytes it is.

Everything refused raises `PackageError`, never anything else, whatever the bytes (tests/test_modelpkg.py fuzzes
it), with `.code` one of REFUSALS and a one-line message:
  truncated        the file ends before its header, manifest, model, card or signature does
  bad_magic        not a model package (the first bytes are not b"HVMP")
  bad_format       a format version this code does not read
  bad_manifest     manifest length 0; a manifest that is not a UTF-8 JSON object with exactly the keys and types
                   above; a file longer than its manifest describes; at build: a card that is not a JSON object
  too_large        a manifest past MAX_MANIFEST_BYTES, or a file (as read, or as its manifest describes it) past
                   MAX_PACKAGE_BYTES
  unknown_key      signed by a key that is not trusted here (or no key is trusted)
  bad_signature    the signature does not verify with the trusted key of that id: any byte changed after signing
  hash_mismatch    signed, but the model or card bytes do not hash to what the manifest says
  agent_too_old, model_unloadable, contract_mismatch, incompatible_contract: the vehicle's own checks
                   (agent/update/verify.py), after these
Two more codes come from the key and model readers, never from a package: `bad_key_file` (a key file that cannot
be read or is not an Ed25519 key of the expected kind; the message names the file) and `bad_model`
(harvester_common/onnxmeta.py: bytes that are not an ONNX model's protobuf).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from harvester_common import wire

# `cryptography` (~7 MB resident with OpenSSL's bindings) is imported where a signature is made or checked, not
# here: a vehicle's agent loads its trusted keys at every start but checks a signature only when a package comes
# (docs/model_updates.md, "Memory"). The canonical public key file is read without it (`_ed25519_spki_pem`).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MAGIC = b"HVMP"
FORMAT = 1
HEADER_BYTES = 9
SIGNATURE_BYTES = 64
MAX_PACKAGE_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_KEY_FILE_BYTES = 64 * 1024  # a PEM Ed25519 key is ~120 bytes: anything this large is not one
MAX_CREATED = 1e11  # Unix time of the year 5138: a bound, not a date check
MAX_MESSAGE_CHARS = 500

# The design's reason codes (docs/model_updates.md), in verification order; the last four are the vehicle's.
REFUSALS = ("truncated", "bad_magic", "bad_format", "bad_manifest", "too_large", "unknown_key", "bad_signature",
            "hash_mismatch", "agent_too_old", "model_unloadable", "contract_mismatch", "incompatible_contract")
TOOL_CODES = ("bad_key_file", "bad_model")

FIELDS = ("format", "name", "version", "sha256", "card_sha256", "model_size", "card_size", "contract",
          "min_agent_version", "created", "key_id")

_HEAD = struct.Struct("<4sBI")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_VERSION = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9}){0,3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _one_line(text: str) -> str:
    """Messages quote hostile text (JSON errors, key names, file names): one line, bounded."""
    text = _CONTROL.sub("?", text)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


class PackageError(ValueError):
    """A package (or key, or model file) refused; `.code` says which check (REFUSALS, TOOL_CODES), the text why."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.detail = _one_line(message)
        super().__init__(self.detail)


@dataclass(frozen=True)
class Manifest:
    format: int
    name: str
    version: str
    sha256: str
    card_sha256: str
    model_size: int
    card_size: int
    contract: dict[str, Any]
    min_agent_version: str
    created: float
    key_id: str

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS}


@dataclass(frozen=True)
class Package:
    manifest: Manifest
    model: bytes
    card: bytes
    package_sha256: str


def package_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PublicKey(Protocol):
    """What a trusted key is to this module: cryptography's Ed25519PublicKey, or a `RawEd25519PublicKey` read
    without it."""

    def public_bytes_raw(self) -> bytes: ...

    def verify(self, signature: bytes, data: bytes) -> None: ...


class RawEd25519PublicKey:
    """An Ed25519 public key as its 32 raw bytes; `verify` imports cryptography on first use and raises what
    cryptography's key raises (InvalidSignature)."""

    __slots__ = ("_key", "_raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
        self._raw = bytes(raw)
        self._key: PublicKey | None = None

    def public_bytes_raw(self) -> bytes:
        return self._raw

    def verify(self, signature: bytes, data: bytes) -> None:
        if self._key is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            self._key = Ed25519PublicKey.from_public_bytes(self._raw)
        self._key.verify(signature, data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawEd25519PublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"RawEd25519PublicKey(key_id={key_id(self)})"


def key_id(public_key: PublicKey) -> str:
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:16]


def version_tuple(text: str) -> tuple[int, ...]:
    """`"0.1.0"` → (0, 1, 0). PackageError (bad_manifest) unless 1 to 4 dot-separated integers."""
    if not isinstance(text, str) or not _VERSION.fullmatch(text):
        raise PackageError("bad_manifest", f"version {str(text)[:40]!r} is not 1 to 4 dot-separated integers")
    return tuple(int(p) for p in text.split("."))


def version_at_least(have: str, need: str) -> bool:
    """Whether version `have` is `need` or later; missing trailing parts count as 0 ("1.2" == "1.2.0")."""
    a, b = version_tuple(have), version_tuple(need)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def _is_int(v: object, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _label(d: dict[str, Any], key: str) -> str:
    v = d[key]
    if not isinstance(v, str) or not v or not wire.valid_label(v):
        raise PackageError("bad_manifest", f"manifest {key} must be non-empty text of at most 256 characters "
                                           "without control characters")
    return v


def _manifest_from(d: Any) -> Manifest:
    """A decoded manifest, checked field by field; PackageError(bad_manifest) with the first thing wrong."""
    if not isinstance(d, dict):
        raise PackageError("bad_manifest", "manifest is not a JSON object")
    missing = [f for f in FIELDS if f not in d]
    if missing:
        raise PackageError("bad_manifest", f"manifest lacks {', '.join(missing)}")
    extra = [str(k) for k in d if k not in FIELDS]
    if extra:
        raise PackageError("bad_manifest", f"manifest has unknown keys: {', '.join(repr(k[:40]) for k in extra[:5])}")
    if not _is_int(d["format"], FORMAT, FORMAT):
        raise PackageError("bad_manifest", f"manifest format must be {FORMAT}, the header's")
    name, version = _label(d, "name"), _label(d, "version")
    for key in ("sha256", "card_sha256"):
        if not isinstance(d[key], str) or not _SHA256.fullmatch(d[key]):
            raise PackageError("bad_manifest", f"manifest {key} must be 64 lowercase hex digits")
    # Upper bounds are the package's (too_large, once the sizes are added up); here only what no package can hold.
    if not _is_int(d["model_size"], 1, wire.INT64_MAX):
        raise PackageError("bad_manifest", "manifest model_size must be a positive integer")
    if not _is_int(d["card_size"], 0, wire.INT64_MAX):
        raise PackageError("bad_manifest", "manifest card_size must be an integer >= 0")
    if not isinstance(d["contract"], dict):
        raise PackageError("bad_manifest", "manifest contract must be a JSON object")
    mav = d["min_agent_version"]
    if not isinstance(mav, str) or not _VERSION.fullmatch(mav):
        raise PackageError("bad_manifest", "manifest min_agent_version must be 1 to 4 dot-separated integers")
    created = d["created"]
    if (not isinstance(created, int | float) or isinstance(created, bool) or not math.isfinite(created)
            or not 0 <= created <= MAX_CREATED):
        raise PackageError("bad_manifest", f"manifest created must be a Unix time in 0 .. {MAX_CREATED:.0f}")
    if not isinstance(d["key_id"], str) or not _KEY_ID.fullmatch(d["key_id"]):
        raise PackageError("bad_manifest", "manifest key_id must be 16 lowercase hex digits")
    return Manifest(FORMAT, name, version, d["sha256"], d["card_sha256"], d["model_size"], d["card_size"],
                    d["contract"], mav, float(created), d["key_id"])


def _json_object(raw: bytes, what: str) -> Any:
    try:
        # Decoded first: json.loads of bytes would also take UTF-16 and UTF-32, which the format does not.
        return wire.loads_json(raw.decode("utf-8"), what)
    except UnicodeDecodeError as e:
        raise PackageError("bad_manifest", f"{what} is not UTF-8: {e.reason} at byte {e.start}") from None
    except wire.WireError as e:
        raise PackageError("bad_manifest", str(e)) from None


def parse_package(data: bytes) -> Package:
    """The parts of a package, its structure checked (no trust: see `verify_package`). PackageError otherwise."""
    n = len(data)
    if n > MAX_PACKAGE_BYTES:
        raise PackageError("too_large", f"{n} bytes, more than the {MAX_PACKAGE_BYTES} a package may have")
    k = min(n, len(MAGIC))
    if bytes(data[:k]) != MAGIC[:k]:
        raise PackageError("bad_magic", "not a model package (it does not start with HVMP)")
    if n < HEADER_BYTES:
        raise PackageError("truncated", f"{n} bytes end inside the {HEADER_BYTES}-byte header")
    _, fmt, mlen = _HEAD.unpack_from(data)
    if fmt != FORMAT:
        raise PackageError("bad_format", f"package format {fmt}; this code reads format {FORMAT}")
    if mlen == 0:
        raise PackageError("bad_manifest", "manifest length 0")
    if mlen > MAX_MANIFEST_BYTES:
        raise PackageError("too_large", f"manifest of {mlen} bytes, more than {MAX_MANIFEST_BYTES}")
    if n < HEADER_BYTES + mlen:
        raise PackageError("truncated", f"{n} bytes end inside the {mlen}-byte manifest")
    m = _manifest_from(_json_object(bytes(data[HEADER_BYTES : HEADER_BYTES + mlen]), "manifest"))
    model_at = HEADER_BYTES + mlen
    card_at = model_at + m.model_size
    sig_at = card_at + m.card_size
    expected = sig_at + SIGNATURE_BYTES
    if expected > MAX_PACKAGE_BYTES:
        raise PackageError("too_large", f"the manifest describes a package of {expected} bytes, more than "
                                        f"{MAX_PACKAGE_BYTES}")
    if n < expected:
        part = "model" if n < card_at else "card" if n < sig_at else "signature"
        raise PackageError("truncated", f"{n} bytes end inside the {part} (the manifest describes {expected})")
    if n > expected:
        raise PackageError("bad_manifest", f"{n} bytes, {n - expected} past the end the manifest describes")
    return Package(m, bytes(data[model_at:card_at]), bytes(data[card_at:sig_at]), package_sha256(data))


def verify_package(data: bytes, trusted: Mapping[str, PublicKey]) -> Package:
    """A package whose structure, key, signature and hashes check out, in that order; PackageError otherwise.
    `trusted` maps key ids to public keys (`load_public_keys`)."""
    pkg = parse_package(data)
    kid = pkg.manifest.key_id
    key = trusted.get(kid)
    if key is None:
        if not trusted:
            raise PackageError("unknown_key", f"signed with key {kid}, and no key is trusted here (no package is "
                                              "accepted)")
        raise PackageError("unknown_key", f"signed with key {kid}, which is not trusted here (trusted: "
                                          f"{', '.join(sorted(trusted)[:8])}{', ...' if len(trusted) > 8 else ''})")
    from cryptography.exceptions import InvalidSignature

    body = memoryview(data)[: len(data) - SIGNATURE_BYTES]
    try:
        key.verify(bytes(data[len(data) - SIGNATURE_BYTES :]), body)  # type: ignore[arg-type]
    except InvalidSignature:
        raise PackageError("bad_signature", f"the signature does not verify with key {kid}: the package was "
                                            "changed after signing, or signed with another key") from None
    for what, part, want in (("model", pkg.model, pkg.manifest.sha256), ("card", pkg.card, pkg.manifest.card_sha256)):
        got = hashlib.sha256(part).hexdigest()
        if got != want:
            raise PackageError("hash_mismatch", f"the {what} hashes to {got[:16]}..., the manifest says "
                                                f"{want[:16]}...")
    return pkg


def check_card(card: bytes) -> None:
    """PackageError(bad_manifest) unless `card` is a UTF-8 JSON object (what `build_package` packs)."""
    if not isinstance(_json_object(bytes(card), "the card"), dict):
        raise PackageError("bad_manifest", "the card is not a JSON object")


def build_package(model: bytes, card: bytes, private_key: Ed25519PrivateKey, *, name: str, version: str,
                  contract: dict[str, Any], min_agent_version: str, created: float | None = None) -> bytes:
    """A signed package of `model` and `card`. PackageError (with the code a reader would refuse it with) for
    anything a reader would refuse: a package this returns always parses and verifies with the key's public key."""
    check_card(card)
    d = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "sha256": hashlib.sha256(model).hexdigest(),
        "card_sha256": hashlib.sha256(card).hexdigest(),
        "model_size": len(model),
        "card_size": len(card),
        "contract": contract,
        "min_agent_version": min_agent_version,
        "created": time.time() if created is None else created,
        "key_id": key_id(private_key.public_key()),
    }
    manifest = _manifest_from(d)
    try:
        raw = json.dumps(manifest.to_dict(), separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError) as e:  # NaN, a value JSON cannot hold, a lone surrogate
        raise PackageError("bad_manifest", f"the contract cannot be written as JSON: {e}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise PackageError("too_large", f"manifest of {len(raw)} bytes, more than {MAX_MANIFEST_BYTES}")
    total = HEADER_BYTES + len(raw) + len(model) + len(card) + SIGNATURE_BYTES
    if total > MAX_PACKAGE_BYTES:
        raise PackageError("too_large", f"a package of {total} bytes, more than {MAX_PACKAGE_BYTES}")
    body = _HEAD.pack(MAGIC, FORMAT, len(raw)) + raw + bytes(model) + bytes(card)
    out = body + private_key.sign(body)
    # The reader's own checks (depth, integer range of the contract...): what a reader refuses is never built.
    verify_package(out, {manifest.key_id: private_key.public_key()})
    return out


# --- Keys: PEM files. A private key is PKCS8 (unencrypted: it lives on the engineer's machine or in a secret
# store, never on a vehicle); a public key is SubjectPublicKeyInfo. ---


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise PackageError("bad_key_file", f"{path}: cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise PackageError("bad_key_file", f"{path}: more than {MAX_KEY_FILE_BYTES} bytes: not a key file")
    return data


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # the key is encrypted (or a password was expected)
        raise PackageError("bad_key_file", f"{path}: an encrypted private key; give an unencrypted PKCS8 PEM "
                                           "Ed25519 key (cloud-sync model keygen writes one)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PackageError("bad_key_file", f"{path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageError("bad_key_file", f"{path}: a {type(key).__name__.lstrip('_')}, not an Ed25519 private key")
    return key


# An Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (32 bytes) }.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_PUBLIC = re.compile(
    rb"\A\s*-----BEGIN PUBLIC KEY-----\r?\n([A-Za-z0-9+/=\r\n]{1,200})-----END PUBLIC KEY-----\s*\Z")


def _ed25519_spki_pem(data: bytes) -> bytes | None:
    """The 32 raw bytes of a PEM file holding exactly one Ed25519 SubjectPublicKeyInfo, as `cloud-sync model keygen`
    and OpenSSL write it; None for anything else (which `load_public_key` hands to cryptography to judge)."""
    import base64
    import binascii

    m = _PEM_PUBLIC.match(data)
    if m is None:
        return None
    try:
        der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        return None
    return der[len(_ED25519_SPKI_PREFIX):]


def load_public_key(path: Path) -> PublicKey:
    """The Ed25519 public key in a PEM file (SubjectPublicKeyInfo). The canonical form is read without importing
    cryptography; anything else (another algorithm, another layout) goes to cryptography's reader, which accepts
    or refuses it with the reason."""
    data = _read_key_file(path)
    raw = _ed25519_spki_pem(data)
    if raw is not None:
        return RawEd25519PublicKey(raw)
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise PackageError("bad_key_file", f"{path}: not a PEM public key (SubjectPublicKeyInfo)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError("bad_key_file", f"{path}: a {type(key).__name__.lstrip('_')}, not an Ed25519 public key")
    return key


def load_public_keys(paths: Iterable[Path]) -> dict[str, PublicKey]:
    """The trusted keys by id. Each path is a public key file, or a directory whose every `*.pub` is one (not
    searched further down; none at all is no key). PackageError(bad_key_file) naming the first file that is missing
    or not an Ed25519 public key: a vehicle told to trust a key it cannot read says so rather than trust fewer."""
    out: dict[str, PublicKey] = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.glob("*.pub") if not f.is_dir())
        elif p.exists():
            files = [p]
        else:
            raise PackageError("bad_key_file", f"{p}: no such key file or directory")
        for f in files:
            key = load_public_key(f)
            out[key_id(key)] = key
    return out


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (a key is never readable by others, not even for a moment) and
    never over an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keypair(out_dir: Path) -> tuple[Path, Path, str]:
    """A new signing key pair in `out_dir` (created, mode 0700, if missing): `<key_id>.key`, the private key,
    mode 0600, and `<key_id>.pub`, the public key to install on vehicles. Returns (private, public, key id).
    PackageError(bad_key_file) if either file exists already (never overwritten); OSError for I/O failures."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    kid = key_id(public)
    key_path, pub_path = out_dir / f"{kid}.key", out_dir / f"{kid}.pub"
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    pub_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    written: list[Path] = []
    try:
        for path, data, mode in ((key_path, key_pem, 0o600), (pub_path, pub_pem, 0o644)):
            _write_new(path, data, mode)
            written.append(path)
    except FileExistsError as e:
        raise PackageError("bad_key_file", f"{e.filename}: exists already; a key file is never overwritten") from None
    finally:
        if len(written) == 1:
            written[0].unlink()  # half a pair helps no one
    return key_path, pub_path, kid
