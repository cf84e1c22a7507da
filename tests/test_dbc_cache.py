"""DBC tables: parsed once per process, cached on disk by content hash, never trusted when damaged; and the
slow-path decoder built from them decodes exactly as cantools does, on every message of the real DBCs."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode import dbc_cache
from agent.decode.dbc_tables import FORMAT, SlowMessage, from_cantools, tables_from_json, tables_to_json
from agent.decode.j1939 import DbcError, default_dbc, load_dbcs
from harvester_testing.data import SHARED_DATA

BIG = SHARED_DATA / "dbc" / "j1939_vector_v7.2__osu-cybercan__patched.dbc"
REPO = Path(__file__).resolve().parents[1]


def _dbcs() -> list[Path]:
    return [default_dbc(), *([BIG] if BIG.exists() else [])]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh cache folder, and nothing of the DBCs in this process's memory."""
    folder = tmp_path / "dbc-cache"
    monkeypatch.setenv(dbc_cache.ENV, str(folder))
    dbc_cache.forget()
    dbc_cache.STATS.clear()
    yield folder
    dbc_cache.forget()


def _fresh(path: Path) -> Any:
    """What the tables must be: cantools' parse of the file, described."""
    data = path.read_bytes()
    return from_cantools(cantools.database.load_file(str(path), strict=False), hashlib.sha256(data).hexdigest())


def _compiled_view(path: Path) -> dict[int, Any]:
    """What the decoder takes from a DBC, per PGN: every fast signal's columns and the slow signal names."""
    return {pgn: (cm.name, [(f.name, f.unit, f.shift, f.mask, f.length, f.signed, f.scale, f.offset) for f in cm.fast],
                  cm.slow, cm.message.frame_id, cm.message.cycle_time)
            for pgn, cm in load_dbcs([path]).items()}


# --- the slow-path decoder equals cantools ---------------------------------------------------------------------

_REFS = {p: cantools.database.load_file(str(p), strict=False) for p in _dbcs()}
_SPECS = {p: {m.name: m for m in from_cantools(db, "x").messages} for p, db in _REFS.items()}
_MESSAGES = [(p, name) for p, specs in _SPECS.items() for name in specs]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if type(x) is not type(y):
            return False
        if not (x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))):
            return False
    return True


@settings(max_examples=600, deadline=None)
@given(which=st.integers(0, len(_MESSAGES) - 1), data=st.binary(max_size=12),
       head=st.sampled_from([None, 0, 1, 2, 3, 5, 0xFE, 0xFF]))
def test_slow_message_decodes_every_message_as_cantools(which: int, data: bytes, head: int | None) -> None:
    """Every extended message of the shipped and the Vector J1939 DBC, any payload (short, long, and a first byte
    that selects a multiplexer id or none): the same signals, values and types, or both refuse."""
    path, name = _MESSAGES[which]
    ref = _REFS[path].get_message_by_name(name)
    if head is not None and data:
        data = bytes([head]) + data[1:]
    ours = SlowMessage(_SPECS[path][name], lambda: ref)
    assert ours.exotic is None  # these DBCs decode without cantools
    try:
        want: dict[str, Any] | None = ref.decode(data, decode_choices=False, allow_truncated=True)
    except Exception:
        want = None
    try:
        got: dict[str, Any] | None = ours.decode(data, decode_choices=False, allow_truncated=True)
    except Exception:
        got = None
    assert (want is None) == (got is None), (name, data.hex(), want, got)
    if want is not None and got is not None:
        assert _same(want, got), (name, data.hex(), want, got)


