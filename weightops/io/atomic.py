"""Durability for atomic publishing (`io.outputs`): flush a written file set before the rename
that makes it visible, so a crash never leaves a published output with missing data."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_tree(path: Path) -> None:
    """Flush file contents (and directory entries) so the rename publishes durable data."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(path if path.is_dir() else path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
