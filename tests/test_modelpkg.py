"""Signed model packages (harvester_common/modelpkg.py), the ONNX metadata reader (harvester_common/onnxmeta.py) and
the engineer's `cloud-sync model keygen` / `model sign`: the shipped model and card, real Ed25519 keys, packages
assembled by hand from the documented format, every byte tampered with, hostile manifests, fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from agent.contract import CONTRACT_KEY, FeatureSpec
from harvester_common import modelpkg as mp
from harvester_common import onnxmeta
from harvester_testing.onnx_models import linear_softmax_model, make_contract

REPO = Path(__file__).resolve().parents[1]
MODEL_PATH = REPO / "models" / "harvester-anomaly.int8.onnx"
CARD_PATH = REPO / "models" / "harvester-anomaly.card.json"
MODEL = MODEL_PATH.read_bytes()
CARD = CARD_PATH.read_bytes()
CONTRACT = onnxmeta.read_contract(MODEL)
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
TRUSTED = {mp.key_id(KEY.public_key()): KEY.public_key()}


def build(model: bytes = MODEL, card: bytes = CARD, key: Ed25519PrivateKey = KEY, **over: Any) -> bytes:
    kw: dict[str, Any] = {"name": "harvester-anomaly", "version": "2.0.0", "contract": CONTRACT,
                          "min_agent_version": "0.1.0", "created": 1764000000.0}
    kw.update(over)
    return mp.build_package(model, card, key, **kw)


PKG = build()


def manifest_dict(model: bytes = MODEL, card: bytes = CARD, key: Ed25519PrivateKey = KEY, **over: Any
                  ) -> dict[str, Any]:
    d: dict[str, Any] = {
        "format": 1, "name": "harvester-anomaly", "version": "2.0.0",
        "sha256": hashlib.sha256(model).hexdigest(), "card_sha256": hashlib.sha256(card).hexdigest(),
        "model_size": len(model), "card_size": len(card), "contract": CONTRACT, "min_agent_version": "0.1.0",
        "created": 1764000000.0, "key_id": mp.key_id(key.public_key()),
    }
    d.update(over)
    return d


def assemble(manifest: dict[str, Any] | bytes, model: bytes = MODEL, card: bytes = CARD,
             key: Ed25519PrivateKey = KEY, magic: bytes = b"HVMP", fmt: int = 1) -> bytes:
    """A package put together from the format in modelpkg's docstring, independently of build_package."""
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    body = magic + bytes([fmt]) + struct.pack("<I", len(raw)) + raw + model + card
    return body + key.sign(body)