# Every layout the slow path handles, beyond what the real DBCs hold (they have no signed, float or nested
# multiplexed slow signal): big-endian across bytes, signed both ways, IEEE floats, integer and float scaling,
# a multiplexer with a value table naming an id no signal uses, nested multiplexing, messages shorter and longer
# than a CAN frame.
LAYOUTS_DBC = """VERSION ""
BO_ 2566844926 MIX: 8 Vector__XXX
 SG_ Mode M : 0|4@1+ (1,0) [0|15] "" Vector__XXX
 SG_ BeTemp m1 : 15|12@0- (0.25,-10) [0|0] "degC" Vector__XXX
 SG_ BeCount m1 : 39|16@0+ (2,100) [0|0] "" Vector__XXX
 SG_ LeSigned m2 : 8|13@1- (3,-7) [0|0] "" Vector__XXX
 SG_ Gain m2 : 32|32@1- (1,0) [0|0] "" Vector__XXX
 SG_ Sub m3M : 8|4@1+ (1,0) [0|15] "" Vector__XXX
 SG_ Deep m3 : 16|16@1+ (0.1,0) [0|0] "" Vector__XXX
 SG_ Plain : 56|8@1+ (1,0) [0|255] "" Vector__XXX
BO_ 2566845182 FLT: 8 Vector__XXX
 SG_ Kind M : 0|8@1+ (1,0) [0|255] "" Vector__XXX
 SG_ F32 m7 : 8|32@1- (1,0) [0|0] "" Vector__XXX
 SG_ F32Scaled m8 : 8|32@1- (0.5,1) [0|0] "" Vector__XXX
 SG_ BeF32 m9 : 39|32@0- (1,0) [0|0] "" Vector__XXX
BO_ 2566845438 DBL: 8 Vector__XXX
 SG_ D64 : 0|64@1- (1,0) [0|0] "" Vector__XXX
BO_ 2566845694 SHORT: 3 Vector__XXX
 SG_ Hi : 15|12@0+ (1,0) [0|0] "" Vector__XXX
 SG_ Lo : 0|4@1- (1,0) [0|0] "" Vector__XXX
BO_ 2566845950 LONG: 12 Vector__XXX
 SG_ Head : 0|8@1+ (1,0) [0|255] "" Vector__XXX
 SG_ Tail : 72|16@1+ (1,0) [0|0] "" Vector__XXX
 SG_ BeTail : 87|12@0+ (1,0) [0|0] "" Vector__XXX
VAL_ 2566844926 Mode 1 "be" 2 "signed" 3 "nested" 5 "named only" ;
SIG_VALTYPE_ 2566845182 F32 : 1;
SIG_VALTYPE_ 2566845182 F32Scaled : 1;
SIG_VALTYPE_ 2566845182 BeF32 : 1;
SIG_VALTYPE_ 2566845438 D64 : 2;
SG_MUL_VAL_ 2566844926 BeTemp Mode 1-1;
SG_MUL_VAL_ 2566844926 BeCount Mode 1-1;
SG_MUL_VAL_ 2566844926 LeSigned Mode 2-2;
SG_MUL_VAL_ 2566844926 Gain Mode 2-2;
SG_MUL_VAL_ 2566844926 Sub Mode 3-3;
SG_MUL_VAL_ 2566844926 Deep Sub 2-2, 4-6;
"""


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = tmp_path_factory.mktemp("dbc") / "layouts.dbc"
    p.write_text(LAYOUTS_DBC)
    db = cantools.database.load_file(str(p), strict=False)
    return db, {m.name: m for m in from_cantools(db, "x").messages}


@settings(max_examples=800, deadline=None)
@given(name=st.sampled_from(["MIX", "FLT", "DBL", "SHORT", "LONG"]), data=st.binary(max_size=14),
       head=st.sampled_from([None, 0, 1, 2, 3, 5, 7, 8, 9, 0x21, 0x43, 0x63, 0xFF]))
def test_slow_message_decodes_every_layout_as_cantools(layouts: Any, name: str, data: bytes,
                                                       head: int | None) -> None:
    db, specs = layouts
    ref = db.get_message_by_name(name)
    if head is not None and data:
        data = bytes([head]) + data[1:]
    ours = SlowMessage(specs[name], lambda: ref)
    assert ours.exotic is None
    try:
        want: dict[str, Any] | None = ref.decode(data, decode_choices=False, allow_truncated=True)
    except Exception:
        want = None
    try:
        got: dict[str, Any] | None = ours.decode(data, decode_choices=False, allow_truncated=True)
    except Exception:
        got = None
    assert (want is None) == (got is None), (name, data.hex(), want, got)
    if want is not None and got is not None:
        assert _same(want, got), (name, data.hex(), want, got)


OVERLAP_DBC = """VERSION ""
BO_ 2566844926 ODD: 8 Vector__XXX
 SG_ Mode M : 0|8@1+ (1,0) [0|255] "" Vector__XXX
 SG_ Wide m1 : 8|16@1+ (1,0) [0|65535] "" Vector__XXX
 SG_ Narrow m1 : 12|8@1+ (1,0) [0|255] "" Vector__XXX
 SG_ Temp : 32|16@0- (0.5,-40) [0|0] "degC" Vector__XXX
"""


def test_a_layout_cantools_packs_oddly_is_left_to_cantools(tmp_path: Path) -> None:
    """Overlapping signals under one multiplexer id: cantools' bit packing is not plain extraction there, so that
    message is `exotic` and its decode is cantools' own (loaded on first use), whatever it gives."""
    p = tmp_path / "odd.dbc"
    p.write_text(OVERLAP_DBC)
    ref = cantools.database.load_file(str(p), strict=False)
    msg = SlowMessage(from_cantools(ref, "x").messages[0], lambda: ref.messages[0])
    assert msg.exotic is not None
    for data in (bytes([1, 2, 3, 4, 5, 6, 7, 8]), bytes([0, 9, 9, 9, 9, 9, 9, 9]), b"\x01\x02"):
        try:
            want = ref.messages[0].decode(data, decode_choices=False, allow_truncated=True)
        except Exception as e:
            with pytest.raises(type(e)):
                msg.decode(data, decode_choices=False, allow_truncated=True)
            continue
        assert msg.decode(data, decode_choices=False, allow_truncated=True) == want


