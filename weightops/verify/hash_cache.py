"""A stat cache of file sha256s, so a resumed job rehashes only the files that changed.

The job runner decides whether a step is complete from the hashes of what is on disk now,
never from a manifest a directory carries. Hashing a 13 GB model on every `--resume` would
be slow, so each digest is stored with the file's (size, mtime_ns, ctime_ns, inode, device)
and reused while all five are unchanged.

What is assumed: a write to a file changes its mtime and ctime (ctime cannot be set back by
`touch`, so restoring an mtime does not hide an edit), unless it lands in the same timestamp
tick as the stamp already recorded. That tick is taken to be at most 20 ms where timestamps
have sub-second parts (ext4, xfs, btrfs and tmpfs stamp with the kernel's coarse clock, one
jiffy), and at most 2 s where they are whole seconds (FAT, ext3, HFS+); the file system's
clock is taken to agree with this machine's within that tick. So a digest is reused only if
the file's newest stamp was already a tick older than the moment hashing began ("settled",
as git's racy-index rule); a file hashed within a tick of its last write is hashed again the
next time it is needed, once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..io import outputs
from . import manifest

_FINE_TICK_NS = 20_000_000
_COARSE_TICK_NS = 2_000_000_000


def _now_ns() -> int:
    return time.time_ns()


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _settled(st: os.stat_result, started_ns: int) -> bool:
    """Whether any later write would show in the stamp (see the module docstring)."""
    whole_seconds = st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0
    tick = _COARSE_TICK_NS if whole_seconds else _FINE_TICK_NS
    return max(st.st_mtime_ns, st.st_ctime_ns) + tick < started_ns


class HashCache:
    """sha256 of files by path, kept in a JSON file that only weightops writes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            files = json.loads(self.path.read_text())["files"]
            self.entries: dict[str, dict] = {
                k: v for k, v in files.items() if isinstance(v, dict) and v.keys() == {"stat", "sha256", "settled"}
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet, or damaged: only a cache
            self.entries = {}

    def sha256(self, file: Path, bar=None) -> str:
        """The file's sha256 as it is now; `bar` (a progress bar) advances by its size either way."""
        key = str(Path(file).absolute())
        before = os.stat(key)
        entry = self.entries.get(key)
        if entry and entry["stat"] == _stamp(before) and entry["settled"]:
            if bar is not None:
                bar.update(before.st_size)
            return entry["sha256"]
        started = _now_ns()
        digest = manifest.sha256_file(Path(key), bar)
        after = os.stat(key)
        if _stamp(after) == _stamp(before):
            self.entries[key] = {"stat": _stamp(before), "sha256": digest, "settled": _settled(before, started)}
        else:  # written while it was read: the digest may match neither version, so keep nothing
            self.entries.pop(key, None)
        return digest

    def save(self) -> None:
        """Write the cache, dropping entries of files that are gone."""
        self.entries = {k: v for k, v in self.entries.items() if os.path.isfile(k)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        outputs.remove(self.path, "stat cache", announce=False)  # bookkeeping: replaced without a note
        with outputs.Output(self.path, kind="file").writing() as tmp:
            tmp.write_text(json.dumps({"files": self.entries}, indent=1, sort_keys=True) + "\n")
