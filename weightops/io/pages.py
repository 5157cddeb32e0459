"""Hints to the kernel about pages we are done with.

Streaming a model through a process must not leave it in memory: mapped input pages are
dropped from the process once a tensor is consumed, and a written output's pages are
dropped from the page cache once it is durable.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if hasattr(mmap, "MADV_DONTNEED") else None


def drop_mapped(address: int, length: int) -> None:
    """madvise(DONTNEED) the whole pages inside [address, address + length) of a private,
    never-written file mapping: they leave RSS and are read from the file again if touched."""
    if _libc is None:
        return
    page = mmap.PAGESIZE
    begin = -(-address // page) * page  # whole pages only: neighbours stay
    end = (address + length) // page * page
    if end > begin:
        _libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), mmap.MADV_DONTNEED)


def drop_cache(fd: int) -> None:
    """Tell the kernel we will not read these pages again (keeps page cache from piling up)."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