# --- the cache -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _dbcs(), ids=lambda p: p.name)
def test_cached_tables_are_the_parsed_ones_and_a_second_load_reads_the_cache(cache: Path, path: Path) -> None:
    parsed = _compiled_view(path)
    assert dbc_cache.STATS["parsed"] == 1 and dbc_cache.STATS["written"] == 1
    assert dbc_cache.load(path)[0] == _fresh(path)
    load_dbcs([path])
    assert dbc_cache.STATS["hit_memory"] >= 1  # the same process does not parse it again
    dbc_cache.forget()
    assert _compiled_view(path) == parsed
    assert (dbc_cache.STATS["parsed"], dbc_cache.STATS["hit_disk"]) == (1, 1)
    assert list(cache.iterdir()) == [dbc_cache.cache_file(cache, hashlib.sha256(path.read_bytes()).hexdigest())]


def test_a_cached_start_parses_nothing_and_imports_no_cantools(cache: Path) -> None:
    """The "second run starts in milliseconds" claim, checked by what it rests on rather than by a clock: with the
    tables cached, a fresh process builds every decoder without cantools (or python-can) ever being imported."""
    if not BIG.exists():
        pytest.skip(f"{BIG} is absent (tests read real data from ../shared/data)")
    code = ("import sys; from pathlib import Path; from agent.decode.j1939 import J1939Decoder; "
            "from agent.decode import dbc_cache; from agent.signals import SignalRegistry; "
            f"[J1939Decoder(SignalRegistry(), [Path({str(BIG)!r})], b) for b in ('can0', 'can1')]; "
            "print(dict(dbc_cache.STATS), 'cantools' in sys.modules, 'can' in sys.modules)")
    env = {**os.environ, dbc_cache.ENV: str(cache), "PYTHONPATH": str(REPO)}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "'parsed': 2" in first.stdout and first.stdout.strip().endswith("True True")
    assert "'hit_disk': 2" in second.stdout and "parsed" not in second.stdout  # two buses, one load per DBC
    assert second.stdout.strip().endswith("False False"), second.stdout


def _damage(file: Path, how: str, other: Path) -> None:
    raw = file.read_bytes()
    head, body = raw.split(b"\n", 1)
    parts = head.split()
    if how == "truncated":
        file.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "bit_flip":
        i = len(head) + 1 + len(body) // 3
        file.write_bytes(raw[:i] + bytes([raw[i] ^ 0x04]) + raw[i + 1 :])
    elif how == "header":
        file.write_bytes(b"PK\x03\x04 not ours\n" + body)
    elif how == "stale":
        parts[1] = str(FORMAT - 1).encode()
        file.write_bytes(b" ".join(parts) + b"\n" + body)
    elif how == "foreign":  # another DBC's valid cache file under this DBC's name
        file.write_bytes(other.read_bytes())
    elif how == "forged":  # checksum and length made right for a payload that is not tables: a number for a name
        obj = json.loads(body)
        obj["messages"][0][6][0][0] = 12
        payload = json.dumps(obj).encode()
        parts[3], parts[4] = hashlib.sha256(payload).hexdigest().encode(), str(len(payload)).encode()
        file.write_bytes(b" ".join(parts) + b"\n" + payload)
    elif how == "trailing":
        file.write_bytes(raw + b"{}")
    else:
        raise AssertionError(how)


REASONS = {"truncated": "truncated", "empty": "header", "bit_flip": "checksum", "header": "header", "stale": "stale",
           "foreign": "foreign", "forged": "content", "trailing": "length"}


