"""A GGUF file written tensor by tensor at its planned offsets, in a temporary that a later
run can continue after a kill.

Every byte of a GGUF file follows from its plan: header, metadata and tensor infos, then each
tensor at its offset, padded to the alignment. So a temporary holds, after the file's planned
end, a small journal: one line naming the plan (sha256 of the header bytes and of a `recipe`,
the caller's account of what else decides the tensor bytes: source files, options, version),
then one line per tensor written, its name and the sha256 of its padded bytes, appended only
after those bytes. A resuming run trusts a tensor only when its bytes hash now as journaled
(a tensor cut short by the kill has no line; a temporary or journal changed since is caught),
writes the rest, and cuts the journal off before the file is published: the published file
is byte for byte the one an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import WeightopsError, writing

if TYPE_CHECKING:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

JOURNAL = b"weightops-gguf-journal 1 "
_READ = 1 << 24  # bytes hashed at a time when a journal is checked


def header_bytes(writer: GGUFWriter) -> bytes:
    """Header, metadata and tensor infos as `writer` writes them, padded to where the tensor
    data starts (the writer is left closed)."""
    from gguf.gguf_writer import WriterState

    buffer = io.BytesIO()
    writer.fout, writer.state = [buffer], WriterState.EMPTY  # type: ignore[list-item]  # a file-like is all it uses
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    data = buffer.getvalue()
    writer.close()
    return data + bytes(-len(data) % writer.data_alignment)


class PartialGGUF:
    """One GGUF file to be written from `writer`'s plan (into a temporary: `open`); `shown` is
    the path messages name (the final output)."""

    def __init__(self, writer: GGUFWriter, shown: Path, recipe: str = ""):
        self.shown = Path(shown)
        self.header = header_bytes(writer)
        self.align = writer.data_alignment
        self.spans: dict[str, tuple[int, int]] = {}  # name -> (offset, bytes without padding)
        at = len(self.header)
        for name, info in writer.tensors[0].items():
            self.spans[name] = (at, info.nbytes)
            at += info.nbytes + (-info.nbytes % self.align)
        self.size = at
        self.head = JOURNAL + hashlib.sha256(self.header + recipe.encode()).hexdigest().encode() + b"\n"
        self.written: dict[str, str] = {}  # name -> sha256 of its padded bytes
        self._f: BinaryIO | None = None
        self._end = 0  # where the next journal line goes

    def recognises(self, path: Path) -> bool:
        """Whether the file at `path` carries a journal of this very plan."""
        try:
            with open(path, "rb") as f:
                f.seek(self.size)
                return f.read(len(self.head)) == self.head
        except OSError:
            return False

    def open(self, path: Path, resume: bool = False) -> int:
        """Start writing into `path` (created if missing); with `resume`, keep the tensors whose
        bytes hash as the file's journal says (returns how many). Header and journal are
        rewritten either way."""
        path = Path(path)
        with writing(self.shown):
            self._f = f = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115 (closed by finish/close)
            kept = self._verified(f) if resume and self.recognises(path) else {}
            f.truncate(self.size)
            f.seek(0)
            f.write(self.header)
            f.seek(self.size)
            f.write(self.head + b"".join(_line(n, h) for n, h in kept.items()))
            self._end = f.tell()
        self.written = kept
        return len(kept)

    def _verified(self, f: BinaryIO) -> dict[str, str]:
        f.seek(self.size + len(self.head))
        kept = {}
        for raw in f.read().split(b"\n")[:-1]:  # the last piece: empty, or a line the kill cut
            try:
                entry = json.loads(raw)
                name, digest = entry["tensor"], entry["sha256"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(name, str) and name in self.spans and self._hash(f, name) == digest:
                kept[name] = digest
        return kept

    def _hash(self, f: BinaryIO, name: str) -> str:
        """sha256 of the tensor's padded bytes as the file holds them now."""
        offset, nbytes = self.spans[name]
        size = nbytes + (-nbytes % self.align)
        hasher = hashlib.sha256()
        f.seek(offset)
        while size > 0:
            chunk = f.read(min(size, _READ))
            if not chunk:
                return ""
            hasher.update(chunk)
            size -= len(chunk)
        return hasher.hexdigest()

    def seek(self, name: str) -> BinaryIO:
        """The open file, at tensor `name`'s offset."""
        assert self._f is not None, "PartialGGUF.open() first"
        self._f.seek(self.spans[name][0])
        return self._f

    def seal(self, name: str, padding: bytes, digest: str) -> None:
        """After a tensor's bytes: its padding, then its journal line."""
        assert self._f is not None
        self._f.write(padding)
        self._f.seek(self._end)
        self._f.write(_line(name, digest))
        self._f.flush()  # the line reaches the file after the bytes it vouches for
        self._end = self._f.tell()
        self.written[name] = digest

    def missing(self) -> list[str]:
        return [n for n in self.spans if n not in self.written]

    def finish(self) -> None:
        """Check every tensor is written, cut the journal off and close."""
        assert self._f is not None
        if self.missing():
            raise WeightopsError(f"{self.shown}: tensors never written: {', '.join(self.missing()[:8])}")
        with writing(self.shown):
            self._f.truncate(self.size)
        self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def write_tensor(
    files: Sequence[PartialGGUF],
    name: str,
    shape: Sequence[int],
    qtype: GGMLQuantizationType,
    pieces: Iterable[np.ndarray],
) -> str:
    """Write one tensor's stored bytes (`pieces`, in order) at its offset in each of `files` (one
    encoding feeding every output that has the tensor in this type), padded, and journal it;
    returns the sha256 of its padded bytes."""
    import numpy as np

    first = files[0]
    nbytes = first.spans[name][1]
    hasher = hashlib.sha256()
    with writing(first.shown, name):
        outs = [f.seek(name) for f in files]
        written = 0
        for piece in pieces:
            data = np.ascontiguousarray(piece).reshape(-1).view(np.uint8).data
            hasher.update(data)
            for out in outs:
                out.write(data)
            written += len(data)
            del piece, data
        if written != nbytes:
            raise WeightopsError(
                f"{first.shown}: tensor {name!r} {tuple(shape)} as {qtype.name} produced {written} bytes, "
                f"expected {nbytes}"
            )
        padding = bytes(-nbytes % first.align)
        hasher.update(padding)
        digest = hasher.hexdigest()
        for f in files:
            f.seal(name, padding, digest)
    return digest


def _line(name: str, digest: str) -> bytes:
    return json.dumps({"tensor": name, "sha256": digest}).encode() + b"\n"
