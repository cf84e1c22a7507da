"""What numpy's small-block data cache holds in a running process (this one or another the caller may trace).

numpy keeps freed array data blocks under 1,024 bytes in a static table, `datacache`: 1,024 buckets (one per exact
size in bytes), each a count of cached pointers and room for 7 (numpy/_core/src/multiarray/alloc.c, `cache_bucket`).
No API reads it and tracemalloc cannot see it (numpy untracks a block before caching it), so this reads the table
from memory: its address from the symbol table of the numpy C module the process mapped (/proc/PID/maps), its
bytes from /proc/PID/mem (a child of the caller, or the caller itself). agent/numpy_memory.py is why it matters.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

NBUCKETS = 1024
NCACHE = 7
_BUCKET = struct.Struct(f"<Q{NCACHE}Q")  # npy_uintp available; void *ptrs[NCACHE] (64-bit little-endian)
_MODULE = re.compile(r"^([0-9a-f]+)-[0-9a-f]+ \S+ ([0-9a-f]+) \S+ \S+ +(\S*_multiarray_umath\S*\.so)$", re.M)


@dataclass(frozen=True)
class CacheFill:
    bytes: int  # the data blocks held: each bucket's size times its count
    blocks: int
    sizes: int  # buckets holding at least one block

    def to_dict(self) -> dict[str, int]:
        return {"bytes": self.bytes, "blocks": self.blocks, "sizes": self.sizes}


def _symbol(path: str) -> tuple[int, int]:
    """`datacache`'s address in the module's file and the lowest address the file's segments load at."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            raise LookupError(f"{path} is stripped: no .symtab to find numpy's datacache in")
        found = symtab.get_symbol_by_name("datacache")  # type: ignore[attr-defined]
        if not found:
            raise LookupError(f"{path} has no datacache symbol (numpy's cache moved or was renamed)")
        size = found[0]["st_size"]
        if size != NBUCKETS * _BUCKET.size:
            raise LookupError(f"{path}'s datacache is {size} bytes, not numpy's {NBUCKETS} buckets of {NCACHE}")
        low = min(seg["p_vaddr"] for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD")
        return int(found[0]["st_value"]), int(low)


def fill(pid: int | str = "self") -> CacheFill:
    """The cache's content in process `pid` now (it changes as the process runs: a snapshot, read unlocked)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    starts = [(int(m.group(1), 16), m.group(3)) for m in _MODULE.finditer(maps) if int(m.group(2), 16) == 0]
    if not starts:
        raise LookupError(f"process {pid} has not loaded numpy's C module")
    base, path = starts[0]
    value, low = _symbol(path)
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(base - low + value)
        table = mem.read(NBUCKETS * _BUCKET.size)
    total = blocks = sizes = 0
    for size, bucket in enumerate(_BUCKET.iter_unpack(table)):
        available = bucket[0]
        if available > NCACHE:
            raise ValueError(f"bucket {size} holds {available} of at most {NCACHE}: not numpy's datacache")
        total += size * available
        blocks += available
        sizes += available > 0
    return CacheFill(total, blocks, sizes)
