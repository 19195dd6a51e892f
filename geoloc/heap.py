"""glibc's heap settings for processes whose loops allocate many large numpy blocks.

Torch-free on purpose: the console script asks `heap_exec` before any command runs, so
importing this costs every command (an ingest, `--help`) nothing; the same settings from
`geoloc.compute` imported torch (~660 MB resident) into every `geoloc` process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameters (malloc.h)


def bound_heap_growth(mmap_threshold: int = 32 << 20) -> bool:
    """Keep a long loop of same-sized numpy/torch blocks at flat resident memory (glibc only).

    glibc raises its mmap threshold each time a large block is freed, so later blocks come from
    the heap, which fragments across per-thread arenas: rerank's test table at 10^6 images,
    when it still scored 1,561 dense blocks of 64 x 62,154 classes, grew ~15 MB a block and was
    OOM-killed at 23 GB (a flat head's blocks are still dense).
    A fixed threshold of 32 MB and one arena keep it at ~3 GB at the same speed (an 8 MB
    threshold is flat too but 50% slower: every block array is page-faulted anew). Allocation
    only: no number changes. Returns whether glibc took the settings (False elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1)


HEAP_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
"""`bound_heap_growth` as glibc's environment, which it reads before the first allocation:
one arena and a fixed 32 MB mmap threshold. Set at run time, the arena limit comes too late
(numpy's BLAS threads already hold theirs): the 10^6 test table still grew ~3 MB a block; with
these variables set at start it stays at ~3 GB (docs/scale.md)."""
HEAP_COMMANDS = ("rerank", "evaluate")
"""`geoloc` commands whose block loops get `HEAP_ENV` (the console script re-executes once)."""


def heap_exec(
    argv: list[str], environ: dict[str, str], platform_name: str = sys.platform
) -> dict[str, str] | None:
    """The environment to re-execute `argv` (a `geoloc` command line) with so glibc starts with
    `HEAP_ENV`, or None: not Linux, not a `HEAP_COMMANDS` command, or the user set
    MALLOC_ARENA_MAX already (theirs wins; also what stops a second re-execution)."""
    if platform_name != "linux" or len(argv) < 2 or argv[1] not in HEAP_COMMANDS:
        return None
    if "MALLOC_ARENA_MAX" in environ:
        return None
    return {**environ, **HEAP_ENV}
