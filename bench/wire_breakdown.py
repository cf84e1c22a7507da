"""Where the wire's bytes go: the batches of `wire_bytes_per_sample` (the real traces in 10 s batches, sent as a
connected uplink sends them in steady state), each message taken apart into its framing, every header field, the
signal table and every column of its ENC_V2 blob.

    python bench/wire_breakdown.py [--codec 1|2] [--per-trace]

Each part's compressed cost is what it adds to the compressed body, given everything written before it:
z(parts[:k+1]) - z(parts[:k]), z being the codec's compressor and z(nothing) the frame's own bytes. So the parts
add up exactly to the message (a part can come out a byte negative: zstd's choices on a longer input differ).
The numbers in docs/benchmarks.md ("Where the wire's bytes go") are this script's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from typing import Any

import numpy as np
from benchmarks import ten_second_batches  # also puts the repository on sys.path (bench/benchkit.py)

from harvester_common import wire

COLUMNS = ("blob.runs", "blob.run_signals", "blob.references", "blob.lengths", "blob.unit", "blob.ts_firsts",
           "blob.periods", "blob.jitter", "blob.value_firsts", "blob.value_deltas", "blob.float_bits")
CATEGORY = {"prefix": "framing", "frame": "framing", "header_length": "framing",
            "seg.signals": "table", "seg.table": "table",
            "blob.runs": "run layout", "blob.run_signals": "run layout", "blob.references": "run layout",
            "blob.lengths": "run layout", "blob.unit": "run layout",
            "blob.ts_firsts": "timestamps", "blob.periods": "timestamps", "blob.jitter": "timestamps",
            "blob.value_firsts": "values", "blob.value_deltas": "values", "blob.float_bits": "values"}
CATEGORIES = ("framing", "header", "table", "run layout", "timestamps", "values")


def _json(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), allow_nan=False)


def header_parts(hj: bytes) -> list[tuple[str, bytes]]:
    """The header's JSON text cut at its fields, in order: (name, text); the texts join back to `hj` exactly."""
    h = json.loads(hj)
    parts: list[tuple[str, str]] = []
    for i, (k, v) in enumerate(h.items()):
        lead = "{" if i == 0 else ","
        if k != "segments":
            parts.append((f"hdr.{k}", f"{lead}{_json(k)}:{_json(v)}"))
            continue
        lead += f"{_json(k)}:["  # carried by the first segment's first field
        for j, seg in enumerate(v):
            for m, (sk, sv) in enumerate(seg.items()):
                sep = ("," if j else "") + "{" if m == 0 else ","
                parts.append((f"seg.{sk}", f"{lead}{sep}{_json(sk)}:{_json(sv)}"))
                lead = ""
            parts[-1] = (parts[-1][0], parts[-1][1] + "}")
        parts[-1] = (parts[-1][0], parts[-1][1] + "]")
    parts[-1] = (parts[-1][0], parts[-1][1] + "}")
    out = [(name, text.encode()) for name, text in parts]
    assert b"".join(t for _, t in out) == hj, "header parts do not join back to the header"
    return out


def blob_parts(head: dict[str, Any], blob: bytes) -> list[tuple[str, bytes]]:
    """An ENC_V2 blob cut at its columns (read as the decoder reads it)."""
    _, scales = wire._signal_table(head["signals"], hints=True)
    rd = wire._Reader(blob)
    out: list[tuple[str, bytes]] = []

    def take(name: str, read: Any) -> Any:
        at = rd.at
        v = read()
        out.append((name, blob[at : rd.at]))
        return v

    (r,) = take("blob.runs", lambda: wire._U32.unpack(rd.take(4, "")))
    d = take("blob.run_signals", lambda: rd.column(r, ""))
    run_sig = (np.cumsum(wire._unzigzag(d) + wire._ONE, dtype=np.uint64) - wire._ONE).view(np.int64)
    ref = take("blob.references", lambda: rd.column(r, "")).astype(np.int64)
    own = ref == 0
    own_lens = take("blob.lengths", lambda: rd.column(int(own.sum()), "")).astype(np.int64) + 1
    src = np.arange(r) - ref
    for _ in range(r.bit_length() + 1):
        src = src[src]
    lens = own_lens[(np.cumsum(own) - 1)[src]]
    take("blob.unit", lambda: rd.take(8, ""))
    take("blob.ts_firsts", lambda: rd.column(len(own_lens), ""))
    take("blob.periods", lambda: rd.column(int((own_lens >= 2).sum()), ""))
    take("blob.jitter", lambda: rd.column(int(own_lens.sum()) - len(own_lens), ""))
    is_int = np.array([s is not None for s in scales], np.bool_)
    ilens = lens[is_int[run_sig]] if r else lens
    take("blob.value_firsts", lambda: rd.column(len(ilens), ""))
    take("blob.value_deltas", lambda: rd.column(int(ilens.sum()) - len(ilens), ""))
    take("blob.float_bits", lambda: rd.column(int(lens.sum()) - int(ilens.sum()), ""))
    assert rd.at == len(blob) and [n for n, _ in out] == list(COLUMNS)
    return out