def _nested(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = {"a": v}
    return v


def code_of(data: bytes, trusted: dict[str, Any] | None = None) -> str:
    with pytest.raises(mp.PackageError) as e:
        mp.verify_package(data, TRUSTED if trusted is None else trusted)
    assert "\n" not in str(e.value) and str(e.value)
    assert e.value.code in mp.REFUSALS
    return e.value.code


# --- Round trip and format ---


def test_round_trip_with_the_shipped_model_and_card() -> None:
    pkg = mp.verify_package(PKG, TRUSTED)
    assert pkg.model == MODEL and pkg.card == CARD
    assert pkg.package_sha256 == hashlib.sha256(PKG).hexdigest() == mp.package_sha256(PKG)
    m = pkg.manifest
    assert (m.name, m.version, m.min_agent_version, m.created) == ("harvester-anomaly", "2.0.0", "0.1.0", 1764000000.0)
    assert m.sha256 == hashlib.sha256(MODEL).hexdigest() and m.card_sha256 == hashlib.sha256(CARD).hexdigest()
    assert (m.model_size, m.card_size, m.key_id) == (len(MODEL), len(CARD), mp.key_id(KEY.public_key()))
    assert m.contract == CONTRACT and m.contract["model"] == {"name": "harvester-anomaly", "version": "2.0.0"}
    assert mp.parse_package(PKG) == pkg


def test_the_file_is_laid_out_as_documented() -> None:
    assert PKG[:4] == b"HVMP" and PKG[4] == 1
    (mlen,) = struct.unpack_from("<I", PKG, 5)
    manifest = json.loads(PKG[9 : 9 + mlen].decode("utf-8"))
    assert list(manifest) == list(mp.FIELDS)
    assert manifest == mp.parse_package(PKG).manifest.to_dict()
    assert PKG[9 + mlen : 9 + mlen + len(MODEL)] == MODEL
    assert PKG[9 + mlen + len(MODEL) : -64] == CARD
    assert len(PKG) == 9 + mlen + len(MODEL) + len(CARD) + 64
    KEY.public_key().verify(PKG[-64:], PKG[:-64])  # the signature covers every byte before it
    # And a package assembled by hand from the documentation verifies the same.
    assert mp.verify_package(assemble(manifest_dict()), TRUSTED).manifest == mp.parse_package(PKG).manifest


def test_key_id_is_the_start_of_the_sha256_of_the_raw_public_key() -> None:
    raw = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32 and mp.key_id(KEY.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


# --- Tampering, keys ---


def _flip_positions() -> dict[str, list[int]]:
    (mlen,) = struct.unpack_from("<I", PKG, 5)
    model_at, card_at, sig_at = 9 + mlen, 9 + mlen + len(MODEL), len(PKG) - 64
    return {
        "header": list(range(9)),
        "manifest": list(range(9, model_at)),
        "model": [*range(model_at, card_at, 37), card_at - 1],
        "card": [*range(card_at, sig_at, 41), sig_at - 1],
        "signature": list(range(sig_at, len(PKG))),
    }


@pytest.mark.parametrize("part", ["header", "manifest", "model", "card", "signature"])
def test_every_changed_byte_is_refused_with_its_reason(part: str) -> None:
    positions = _flip_positions()[part]
    codes: dict[str, int] = {}
    for pos in positions:
        for mask in (0x01, 0x80):
            data = bytearray(PKG)
            data[pos] ^= mask
            code = code_of(bytes(data))
            codes[code] = codes.get(code, 0) + 1
            if part == "header":
                want = {"bad_magic"} if pos < 4 else {"bad_format"} if pos == 4 else {
                    "truncated", "too_large", "bad_manifest"}
            elif part == "manifest":
                # Structure first: a flip that leaves the manifest valid JSON of the right shape is the signature's.
                want = {"bad_manifest", "unknown_key", "bad_signature", "truncated", "too_large"}
            else:
                want = {"bad_signature"}
            assert code in want, (part, pos, mask, code)
    if part == "manifest":
        assert codes.get("bad_signature", 0) > 0 and codes.get("bad_manifest", 0) > 0, codes


def test_hashes_are_checked_after_the_signature() -> None:
    wrong_model = assemble(manifest_dict(sha256="0" * 64))
    assert code_of(wrong_model) == "hash_mismatch"
    wrong_card = assemble(manifest_dict(card_sha256="f" * 64))
    with pytest.raises(mp.PackageError, match="card hashes to") as e:
        mp.verify_package(wrong_card, TRUSTED)
    assert e.value.code == "hash_mismatch"
    # Unsigned, the same package is a bad signature first.
    assert code_of(wrong_model[:-64] + bytes(64)) == "bad_signature"
    assert mp.parse_package(wrong_model).manifest.sha256 == "0" * 64  # structure alone does not look at hashes


def test_a_wrong_or_unknown_key_is_refused() -> None:
    other_id = mp.key_id(OTHER.public_key())
    # The right id mapped to another key: the signature fails.
    assert code_of(PKG, {mp.key_id(KEY.public_key()): OTHER.public_key()}) == "bad_signature"
    # Signed with OTHER but claiming KEY's id: the signature fails against KEY.
    assert code_of(assemble(manifest_dict(), key=OTHER)) == "bad_signature"
    # Signed with OTHER, its own id, not trusted.
    with pytest.raises(mp.PackageError, match=f"signed with key {other_id}, which is not trusted") as e:
        mp.verify_package(build(key=OTHER), TRUSTED)
    assert e.value.code == "unknown_key"
    with pytest.raises(mp.PackageError, match="no key is trusted") as e:
        mp.verify_package(PKG, {})
    assert e.value.code == "unknown_key"


def test_keys_rotate_by_adding_and_removing_files(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    old_key, old_pub, old_id = mp.generate_keypair(keys)
    new_key, new_pub, new_id = mp.generate_keypair(keys)
    (keys / "README").write_text("not a key: only *.pub files are read from a directory\n")
    old_pkg = build(key=mp.load_private_key(old_key))
    new_pkg = build(key=mp.load_private_key(new_key))
    trusted = mp.load_public_keys([keys])
    assert set(trusted) == {old_id, new_id}
    assert mp.verify_package(old_pkg, trusted).manifest.key_id == old_id
    assert mp.verify_package(new_pkg, trusted).manifest.key_id == new_id
    old_pub.unlink()
    trusted = mp.load_public_keys([keys])
    assert code_of(old_pkg, trusted) == "unknown_key"
    assert mp.verify_package(new_pkg, trusted).manifest.key_id == new_id
    # The id comes from the key, not the file name: a renamed file is the same key.
    renamed = tmp_path / "vendor-key.pem"
    shutil.copy(new_pub, renamed)
    assert set(mp.load_public_keys([renamed])) == {new_id}


# --- Structure ---


def test_truncated_at_any_length_is_truncated() -> None:
    (mlen,) = struct.unpack_from("<I", PKG, 5)
    bounds = [9, 9 + mlen, 9 + mlen + len(MODEL), len(PKG) - 64]
    lengths = set(range(0, 40)) | {b + d for b in bounds for d in (-1, 0, 1)} | set(range(0, len(PKG), 997))
    lengths |= {len(PKG) - 1, len(PKG) - 63}
    for n in sorted(k for k in lengths if 0 <= k < len(PKG)):
        assert code_of(PKG[:n]) == "truncated", n
    assert code_of(PKG + b"\0") == "bad_manifest"


@pytest.mark.parametrize(("over", "code"), [
    ({"model_size": mp.MAX_PACKAGE_BYTES}, "too_large"),
    ({"card_size": mp.MAX_PACKAGE_BYTES - len(MODEL)}, "too_large"),
    ({"model_size": 2**63 - 1}, "too_large"),
    ({"model_size": 2**64}, "bad_manifest"),  # past signed 64 bits: not acceptable JSON here
    ({"model_size": -1}, "bad_manifest"),
    ({"model_size": 0}, "bad_manifest"),
    ({"card_size": -5}, "bad_manifest"),
    ({"model_size": len(MODEL) + 0.0}, "bad_manifest"),
    ({"model_size": True}, "bad_manifest"),
    ({"card_size": str(len(CARD))}, "bad_manifest"),
    ({"model_size": len(MODEL) - 1}, "bad_manifest"),  # then the file is longer than described
    ({"model_size": len(MODEL) + 1}, "truncated"),
])
def test_sizes_in_the_manifest(over: dict[str, Any], code: str) -> None:
    assert code_of(assemble(manifest_dict(**over))) == code


@pytest.mark.parametrize(("over", "match"), [
    ({"format": 2}, "format"),
    ({"name": ""}, "name"),
    ({"name": "a\nb"}, "name"),
    ({"version": "x" * 257}, "version"),
    ({"version": 2}, "version"),
    ({"sha256": "AB" * 32}, "sha256"),
    ({"card_sha256": "ab" * 31}, "card_sha256"),
    ({"contract": []}, "contract"),
    ({"min_agent_version": "1.x"}, "min_agent_version"),
    ({"min_agent_version": "1.2.3.4.5"}, "min_agent_version"),
    ({"created": -1}, "created"),
    ({"created": 1e300}, "created"),
    ({"created": "today"}, "created"),
    ({"key_id": "ABCDEF0123456789"}, "key_id"),
    ({"key_id": "abc"}, "key_id"),
    ({"extra": 1}, "unknown keys: 'extra'"),
])
def test_each_manifest_field_is_checked(over: dict[str, Any], match: str) -> None:
    with pytest.raises(mp.PackageError, match=match) as e:
        mp.verify_package(assemble(manifest_dict(**over)), TRUSTED)
    assert e.value.code == "bad_manifest"


def test_a_missing_manifest_key_is_named() -> None:
    d = manifest_dict()
    del d["card_sha256"], d["created"]
    with pytest.raises(mp.PackageError, match="manifest lacks card_sha256, created"):
        mp.parse_package(assemble(d))


@pytest.mark.parametrize("raw", [
    b"not json", b"[1, 2]", b'"a string"', b"null", b"{", b"\xff\xfe{}", "{}".encode("utf-16"),
    b'{"a": NaN}', b"[" * 100_000 + b"]" * 100_000, json.dumps({"contract": _nested(200)}).encode(),
    b'{"a": 123456789012345678901234567890}',
])
def test_manifests_that_are_not_a_json_object_are_refused(raw: bytes) -> None:
    assert code_of(assemble(raw)) == "bad_manifest"


def test_header_refusals() -> None:
    assert code_of(b"") == "truncated"
    assert code_of(b"HV") == "truncated"
    assert code_of(b"HX") == "bad_magic"
    assert code_of(b"PK\x03\x04" + bytes(100)) == "bad_magic"  # a zip, say
    assert code_of(assemble(manifest_dict(), fmt=2)) == "bad_format"
    assert code_of(b"HVMP\x01" + struct.pack("<I", 0) + bytes(80)) == "bad_manifest"
    assert code_of(b"HVMP\x01" + struct.pack("<I", mp.MAX_MANIFEST_BYTES + 1) + bytes(80)) == "too_large"
    assert code_of(b"HVMP\x01" + struct.pack("<I", 2**32 - 1) + bytes(80)) == "too_large"
    assert code_of(b"HVMP" + bytes(mp.MAX_PACKAGE_BYTES)) == "too_large"


def test_build_refuses_what_a_reader_would_refuse() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"card": b"not json"}, "bad_manifest"),
        ({"card": b"[1]"}, "bad_manifest"),
        ({"name": ""}, "bad_manifest"),
        ({"min_agent_version": "v1"}, "bad_manifest"),
        ({"contract": {"x": float("nan")}}, "bad_manifest"),
        ({"contract": {"x": "\ud800"}}, "bad_manifest"),
        ({"contract": _nested(40)}, "bad_manifest"),
        ({"contract": {"x": "a" * mp.MAX_MANIFEST_BYTES}}, "too_large"),
        ({"model": b""}, "bad_manifest"),
    ]
    for over, code in cases:
        with pytest.raises(mp.PackageError) as e:
            build(**over)
        assert e.value.code == code, (over.keys(), e.value)


