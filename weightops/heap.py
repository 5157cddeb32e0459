"""The C heap of a weightops command's process: one malloc arena for all its threads."""

from __future__ import annotations

import ctypes
import os

_M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_malloc_arena() -> None:
    """Have glibc's malloc serve every thread of this process from one heap (mallopt
    M_ARENA_MAX = 1). Called by the command-line entry points only: a library user's process
    keeps its own setting, and so does a MALLOC_ARENA_MAX in the environment.

    Why: glibc gives each thread that allocates a heap of its own, and each heap keeps what its
    thread freed; the CPU workers' fresh chunk temporaries (`devices.cpu_pool`) then sit in
    three heaps instead of one. A Q4_K_M export of the 16-layer hidden-2048 checkpoint peaked at
    364-367 MB with them, 336 MB with one heap, wall unchanged within this machine's noise
    (benchmarks/README.md). Other C libraries (musl, macOS) have no such setting, and nothing
    is changed there."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):  # no C library to open by that name (Windows)
        return
    if mallopt is not None:
        mallopt(_M_ARENA_MAX, 1)