def breakdown(codec: int) -> tuple[Counter[str], Counter[str], dict[str, Counter[str]], int, int]:
    """Raw and compressed bytes per part over all batches, compressed bytes per category per trace, samples,
    batches."""
    raw: Counter[str] = Counter()
    comp: Counter[str] = Counter()
    per_trace: dict[str, Counter[str]] = defaultdict(Counter)
    cloud: dict[str, list[Any]] = {}
    n = batches = 0

    def z(b: bytes) -> int:
        return len(wire._compress(b, codec))

    for trace, cols in ten_second_batches():
        head, blob = wire.encode_columns(cols)
        seg = wire.Segment("samples", n + 1, n + len(cols), encoded=(head, blob))
        batch = wire.Batch("fleet-1", "harvester-0001", batches, [seg])
        msg = wire.encode_batch(batch, known_tables=cloud, codec=codec)
        cloud.update(wire.decode_batch(msg, tables=cloud.get).tables)
        body = wire._inflate(msg, wire.MAX_DECOMPRESSED_BYTES)
        hlen = int.from_bytes(body[:4], "little")
        parts = [("header_length", body[:4]), *header_parts(body[4 : 4 + hlen]), *blob_parts(head, blob)]
        assert b"".join(p for _, p in parts) == body
        costs = [("prefix", 4), ("frame", z(b""))]
        done = b""
        for name, p in parts:
            costs.append((name, z(done + p) - z(done)))
            done += p
            raw[name] += len(p)
        assert sum(c for _, c in costs) == len(msg)
        raw["prefix"] += 4
        t = per_trace[trace.name]
        for name, c in costs:
            comp[name] += c
            t[CATEGORY.get(name, "header")] += c
        t["samples"] += len(cols)
        t["batches"] += 1
        t["message"] += len(msg)
        n += len(cols)
        batches += 1
    return raw, comp, per_trace, n, batches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/wire_breakdown.py", description=__doc__.splitlines()[0])
    ap.add_argument("--codec", type=int, choices=(wire.CODEC_ZSTD, wire.CODEC_ZSTD_D1), default=wire.CODEC_ZSTD_D1)
    ap.add_argument("--per-trace", action="store_true", help="also each trace's bytes by category")
    a = ap.parse_args(argv)
    raw, comp, per_trace, n, batches = breakdown(a.codec)
    total = sum(comp.values())
    print(f"codec {a.codec}: {batches} batches, {n} samples, {total} bytes = {total / n:.4f} B/sample "
          f"({total / batches:.0f} B a message)")
    print(f"{'part':24s} {'raw B/msg':>10s} {'zstd B/msg':>11s} {'zstd B/sample':>14s}")
    for name, c in comp.items():
        print(f"{name:24s} {raw[name] / batches:10.1f} {c / batches:11.1f} {c / n:14.4f}")
    cats: Counter[str] = Counter()
    for name, c in comp.items():
        cats[CATEGORY.get(name, "header")] += c
    print("by category (B/sample): " + ", ".join(f"{k} {cats[k] / n:.4f}" for k in CATEGORIES))
    if a.per_trace:
        print(f"{'trace':48s} {'batches':>7s} {'samples':>8s} {'B/sample':>8s} " + " ".join(f"{k:>10s}"
                                                                                      for k in CATEGORIES))
        for trace, t in sorted(per_trace.items()):
            print(f"{trace:48s} {t['batches']:7d} {t['samples']:8d} {t['message'] / t['samples']:8.4f} "
                  + " ".join(f"{t[k] / t['samples']:10.4f}" for k in CATEGORIES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
