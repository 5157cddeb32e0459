"""Atomic outputs: everything is written into a hidden temporary sibling and renamed into
place only when the whole stream ended cleanly, so a crash never leaves a file set that
looks complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import WeightopsError


def check_output(output: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse outputs that would destroy data: an input, a path inside an input, an input
    inside the output, or an existing non-empty output without `force`."""
    out = Path(output).resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if out == src or src in out.parents:
            raise WeightopsError(f"output {output} is, or is inside, the input {inp}; choose another output path")
        if out in src.parents:
            raise WeightopsError(f"input {inp} lies inside the output {output}; writing there would destroy it")
    if out.exists() and not force:
        if out.is_file() or any(out.iterdir()):
            raise WeightopsError(f"output {output} exists and is not empty; pass --force to replace it")


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


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (allowed by --force) is moved aside first
    and deleted only after the new one is in place."""
    trash = None
    if final.exists() or final.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, trash / final.name)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; on success it becomes `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success it is renamed to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
