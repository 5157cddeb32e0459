"""sha256 manifests: of every file, and of every tensor's stored bytes.

File hashes prove a download or copy; tensor hashes survive re-serialisation (pickles
embed serializer details, shards may be split differently), so they are the stable proof
that two checkpoints carry the same weights. No timestamps: the same inputs give the same
manifest, so it can be published and reproduced.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import progress
from ..errors import WeightopsError, names_file, shown
from ..io.checkpoint import open_checkpoint
from ..io.gguf_split import first_split, set_files
from ..io.paths import check_link
from ..stream import TensorRef

MANIFEST = "weightops-manifest.json"
_CHUNK = 8 << 20


def manifest_path(path: Path) -> Path:
    """Beside a file (a GGUF split set's first file), inside a directory."""
    path = first_split(path)
    return path / MANIFEST if path.is_dir() else path.with_name(path.name + "." + MANIFEST)


def sha256_file(path: Path, bar=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()


def _files(path: Path) -> list[Path]:
    """The files a manifest covers. A symlink that leads out of the directory is refused, not
    followed (it would hash — and certify — a file that is not part of the checkpoint, e.g.
    /etc/hostname) and not skipped (the manifest would then silently not cover a file that
    ships with the directory, as any copy that follows links would). A GGUF split set is every
    file of the set (checked as a whole)."""
    path = first_split(path)
    if path.is_file():
        return set_files(path)
    found = sorted(
        p
        for p in path.rglob("*")
        if (p.is_file() or p.is_symlink())
        and p.name != MANIFEST
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    for p in found:
        check_link(path, p, f"{path}: cannot hash {p.relative_to(path)}")
    return [p for p in found if p.is_file()]


def _root(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def file_hashes(path: Path, hasher=None) -> dict:
    """{name: {sha256, size}} of every file; `hasher(file, bar)` replaces sha256_file (the job
    runner passes its stat cache)."""
    hasher = hasher or sha256_file
    files = _files(path)
    with progress.bar(sum(f.stat().st_size for f in files), "hashing files") as b:
        return {str(f.relative_to(_root(path))): {"sha256": hasher(f, b), "size": f.stat().st_size} for f in files}


def sha256_tensor(ref: TensorRef) -> str:
    """sha256 of a tensor's stored bytes; read straight from its file where they lie there as
    stored (safetensors), so hashing neither maps the model into memory nor needs torch."""
    h = hashlib.sha256()
    if ref.span is None:
        h.update(ref.raw().data)
        return h.hexdigest()
    path, offset = ref.span
    remaining = ref.nbytes
    with open(path, "rb") as f:
        f.seek(offset)
        while remaining:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                raise WeightopsError(f"{path}: file ends inside tensor {ref.name!r}")
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


def tensor_hashes(path: Path) -> dict:
    root = _root(path)
    ckpt = open_checkpoint(path)
    tensors = {}
    for ref in progress.iterate(ckpt.tensors, len(ckpt.tensors), "hashing tensors"):
        tensors[ref.name] = {
            "sha256": sha256_tensor(ref),
            "shape": list(ref.shape),
            "dtype": ref.stored_type,
            "file": os.path.relpath(ref.source, root),
        }  # the name in the directory, links unresolved
        ref.release()
    return tensors


def compute(path: str | Path, hasher=None) -> dict:
    """The manifest document of a checkpoint directory or file."""
    path = Path(path)
    return {"manifest_version": 1, "files": file_hashes(path, hasher), "tensors": tensor_hashes(path)}


def diff(expected: dict, actual: dict) -> list[str]:
    """Every file and tensor that differs, is missing, or is new."""
    problems = []
    for kind in ("files", "tensors"):
        want, have = expected.get(kind, {}), actual.get(kind, {})
        for name in sorted(want.keys() | have.keys()):
            label = f"{'file' if kind == 'files' else 'tensor'} {shown(name)}"
            if name not in have:
                problems.append(f"{label}: missing")
            elif name not in want:
                problems.append(f"{label}: not in the manifest")
            elif want[name]["sha256"] != have[name]["sha256"]:
                problems.append(f"{label}: sha256 {have[name]['sha256'][:16]}… expected {want[name]['sha256'][:16]}…")
    return problems


@names_file("weightops manifest")
def _read_manifest(path: Path) -> dict:
    doc = json.loads(path.read_text(encoding="utf-8"))
    well_formed = isinstance(doc, dict) and all(
        isinstance(doc.get(kind), dict)
        and all(isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in doc[kind].values())
        for kind in ("files", "tensors")
    )
    if not well_formed:
        raise WeightopsError(
            f'{shown(path)}: not a weightops manifest (expected "files" and "tensors" '
            'objects mapping names to {"sha256": ...})'
        )
    return doc
