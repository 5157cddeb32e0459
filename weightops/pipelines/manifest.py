"""`weightops manifest create` / `check`: a checkpoint's sha256 manifest written beside it, and
recomputed and compared later (the hashing lives in `verify.manifest`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MismatchError, WeightopsError
from ..io.outputs import Output
from ..verify.manifest import _read_manifest, compute, diff, file_hashes, manifest_path, tensor_hashes


def create_manifest(path: str | Path, hasher=None) -> Path:
    """Write the manifest next to (file) or into (directory) the checkpoint, atomically. An
    earlier manifest weightops wrote is replaced; any other file of that name is refused."""
    out = Output(manifest_path(Path(path)), kind="file", force=True, what="manifest")
    doc = compute(path, hasher)
    with out.writing() as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return out.path


def check_manifest(path: str | Path) -> dict:
    """Recompute and compare; raises MismatchError (exit 3) naming everything that differs."""
    mpath = manifest_path(Path(path))
    if not mpath.is_file():
        raise WeightopsError(f"{mpath}: no manifest; create one with `weightops manifest create {path}`")
    expected = _read_manifest(mpath)
    path = Path(path)
    actual = {"files": file_hashes(path)}
    problems = []
    try:
        actual["tensors"] = tensor_hashes(path)
    except WeightopsError as e:  # a damaged file: report it with the file differences
        actual["tensors"] = expected.get("tensors", {})
        problems.append(f"tensors unreadable: {e}")
    problems = diff(expected, actual) + problems
    if problems:
        raise MismatchError(f"{path}: {len(problems)} difference(s) from {mpath.name}:\n  " + "\n  ".join(problems))
    return actual
