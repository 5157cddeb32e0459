"""Keeping reads inside the model directory.

File names that come from inside a checkpoint (an index's shard names) and the files a
directory holds (symlinks) decide what weightops opens, hashes and copies into a release.
A name such as `../../.ssh/id_rsa` or a link to `/etc/hostname` must not make it read —
let alone publish — a file the user never gave it, so every such path goes through
`inside(root, name)`.

One layout is allowed to point out of its directory: the Hugging Face hub cache, where
`…/models--org--name/snapshots/REV/FILE` links to `../../blobs/HASH` of the same repository
folder (files `huggingface_hub` wrote, not a name any file chose).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import WeightopsError


def allowed_roots(root: Path) -> list[Path]:
    """The resolved directories that files under `root` may live in."""
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append((real.parent.parent / "blobs").resolve())
    return roots


def _within(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def inside(root: Path, name: str, what: str) -> Path:
    """`root / name`, refused (naming `what`, e.g. "index.json entry 'x'") when `name` is
    absolute, has a `..` part, or resolves (after symlinks) outside `root`."""
    if not isinstance(name, str) or not name:
        raise WeightopsError(f"{what}: a file name must be a non-empty string, not {name!r}")
    if os.path.isabs(name) or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise WeightopsError(f"{what}: {name!r} is an absolute path; only files inside {root} are read")
    if ".." in PurePosixPath(name).parts or ".." in PureWindowsPath(name).parts:
        raise WeightopsError(f"{what}: {name!r} leaves the directory ('..'); only files inside {root} are read")
    path = root / name
    check_link(root, path, what)
    return path


def check_link(root: Path, path: Path, what: str | None = None) -> None:
    """Refuse `path` (under `root`) when it resolves outside `root` through a symlink."""
    target = path.resolve()
    if not _within(target, allowed_roots(root)):
        raise WeightopsError(
            f"{what or path}: {path} is a symlink to {target}, outside {root}; weightops "
            "reads only files inside the model directory (copy the file in instead of linking)"
        )


def member(directory: Path, name: str) -> Path | None:
    """`directory/name` if it is a file that stays inside `directory`, else None (a link
    out of it is an error, not a miss: the user should hear why the file is not read)."""
    path = directory / name
    if not path.is_file():
        return None
    check_link(directory, path)
    return path


def members(directory: Path, pattern: str) -> list[Path]:
    """The files of `directory` matching `pattern`, sorted; links out of it are refused."""
    found = sorted(p for p in directory.glob(pattern) if p.is_file())
    for p in found:
        check_link(directory, p)
    return found
