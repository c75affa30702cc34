"""tcmalloc instead of glibc's malloc for CPU training: the command re-runs itself once with it preloaded (Linux).

Why: every training step allocates and frees the same large tensors (a real model's logits and its vocabulary-sized
gradients take hundreds of MB). glibc serves blocks over 32 MB from fresh mmap'd memory and unmaps them when freed, so
each step page-faults them in again; tcmalloc keeps freed memory for reuse (the page faults, kernel time and step
times of both are in benchmarks/README.md).

An allocator has to be in place before the process allocates anything. From inside a script the only way is
LD_PRELOAD plus one exec of the same command line. exec keeps the PID, so torchrun and accelerate still supervise
the process. The library is the system's (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`); without it nothing
happens. SFT_HF_ALLOCATOR=system keeps glibc's malloc; SFT_HF_ALLOCATOR=/path/to/lib.so preloads that library.
The re-run also has Arrow allocate through it (ARROW_DEFAULT_MEMORY_POOL=system, unless set already).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

CHOICE = "SFT_HF_ALLOCATOR"
ARROW_POOL = "ARROW_DEFAULT_MEMORY_POOL"
_NAMES = ("tcmalloc_minimal", "tcmalloc")  # gperftools' malloc (the minimal one has no profiler)


def fast_allocator_library() -> str | None:
    """The library to preload: SFT_HF_ALLOCATOR's path, else the system's tcmalloc, else None."""
    choice = os.environ.get(CHOICE, "")
    if choice.lower() == "system":
        return None
    if choice:
        if not os.path.isfile(choice):
            raise FileNotFoundError(f"{CHOICE}={choice}: no such file (a malloc library, or 'system')")
        return choice
    for name in _NAMES:
        if found := ctypes.util.find_library(name):  # a soname such as libtcmalloc_minimal.so.4: ld.so resolves it
            return found
    return None


def use_fast_allocator() -> None:
    """Re-run this process's command line with the faster malloc preloaded, once; returns when it does not."""
    if sys.platform != "linux":
        return
    library = fast_allocator_library()
    preload = os.environ.get("LD_PRELOAD", "")
    if library is None or library in preload.split(":") or "malloc" in preload:
        return  # nothing to load, this is the re-run, or the user preloads an allocator already
    env = dict(os.environ, LD_PRELOAD=f"{library}:{preload}" if preload else library)
    # Arrow (datasets' tables) allocates through the same malloc, not its bundled mimalloc, whose per-thread heaps
    # release_free_memory cannot hand back: reading 4 M records kept 28 MB instead of 6 (docs/data.md#large-files)
    env.setdefault(ARROW_POOL, "system")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def active_allocator() -> str:
    """For the log line: the malloc library this process runs on."""
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:
        return "the system malloc"
    loaded = [p for p in preload if os.path.basename(p).split(".so")[0] in mapped]
    return loaded[0] if loaded else "the system malloc"


def release_free_memory() -> None:
    """Hands the memory malloc (tcmalloc or glibc) and Arrow keep for reuse back to the system, e.g. after reading a
    large file: a process that forks map workers next would otherwise hold it through the whole map (40 MB of
    400 k records, docs/data.md#large-files)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        process = ctypes.CDLL(None)  # the running program, with the malloc it links or preloads
    except (OSError, TypeError):  # Windows has no such handle
        return
    if hasattr(process, "MallocExtension_ReleaseFreeMemory"):  # tcmalloc, preloaded by use_fast_allocator
        process.MallocExtension_ReleaseFreeMemory()
    elif hasattr(process, "malloc_trim"):  # glibc
        process.malloc_trim(0)