def test_versions_compare_as_dotted_integers() -> None:
    assert mp.version_at_least("0.1.0", "0.1")
    assert mp.version_at_least("0.10.0", "0.9.9")
    assert mp.version_at_least("1", "0.99.99.99")
    assert not mp.version_at_least("0.1.0", "0.1.0.1")
    assert not mp.version_at_least("0.9", "0.10")


# --- Key files ---


def test_generate_keypair_writes_private_0600_public_spki_never_overwrites(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_path, pub_path, kid = mp.generate_keypair(tmp_path / "k")
    assert (key_path.name, pub_path.name) == (f"{kid}.key", f"{kid}.pub")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert mp.key_id(mp.load_private_key(key_path).public_key()) == kid
    assert list(mp.load_public_keys([pub_path])) == [kid]
    # The same key again (forced): neither file is touched, and no half pair is left.
    same = mp.load_private_key(key_path)
    before = (key_path.read_bytes(), pub_path.read_bytes())
    monkeypatch.setattr(Ed25519PrivateKey, "generate", staticmethod(lambda: same))
    with pytest.raises(mp.PackageError, match="exists already") as e:
        mp.generate_keypair(tmp_path / "k")
    assert e.value.code == "bad_key_file"
    assert (key_path.read_bytes(), pub_path.read_bytes()) == before
    key_path.unlink()  # only the public key is left: the new private key must not stay alone
    with pytest.raises(mp.PackageError, match=f"{kid}.pub: exists already"):
        mp.generate_keypair(tmp_path / "k")
    assert not key_path.exists()


def test_key_files_that_are_not_ed25519_keys_are_named(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    files = {
        "garbage.pub": b"hello",
        "ec.pub": ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo),
        "private-as-public.pub": KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()),
        "huge.pub": b"A" * (mp.MAX_KEY_FILE_BYTES + 1),
    }
    for name, data in files.items():
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        (d / name).write_bytes(data)
        with pytest.raises(mp.PackageError, match=name) as e:
            mp.load_public_keys([d])
        assert e.value.code == "bad_key_file"
    with pytest.raises(mp.PackageError, match="no such key file") as e:
        mp.load_public_keys([tmp_path / "absent.pub"])
    (tmp_path / "empty").mkdir()
    assert mp.load_public_keys([]) == {} and mp.load_public_keys([tmp_path / "empty"]) == {}

    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    ec_priv = tmp_path / "ec.key"
    ec_priv.write_bytes(ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    pub = tmp_path / "ed.pub"
    pub.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    for path, match in ((encrypted, "encrypted"), (ec_priv, "not an Ed25519 private key"), (pub, "not a PEM private"),
                        (tmp_path / "none.key", "cannot read")):
        with pytest.raises(mp.PackageError, match=match) as e:
            mp.load_private_key(path)
        assert e.value.code == "bad_key_file" and str(path) in str(e.value)


def _pem(public: Any) -> bytes:
    return bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.sampled_from(["as written", "crlf", "blank lines around"]))
