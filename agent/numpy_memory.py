"""The agent's threads allocate numpy's array data without numpy's small-block cache.

numpy keeps up to 7 freed data blocks of every exact size under 1,024 bytes and never hands them back (its
`datacache`, numpy/_core/src/multiarray/alloc.c): up to 3.7 MB that fills as the sizes that occur widen. In the
agent they do, slowly: the decoder's masks and columns are as long as a batch, or as a PGN's share of it, and a bus
at 1,500 frames/s makes batches of every length; a soak found 1.16 MB held in 619 of the 1,024 sizes after 44
minutes and still filling after an hour (docs/benchmarks.md, "Issue 15, fourth session"). The allocator under it
(jemalloc, as the unit preloads it) caches small blocks better and gives pages back, so the cache only holds memory.

numpy's own way to change how array data is allocated (NEP 49) is a handler in a context variable
(`PyDataMem_SetHandler`); this makes one whose functions are Python's raw allocator (`PyMem_GetAllocator`: malloc,
calloc, realloc, free, as numpy's default uses under its cache) and sets it in the context each of the agent's
threads runs in (`thread`). numpy's C API is reached through its published function table (`_ARRAY_API`, slot 304,
fixed since numpy 1.22). Where any of it is missing the threads run with numpy's default and `reason` says why.

One assumption beyond C: numpy calls a handler's free as `free(ctx, ptr, size)` and Python's raw free takes
`(ctx, ptr)`. Every C calling convention Linux uses on the machines we ship to (x86-64 System V, AArch64, 32-bit
Arm) passes those in registers and leaves them to the caller, so the extra argument is never read.
"""

from __future__ import annotations

import contextvars
import ctypes
import importlib
import threading
import tracemalloc
from collections.abc import Callable
from typing import Any

NAME = "harvester_uncached"  # what `numpy._core.multiarray.get_handler_name()` reads in the agent's threads
_SET_HANDLER_SLOT = 304  # numpy/_core/code_generators/numpy_api.py: 'PyDataMem_SetHandler': (304, ...)
_PYMEM_DOMAIN_RAW = 0
_C_MODULE = "numpy._core._multiarray_umath"


class _Allocator(ctypes.Structure):
    """numpy's PyDataMemAllocator; Python's PyMemAllocatorEx has the same fields (free's arity aside)."""

    _fields_ = [("ctx", ctypes.c_void_p), ("malloc", ctypes.c_void_p), ("calloc", ctypes.c_void_p),
                ("realloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]


class _Handler(ctypes.Structure):
    """numpy's PyDataMem_Handler (numpy/_core/include/numpy/ndarraytypes.h)."""

    _fields_ = [("name", ctypes.c_char * 127), ("version", ctypes.c_uint8), ("allocator", _Allocator)]


_CAPSULE_NAME = ctypes.c_char_p(b"mem_handler")  # numpy checks a handler capsule's name; the capsule keeps a pointer
_handler: _Handler | None = None  # made once and never freed: arrays hold its capsule for as long as they live
_capsule: Any = None
_lock = threading.Lock()
reason: str | None = None  # why the cache is on in the agent's threads; None when it is off


def _make() -> Any:
    """The handler's capsule, made on first use; None (and `reason` set) where it cannot be."""
    with _lock:
        return _capsule if _capsule is not None or reason is not None else _make_locked()


def _make_locked() -> Any:
    global _handler, _capsule, reason
    if tracemalloc.is_tracing():
        # Python's raw allocator is then tracemalloc's hook, which would outlive tracemalloc.stop() in the handler.
        reason = "tracemalloc is tracing"
        return None
    try:
        api = getattr(importlib.import_module(_C_MODULE), "_ARRAY_API", None)
    except ImportError as e:
        reason = f"numpy's C module not found ({e})"
        return None
    if api is None:
        reason = "numpy publishes no C API table"
        return None
    raw = _Allocator()
    _capi("PyMem_GetAllocator", None, ctypes.c_int, ctypes.POINTER(_Allocator))(_PYMEM_DOMAIN_RAW, ctypes.byref(raw))
    handler = _Handler(NAME.encode(), 1, raw)
    new_capsule = _capi("PyCapsule_New", ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    capsule = new_capsule(ctypes.addressof(handler), _CAPSULE_NAME, None)
    # The struct and the name the capsule points into must outlive every array made with it, including those the
    # interpreter frees after this module's globals at exit: one reference each that is never given back.
    incref = _capi("Py_IncRef", None, ctypes.py_object)
    for keep in (handler, _CAPSULE_NAME):
        incref(keep)
    _handler, _capsule = handler, capsule
    return _capsule


def _capi(name: str, restype: Any, *argtypes: Any) -> Any:
    """A function of Python's C API with its own prototype (not ctypes.pythonapi's shared attributes, which other
    code may set differently). PYFUNCTYPE: called with the GIL held, as these must be."""
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, ctypes.pythonapi))


def _set_handler() -> None:
    """numpy allocates without its cache in the calling context from now on; where it cannot, `reason` says why
    and numpy's default stays (the agent runs either way)."""
    global reason
    capsule = _make()
    if capsule is None:
        return
    try:
        _set(capsule)
    except Exception as e:  # a numpy whose C API is not what slot 304 says: never seen, never fatal
        with _lock:
            reason = f"numpy refused the handler ({type(e).__name__}: {e})"


def _set(capsule: Any) -> None:
    get_pointer = _capi("PyCapsule_GetPointer", ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)
    api = importlib.import_module(_C_MODULE)._ARRAY_API
    table = ctypes.cast(get_pointer(api, None), ctypes.POINTER(ctypes.c_void_p))
    set_handler = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(table[_SET_HANDLER_SLOT])
    set_handler(capsule)  # returns the previous handler; a failure raises (py_object restype and a NULL result)


def current() -> str:
    """The name of the handler numpy allocates new arrays with in this thread's context."""
    from numpy._core import multiarray

    return str(multiarray.get_handler_name())


def thread(target: Callable[[], object], name: str) -> threading.Thread:
    """A daemon thread running `target` in a context of its own (a copy of the caller's) where numpy allocates
    without its small-block cache. A context can be entered by one thread at a time, hence a copy per thread; the
    caller's own context is left as it was."""
    ctx = contextvars.copy_context()
    ctx.run(_set_handler)
    return threading.Thread(target=ctx.run, args=(target,), name=name, daemon=True)


def status() -> str:
    """For the agent's start line: whether the cache is off in its threads, and if not why."""
    _make()
    return "numpy small-block cache off" if reason is None else f"numpy small-block cache on ({reason})"