@pytest.mark.parametrize("how", sorted(REASONS))
def test_a_damaged_cache_file_is_refused_counted_and_rewritten(cache: Path, how: str, tmp_path: Path) -> None:
    dbc = default_dbc()
    other = tmp_path / "other.dbc"
    other.write_bytes(dbc.read_bytes() + b"\n")  # the same DBC, one byte more: another hash
    want = _compiled_view(dbc)
    load_dbcs([other])
    sha = hashlib.sha256(dbc.read_bytes()).hexdigest()
    file = dbc_cache.cache_file(cache, sha)
    _damage(file, how, dbc_cache.cache_file(cache, hashlib.sha256(other.read_bytes()).hexdigest()))
    dbc_cache.forget()
    dbc_cache.STATS.clear()
    assert _compiled_view(dbc) == want  # parsed again, the same tables
    assert dbc_cache.STATS["rejected"] == 1 and dbc_cache.STATS[f"rejected:{REASONS[how]}"] == 1
    assert dbc_cache.STATS["parsed"] == 1 and dbc_cache.STATS["written"] == 1
    dbc_cache.forget()
    dbc_cache.STATS.clear()
    assert _compiled_view(dbc) == want and dbc_cache.STATS["hit_disk"] == 1  # and the file is good again
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400) | st.builds(lambda j: json.dumps(j).encode(), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=8), c, max_size=6), max_leaves=40)))
def test_hostile_cache_payloads_never_load_and_never_crash(payload: bytes) -> None:
    """Any payload, with a header whose checksum and length match it (so only the content checks stand between
    it and the decoder): refused with a reason, never an exception, never tables."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        sha = "0" * 64
        f = Path(d) / "x.json"
        f.write_bytes(b" ".join([dbc_cache.MAGIC, str(FORMAT).encode(), sha.encode(),
                                 hashlib.sha256(payload).hexdigest().encode(), str(len(payload)).encode()])
                      + b"\n" + payload)
        before = dbc_cache.STATS["rejected"]
        assert dbc_cache._from_disk(f, sha) is None
        assert dbc_cache.STATS["rejected"] == before + 1


def test_tables_survive_their_own_json_and_refuse_another_dbcs() -> None:
    t = _fresh(default_dbc())
    obj = json.loads(json.dumps(tables_to_json(t)))
    assert tables_from_json(obj, t.sha256) == t
    with pytest.raises(ValueError, match="another DBC"):
        tables_from_json(obj, "f" * 64)


def test_tables_whose_multiplexers_loop_are_refused() -> None:
    """In range field by field, but a signal multiplexed by itself: cantools loads no such DBC, and building its
    codec tree would never end, so the tables are refused."""
    t = _fresh(default_dbc())
    obj = tables_to_json(t)
    sig = obj["messages"][0][6][0]
    sig[9], sig[10], sig[11] = True, [1], sig[0]  # a multiplexer, multiplexed by itself
    with pytest.raises(ValueError, match="loop"):
        tables_from_json(json.loads(json.dumps(obj)), t.sha256)


def test_an_unwritable_cache_folder_costs_only_the_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv(dbc_cache.ENV, str(blocker / "dbc"))
    dbc_cache.forget()
    dbc_cache.STATS.clear()
    try:
        assert _compiled_view(default_dbc())  # decoders still built
        assert dbc_cache.STATS["write_failed"] == 1 and dbc_cache.STATS["parsed"] == 1
    finally:
        dbc_cache.forget()


def test_the_cache_can_be_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dbc_cache.ENV, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dbc_cache.forget()
    dbc_cache.STATS.clear()
    try:
        assert dbc_cache.cache_dir() is None
        load_dbcs([default_dbc()])
        assert dbc_cache.STATS["parsed"] == 1 and dbc_cache.STATS["written"] == 0
        assert not any(tmp_path.iterdir())
    finally:
        dbc_cache.forget()


def test_default_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(dbc_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dbc_cache.cache_dir() == tmp_path / "harvester-agent" / "dbc"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert dbc_cache.cache_dir() == Path.home() / ".cache" / "harvester-agent" / "dbc"


def test_an_edited_dbc_is_loaded_again_not_served_from_memory(cache: Path, tmp_path: Path) -> None:
    p = tmp_path / "mine.dbc"
    text = default_dbc().read_text()
    p.write_text(text)
    before = _compiled_view(p)
    p.write_text(text.replace('"rpm"', '"1/min"'))
    after = _compiled_view(p)
    assert before != after
    assert any(f[1] == "1/min" for _, fast, _, _, _ in after.values() for f in fast)


def test_missing_and_unusable_dbcs_are_dbc_errors(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(DbcError, match="no such DBC file"):
        load_dbcs([tmp_path / "missing.dbc"])
    bad = tmp_path / "bad.dbc"
    bad.write_text("BO_ this is not a DBC")
    with pytest.raises(DbcError, match="not a usable DBC"):
        load_dbcs([bad])
    assert not list(cache.glob("*.json")) if cache.exists() else True


def test_decoders_do_not_share_per_bus_state(cache: Path) -> None:
    """Compiled messages are built once per process; each decoder gets its own copy of the per-source ids."""
    a, b = load_dbcs([default_dbc()]), load_dbcs([default_dbc()])
    for pgn in a:
        assert a[pgn] is not b[pgn] and a[pgn].sids is not b[pgn].sids
        assert a[pgn].shifts is b[pgn].shifts  # the columns themselves are shared, read-only
