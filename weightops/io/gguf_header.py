"""A GGUF file's header — metadata and tensor infos — read within the file's own size.

gguf-py's `GGUFReader` makes numpy views for every value part, so a 16 MB file of 2M token
strings took 50 s and 3.3 GB just to be inspected. This parser checks every count and
length against the bytes that remain before acting on it (a count that cannot fit is refused
at once) and keeps arrays where they lie: a string array is 8 bytes of offset per item in
memory and decoded only when an item is asked for; a number array is a numpy view of the
map. Tensor infos are checked as llama.cpp's gguf.cpp checks them (known type, at most 4
dimensions, rows whole blocks, data laid out in order at the aligned offsets it expects,
inside the file), so what weightops reads is what llama.cpp would load.
"""

from __future__ import annotations

import array
import mmap
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WeightopsError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9
# GGUF value type -> struct format of one scalar (little-endian)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_MIN_KV = 8 + 4 + 1  # empty key, type, a one-byte value
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # empty name, no dims, type, offset


class LazyArray(Sequence):
    """A GGUF array value, read from the map item by item (compares equal to a list of the
    same items, so callers treat it as one)."""

    def __init__(self, count: int, item: Callable[[int], Any]):
        self._count, self._item = count, item

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(self._count))]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(i)
        return self._item(i)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        if isinstance(other, (str, bytes)) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    # defining __eq__ leaves __hash__ None: unhashable, mutable-sequence semantics like list

    def __repr__(self) -> str:
        shown = ", ".join(repr(x) for x in self[:5])
        return f"[{shown}{', ...' if self._count > 5 else ''}] ({self._count} items)"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (the file stores it reversed)
    ggml_type: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute file offset of the data
    nbytes: int


@dataclass
class Header:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    map: mmap.mmap
    types: dict[str, int] = field(default_factory=dict)  # key -> GGUF value type (8 string, 9 array, ...)


class _Cursor:
    """Reads from the map at `pos`, refusing anything that would run past the file's end."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def fail(self, what: str) -> WeightopsError:
        return WeightopsError(f"{self.path}: damaged GGUF file: {what} (at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes, only {self.size - self.pos} remain")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string_bytes(self, what: str) -> bytes:
        n = self.scalar("<Q", f"length of {what}")
        self.need(n, what)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def text(self, what: str) -> str:
        raw = self.string_bytes(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8: {raw[:60]!r}") from None


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        return cur.scalar(_SCALARS[vtype], f"value of {key!r}")
    if vtype == _STRING:
        return _decode(cur.string_bytes(f"value of {key!r}"))
    if vtype != _ARRAY:
        raise cur.fail(f"key {key!r} has unknown value type {vtype}")
    itype = cur.scalar("<I", f"item type of {key!r}")
    count = cur.scalar("<Q", f"item count of {key!r}")
    if itype in _SCALARS:
        import numpy as np

        size = struct.calcsize(_SCALARS[itype])
        cur.need(count * size, f"{count} items of {key!r}")
        values = np.frombuffer(cur.buf, dtype=_NUMPY[itype], count=count, offset=cur.pos)
        cur.pos += count * size
        return LazyArray(count, lambda i: values[i].item())
    if itype != _STRING:
        raise cur.fail(f"key {key!r} is an array of type {itype}, which GGUF readers do not support")
    cur.need(count * 8, f"{count} strings of {key!r}")  # each has at least its 8-byte length
    starts = array.array("Q")
    for _ in range(count):
        starts.append(cur.pos)
        n = cur.scalar("<Q", f"length of an item of {key!r}")
        cur.need(n, f"an item of {key!r}")
        cur.pos += n
    buf = cur.buf

    def item(i: int) -> str:
        start = starts[i]
        (n,) = struct.unpack_from("<Q", buf, start)
        return _decode(buf[start + 8 : start + 8 + n])

    return LazyArray(count, item)


def read_header(path: Path) -> Header:
    """Parse and check `path`'s header; tensor data stays in the file (see `Header.map`)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise WeightopsError(f"{path}: not a GGUF file (only {size} bytes)")
        # private (copy on write), as the safetensors reader maps: an F32 tensor is a view of the
        # map, and a consumer that writes into it changes its own copy, never the file
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    cur = _Cursor(path, buf)
    if buf[:4] != MAGIC:
        raise WeightopsError(f"{path}: not a little-endian GGUF file (magic {buf[:4]!r})")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in VERSIONS:
        raise cur.fail(f"version {version} (readable: {', '.join(map(str, VERSIONS))})")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "key count")
    cur.need(n_kv * _MIN_KV + n_tensors * _MIN_TENSOR_INFO, f"{n_kv} keys and {n_tensors} tensor infos")

    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.text("a key")
        if key in metadata:
            raise cur.fail(f"key {key!r} appears twice")
        types[key] = cur.scalar("<I", f"type of {key!r}")
        metadata[key] = _value(cur, types[key], key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")

    raw_infos = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.text("a tensor name")
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.scalar("<I", f"dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (llama.cpp allows {MAX_DIMS})")
        dims = [cur.scalar("<Q", f"dimensions of {name!r}") for _ in range(n_dims)]
        raw_type = cur.scalar("<I", f"type of {name!r}")
        offset = cur.scalar("<Q", f"data offset of {name!r}")
        raw_infos.append((name, dims, raw_type, offset))

    data_start = -(-cur.pos // alignment) * alignment
    tensors, expected = [], 0
    for name, dims, raw_type, offset in raw_infos:
        where = f"{path}: tensor {name!r}"
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise WeightopsError(f"{where}: unknown GGML type {raw_type}") from None
        numel = 1
        for d in dims:
            numel *= d
        if numel >= 2**63 or any(d >= 2**63 for d in dims):
            raise WeightopsError(f"{where}: dimensions {dims} overflow")
        if dims and dims[0] % block:
            raise WeightopsError(f"{where}: rows of {dims[0]} values are not whole {qtype.name} blocks of {block}")
        if offset != expected:
            raise WeightopsError(
                f"{where}: data offset {offset}, llama.cpp expects {expected} (tensors are "
                f"stored in order, each padded to {alignment} bytes)"
            )
        nbytes = numel // block * type_size
        if data_start + offset + nbytes > size:
            raise WeightopsError(
                f"{where}: data ends at byte {data_start + offset + nbytes}, past the end of "
                f"the file ({size} bytes); the file is truncated"
            )
        expected += -(-nbytes // alignment) * alignment
        tensors.append(TensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, nbytes))
    return Header(path, version, metadata, tensors, buf, types)
