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
is byte for byte the one an uninterrupted run writes. Each file of a split set carries its own
plan line and the journal of the tensors it holds.
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


def header_bytes(writer: GGUFWriter) -> list[bytes]:
    """Header, metadata and tensor infos of each file `writer` plans (one, or a split set), as
    it writes them, padded to where the tensor data starts (the writer is left closed)."""
    from gguf.gguf_writer import WriterState

    buffers = [io.BytesIO() for _ in writer.tensors]
    writer.fout, writer.state = buffers, WriterState.EMPTY  # type: ignore[assignment]  # a file-like is all it uses
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    data = [b.getvalue() for b in buffers]
    writer.close()
    return [d + bytes(-len(d) % writer.data_alignment) for d in data]


class PartialGGUF:
    """One GGUF output to be written from `writer`'s plan (into a temporary: `open`): one file,
    or each file of a split set with its own journal; `shown` is the path messages name (the
    final output, its first file)."""

    def __init__(self, writer: GGUFWriter, shown: Path, recipe: str = ""):
        self.shown = Path(shown)
        self.shards = writer.format_shard_names  # first file's path -> every file's path
        self.headers = header_bytes(writer)
        self.align = writer.data_alignment
        self.spans: dict[str, tuple[int, int]] = {}  # name -> (offset in its file, bytes without padding)
        self.file_of: dict[str, int] = {}  # name -> index of its file in the set
        self.sizes: list[int] = []  # each file's planned end, where its journal starts
        for i, (header, infos) in enumerate(zip(self.headers, writer.tensors, strict=True)):
            at = len(header)
            for name, info in infos.items():
                self.spans[name], self.file_of[name] = (at, info.nbytes), i
                at += info.nbytes + (-info.nbytes % self.align)
            self.sizes.append(at)
        self.heads = [JOURNAL + hashlib.sha256(h + recipe.encode()).hexdigest().encode() + b"\n" for h in self.headers]
        self.names = [p.name for p in self.shards(self.shown)]
        self.written: dict[str, str] = {}  # name -> sha256 of its padded bytes
        self._f: list[BinaryIO] = []
        self._end: list[int] = []  # where each file's next journal line goes

    def shown_for(self, name: str) -> Path:
        """The final file tensor `name` goes into (for messages)."""
        return self.shown.with_name(self.names[self.file_of[name]])

    def recognises(self, path: Path) -> bool:
        """Whether the file at `path` (a split set: every file, named after it, present) carries
        a journal of this very plan (a set: at least one of its files does)."""
        paths = self.shards(Path(path))
        return all(p.exists() for p in paths) and any(_has_head(p, s, h) for p, s, h in self._each(paths))

    def _each(self, paths: list[Path]) -> list[tuple[Path, int, bytes]]:
        return list(zip(paths, self.sizes, self.heads, strict=True))

    def open(self, path: Path, resume: bool = False) -> int:
        """Start writing into `path` (the first file; a split set's others next to it; created if
        missing); with `resume`, keep the tensors whose bytes hash as their file's journal says
        (returns how many). Headers and journals are rewritten either way."""
        self.written = {}
        for i, (p, size, head) in enumerate(self._each(self.shards(Path(path)))):
            with writing(self.shown.with_name(self.names[i])):
                f = open(p, "r+b" if p.exists() else "w+b")  # noqa: SIM115 (closed by finish/close)
                self._f.append(f)
                kept = self._verified(f, i) if resume and _has_head(p, size, head) else {}
                f.truncate(size)
                f.seek(0)
                f.write(self.headers[i])
                f.seek(size)
                f.write(head + b"".join(_line(n, h) for n, h in kept.items()))
                f.flush()  # a file no tensor reaches before a kill still names its plan
                self._end.append(f.tell())
            self.written.update(kept)
        return len(self.written)

    def _verified(self, f: BinaryIO, i: int) -> dict[str, str]:
        f.seek(self.sizes[i] + len(self.heads[i]))
        kept = {}
        for raw in f.read().split(b"\n")[:-1]:  # the last piece: empty, or a line the kill cut
            try:
                entry = json.loads(raw)
                name, digest = entry["tensor"], entry["sha256"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(name, str) and self.file_of.get(name) == i and self._hash(f, name) == digest:
                kept[name] = digest
        return kept

    def _hash(self, f: BinaryIO, name: str) -> str:
        """sha256 of the tensor's padded bytes as its file holds them now."""
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
        """The open file tensor `name` goes into, at its offset."""
        assert self._f, "PartialGGUF.open() first"
        f = self._f[self.file_of[name]]
        f.seek(self.spans[name][0])
        return f

    def seal(self, name: str, padding: bytes, digest: str) -> None:
        """After a tensor's bytes: its padding, then its journal line (in its own file's journal)."""
        i = self.file_of[name]
        f = self._f[i]
        f.write(padding)
        f.seek(self._end[i])
        f.write(_line(name, digest))
        f.flush()  # the line reaches the file after the bytes it vouches for
        self._end[i] = f.tell()
        self.written[name] = digest

    def missing(self) -> list[str]:
        return [n for n in self.spans if n not in self.written]

    def finish(self) -> None:
        """Check every tensor is written, cut the journals off and close."""
        assert self._f
        if self.missing():
            raise WeightopsError(f"{self.shown}: tensors never written: {', '.join(self.missing()[:8])}")
        for i, (f, size) in enumerate(zip(self._f, self.sizes, strict=True)):
            with writing(self.shown.with_name(self.names[i])):
                f.truncate(size)
        self.close()

    def close(self) -> None:
        for f in self._f:
            f.close()
        self._f, self._end = [], []


def _has_head(path: Path, size: int, head: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(size)
            return f.read(len(head)) == head
    except OSError:
        return False


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
    with writing(first.shown_for(name), name):
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
                f"{first.shown_for(name)}: tensor {name!r} {tuple(shape)} as {qtype.name} produced {written} bytes, "
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