def test_a_public_key_file_is_read_without_cryptography_exactly_as_cryptography_reads_it(
    raw: bytes, layout: str
) -> None:
    """The canonical PEM (what keygen and OpenSSL write) is parsed by `_ed25519_spki_pem`, not by cryptography: the
    same 32 bytes cryptography finds, whatever the key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pem = _pem(Ed25519PublicKey.from_public_bytes(raw))
    pem = {"as written": pem, "crlf": pem.replace(b"\n", b"\r\n"), "blank lines around": b"\n" + pem + b"\n\n"}[layout]
    assert mp._ed25519_spki_pem(pem) == raw
    assert serialization.load_pem_public_key(pem).public_bytes_raw() == raw  # type: ignore[union-attr]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(min_value=0, max_value=200))
def test_the_fast_reader_takes_nothing_cryptography_would_not(noise: bytes, pos: int) -> None:
    """A damaged file is either still the same Ed25519 key to both readers, or not taken by the fast reader (and
    then cryptography judges it, as before)."""
    pem = _pem(KEY.public_key())
    pos %= len(pem)
    bad = pem[:pos] + noise + pem[pos + len(noise):]
    raw = mp._ed25519_spki_pem(bad)
    if raw is not None:
        assert serialization.load_pem_public_key(bad).public_bytes_raw() == raw  # type: ignore[union-attr]


def test_keys_read_without_cryptography_verify_as_cryptography_keys_do(tmp_path: Path) -> None:
    pub = tmp_path / "k.pub"
    pub.write_bytes(_pem(KEY.public_key()))
    key = mp.load_public_key(pub)
    assert isinstance(key, mp.RawEd25519PublicKey)
    assert key == mp.RawEd25519PublicKey(KEY.public_key().public_bytes_raw())
    assert mp.load_public_keys([pub]) == {mp.key_id(KEY.public_key()): key}
    assert mp.verify_package(PKG, {mp.key_id(key): key}).manifest.name == mp.verify_package(PKG, TRUSTED).manifest.name
    forged = PKG[:-1] + bytes([PKG[-1] ^ 1])
    assert code_of(forged, {mp.key_id(key): key}) == "bad_signature"
    with pytest.raises(ValueError):
        mp.RawEd25519PublicKey(bytes(31))


def test_loading_trusted_keys_does_not_import_cryptography(tmp_path: Path) -> None:
    """A vehicle's agent loads its trusted keys at every start; cryptography (~7 MB resident) waits for the first
    package to check (docs/model_updates.md, "Memory")."""
    _, pub, kid = mp.generate_keypair(tmp_path / "keys")
    code = ("import sys; from harvester_common import modelpkg as mp; "
            f"keys = mp.load_public_keys([{str(pub)!r}]); "
            "print(list(keys), sorted({m.split('.')[0] for m in sys.modules} & {'cryptography'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.split() == [f"['{kid}']", "[]"]


# --- Fuzzing: only PackageError, whatever the bytes ---


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_package_error(data: bytes) -> None:
    for payload in (data, b"HVMP" + data, b"HVMP\x01" + data,
                    b"HVMP\x01" + struct.pack("<I", len(data)) + data + bytes(64)):
        with contextlib.suppress(mp.PackageError):
            mp.verify_package(payload, TRUSTED)
        with contextlib.suppress(mp.PackageError):
            mp.parse_package(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(min_value=0), st.sampled_from(["replace", "insert", "cut"]))
def test_corrupted_packages_only_raise_package_error(noise: bytes, pos: int, how: str) -> None:
    data = bytearray(PKG)
    p = pos % len(data)
    if how == "replace":
        data[p : p + len(noise)] = noise
    elif how == "insert":
        data[p:p] = noise
    else:
        del data[p : p + len(noise)]
    try:
        mp.verify_package(bytes(data), TRUSTED)
    except mp.PackageError as e:
        assert e.code in mp.REFUSALS
    else:
        assert bytes(data) == PKG  # only a no-op change may pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*mp.FIELDS, "other"]), _json, max_size=12), st.booleans())
def test_hostile_manifests_only_raise_package_error(fields: dict[str, Any], complete: bool) -> None:
    d = {**manifest_dict(), **fields} if complete else fields
    with contextlib.suppress(mp.PackageError):
        mp.verify_package(assemble(json.dumps(d).encode()), TRUSTED)


# --- The ONNX metadata reader ---


def _tiny(props: dict[str, str] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string="d" * 300,
                              producer_name="test")
    if props is not None:
        helper.set_model_props(model, props)
    return model


def test_metadata_of_the_shipped_models_is_what_onnx_reads() -> None:
    for path in (MODEL_PATH, REPO / "models" / "harvester-anomaly.onnx"):
        data = path.read_bytes()
        want = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
        assert onnxmeta.read_metadata(data) == want and CONTRACT_KEY in want
    assert CONTRACT_KEY == onnxmeta.CONTRACT_KEY


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=30), st.text(max_size=300), max_size=12))
def test_metadata_written_by_onnx_reads_back(props: dict[str, str]) -> None:
    model = _tiny(props)
    # Other top-level fields after the metadata too: they are skipped, not taken for metadata.
    model.model_version = 7
    model.domain = "ai.test"
    data = model.SerializeToString()
    assert onnxmeta.read_metadata(data) == props


def test_metadata_reader_refusals() -> None:
    assert onnxmeta.read_metadata(b"") == {}
    model = _tiny({"a": "1"})
    dup = model.metadata_props.add()
    dup.key, dup.value = "a", "2"
    with pytest.raises(mp.PackageError, match="'a' appears twice") as e:
        onnxmeta.read_metadata(model.SerializeToString())
    assert e.value.code == "bad_model"
    data = _tiny({"k": "v" * 100}).SerializeToString()
    for n in range(1, len(data)):
        with contextlib.suppress(mp.PackageError):
            onnxmeta.read_metadata(data[:n])  # most cuts are refused; none crash
    with pytest.raises(mp.PackageError, match="truncated"):
        onnxmeta.read_metadata(data[:-1])  # inside the metadata value, the last field
    for bad in (b"\x0b", b"\x80" * 11, b"\x72\x02\x0a\x05", b"\x72\x04\x0a\x02\xff\xfe", b"\x75\x00\x00\x00\x00"):
        with pytest.raises(mp.PackageError) as e:
            onnxmeta.read_metadata(bad)
        assert e.value.code == "bad_model"
    with pytest.raises(mp.PackageError, match="more than 1024"):
        onnxmeta.read_metadata(_tiny({str(i): "" for i in range(1025)}).SerializeToString())


def test_read_contract(tmp_path: Path) -> None:
    assert onnxmeta.read_contract(MODEL)["model"] == {"name": "harvester-anomaly", "version": "2.0.0"}
    for props, match in (({}, "no 'harvester.contract' metadata"), ({CONTRACT_KEY: "{"}, "not JSON"),
                         ({CONTRACT_KEY: "[]"}, "not a JSON object"),
                         ({CONTRACT_KEY: '{"model": {"name": "m"}}'}, "model.version"),
                         ({CONTRACT_KEY: '{"model": {"name": "", "version": "1"}}'}, "model.name")):
        with pytest.raises(mp.PackageError, match=match) as e:
            onnxmeta.read_contract(_tiny(props).SerializeToString())
        assert e.value.code == "bad_model"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_metadata_reader_fuzz_random_bytes(data: bytes) -> None:
    for payload in (data, b"\x72" + data, b"\x72\x10\x0a" + data):
        with contextlib.suppress(mp.PackageError):
            onnxmeta.read_metadata(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=20), st.integers(min_value=0))
def test_metadata_reader_fuzz_corrupted_models(noise: bytes, pos: int) -> None:
    data = bytearray(_tiny({CONTRACT_KEY: json.dumps(CONTRACT)[:500], "x": "y"}).SerializeToString())
    p = pos % len(data)
    data[p : p + len(noise)] = noise
    with contextlib.suppress(mp.PackageError):
        out = onnxmeta.read_metadata(bytes(data))
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


# --- `cloud-sync model keygen` and `model sign`, as the engineer runs them ---


def cloud_sync(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cloud_sync", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("cloud-sync: error: ")
    return r.stderr


def test_keygen_and_sign_on_the_command_line(tmp_path: Path) -> None:
    r = cloud_sync("model", "keygen", "--out", str(tmp_path / "keys"))
    assert r.returncode == 0, r.stderr
    (key,) = (tmp_path / "keys").glob("*.key")
    kid = key.stem
    assert len(r.stdout.strip().splitlines()) == 1 and kid in r.stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert mp.key_id(mp.load_private_key(key).public_key()) == kid
    assert set(mp.load_public_keys([tmp_path / "keys"])) == {kid}

    # The card next to the shipped model is found by its name.
    out = tmp_path / "out" / "m.pkg"
    out.parent.mkdir()
    r = cloud_sync("model", "sign", str(MODEL_PATH), "--key", str(key), "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    pkg = mp.verify_package(data, mp.load_public_keys([tmp_path / "keys"]))
    assert pkg.model == MODEL and pkg.card == CARD and pkg.manifest.contract == CONTRACT
    assert (pkg.manifest.name, pkg.manifest.version, pkg.manifest.min_agent_version) == (
        "harvester-anomaly", "2.0.0", "0.1.0")
    line = r.stdout.strip()
    assert len(line.splitlines()) == 1
    for part in ("harvester-anomaly", "2.0.0", kid, mp.package_sha256(data), str(len(data))):
        assert part in line, (part, line)
    assert [p.name for p in out.parent.iterdir()] == ["m.pkg"]  # no temporary file left

    # A model without its card beside it: the error says where it looked.
    lone = tmp_path / "lone" / "thing.int8.onnx"
    lone.parent.mkdir()
    shutil.copy(MODEL_PATH, lone)
    err = _one_line_error(cloud_sync("model", "sign", str(lone), "--key", str(key), "--out", str(out)))
    assert str(lone.parent / "thing.card.json") in err and "--card" in err
    r = cloud_sync("model", "sign", str(lone), "--key", str(key), "--out", str(out), "--card", str(CARD_PATH),
                   "--min-agent-version", "0.2")
    assert r.returncode == 0, r.stderr
    assert mp.parse_package(out.read_bytes()).manifest.min_agent_version == "0.2"

    # Again into an existing directory: never overwrites (a new pair, a new id).
    assert cloud_sync("model", "keygen", "--out", str(tmp_path / "keys")).returncode == 0
    assert len(list((tmp_path / "keys").glob("*.key"))) == 2


def test_sign_errors_are_one_line(tmp_path: Path) -> None:
    key, _, _ = mp.generate_keypair(tmp_path / "keys")
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(_tiny({}).SerializeToString())
    (tmp_path / "plain.card.json").write_text("{}")
    bad_card = tmp_path / "bad.json"
    bad_card.write_text("not json")
    pkg = str(tmp_path / "p.pkg")
    cases = [
        (["model", "sign", str(plain), "--key", str(key), "--out", pkg], "no 'harvester.contract' metadata"),
        (["model", "sign", str(REPO / "README.md"), "--key", str(key), "--out", pkg], "not an ONNX model"),
        (["model", "sign", str(tmp_path / "none.onnx"), "--key", str(key), "--out", pkg], "no such model file"),
        (["model", "sign", str(MODEL_PATH), "--key", str(tmp_path / "keys"), "--out", pkg], "cannot read"),
        (["model", "sign", str(MODEL_PATH), "--key", str(REPO / "README.md"), "--out", pkg], "not a PEM private key"),
        (["model", "sign", str(MODEL_PATH), "--key", str(key), "--out", pkg, "--card", str(bad_card)],
         f"{bad_card}: the card is not JSON"),
        (["model", "sign", str(MODEL_PATH), "--key", str(key), "--out", str(tmp_path / "no" / "dir" / "p.pkg")],
         "cannot write"),
    ]
    for args, match in cases:
        assert match in _one_line_error(cloud_sync(*args)), args
    r = cloud_sync("model", "sign", str(MODEL_PATH), "--key", str(key), "--out", pkg, "--min-agent-version", "new")
    assert r.returncode == 2 and "dot-separated integers" in r.stderr
    assert not Path(pkg).exists()


def test_sign_takes_a_tiny_harvester_model(tmp_path: Path) -> None:
    """Any model with a contract: name and version come from it."""
    contract = make_contract([FeatureSpec("a", "X.A", "mean", 10.0)], model_name="tiny", model_version="9.1")
    model = linear_softmax_model(tmp_path / "tiny.onnx", contract, np.ones((1, 2)), np.zeros(2))
    (tmp_path / "tiny.card.json").write_text('{"model": {"name": "tiny"}}')
    key, _, kid = mp.generate_keypair(tmp_path / "keys")
    r = cloud_sync("model", "sign", str(model), "--key", str(key), "--out", str(tmp_path / "t.pkg"))
    assert r.returncode == 0, r.stderr
    m = mp.verify_package((tmp_path / "t.pkg").read_bytes(), mp.load_public_keys([tmp_path / "keys"])).manifest
    assert (m.name, m.version, m.key_id) == ("tiny", "9.1", kid)
