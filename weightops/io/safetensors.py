"""safetensors files: a lazy memory-mapped reader and a streaming writer.

The reader maps each file once and hands out zero-copy tensor views of it; once a writer
has consumed a tensor, `release()` drops its pages from the process (madvise), so mapped
inputs do not pile up in RSS. (`safetensors.safe_open` copies every tensor out of its map
and gives no such control, hence our own header parsing — validated against the library
by the tests.)

The writer lays out the header exactly as `safetensors.torch.save_file` does (tensors
sorted by dtype, largest first, then by name; compact JSON padded to 8 bytes), so our
files are byte-identical to the library's, yet it writes one tensor at a time instead of
needing the whole shard in memory. The layout is planned before any data (`PlannedFile`),
so tensors may come in any order, each written at its offset; `write_safetensors` asks for
them in name order, so tensors that one computation produces together (a bitsandbytes
weight and its scales, which differ in dtype) are asked for together, not a dtype section
apart.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .. import dtypes
from ..errors import WeightopsError, names_file, shown, writing
from ..stream import TensorRef, tensor_bytes
from .pages import drop_cache

if TYPE_CHECKING:
    import torch

# safetensors' Dtype enum order; its serializer sorts by this, descending.
_DTYPE_ORDER = [
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "F64",
    "I64",
    "U64",
]


_MAX_HEADER = 100_000_000  # the library's MAX_HEADER_SIZE
_USIZE = 2**64 - 1
# Dtypes the safetensors library knows but weightops does not compute with (sub-byte and
# exotic floats, complex): named in the refusal rather than called unknown.
_KNOWN_ELSEWHERE = {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"}


def _no_duplicates(path: Path):
    """json object_pairs_hook: of two equal keys the last would silently win."""

    def hook(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise WeightopsError(f"{path}: safetensors header has the key {k!r} twice")
            out[k] = v
        return out

    return hook


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _is_usize(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _USIZE


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (header, data start offset).

    The rules are the safetensors library's own (safetensors/src/tensor.rs, `read_metadata`
    and `Metadata::validate`), so weightops accepts exactly the files it accepts: a header
    length within 100 MB and the file; a UTF-8 JSON object whose values are tensor infos
    (`dtype` a known name, `shape` a list of sizes, `data_offsets` [begin, end]) plus an
    optional `__metadata__` of strings; windows that, sorted, run contiguously from 0 with
    end >= begin, each exactly numel x itemsize bytes; and the data ending where the file
    ends. Stricter only where the library would silently drop data: a key given twice. A
    file shorter than its header promises is reported with the tensors it cuts off.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise WeightopsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > _MAX_HEADER:
            raise WeightopsError(f"{path}: safetensors header length {n} is over the library's limit of {_MAX_HEADER}")
        if n > size - 8:
            raise WeightopsError(
                f"{path}: header length {n} exceeds the file size {size}; file truncated or not safetensors"
            )
        raw = f.read(n)
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path), parse_constant=_refuse_constant
        )
    except ValueError as e:
        raise WeightopsError(f"{path}: unreadable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise WeightopsError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise WeightopsError(f"{path}: __metadata__ must be an object of strings, not {json.dumps(meta)[:200]}")
    start = 8 + n
    infos = sorted(
        ((name, _tensor_info(path, name, info)) for name, info in header.items() if name != "__metadata__"),
        key=lambda kv: tuple(kv[1]["data_offsets"]),
    )
    _check_layout(path, infos, size - start)
    return header, start


def _tensor_info(path: Path, name: str, info: object) -> dict:
    """One tensor's entry, checked as the library's TensorInfo deserializes it."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise WeightopsError(f"{where}: header entry is {json.dumps(info)[:100]}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise WeightopsError(f"{where}: header entry has no {key!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype in _KNOWN_ELSEWHERE:
        raise WeightopsError(f"{where}: dtype {dtype} is not supported by weightops")
    if dtype not in dtypes.SAFETENSORS_NAMES:
        raise WeightopsError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_usize(d) for d in shape):
        raise WeightopsError(f"{where}: shape {json.dumps(shape)[:100]} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_usize(o) for o in offsets)):
        raise WeightopsError(
            f"{where}: data_offsets {json.dumps(offsets)[:100]} is not [begin, end] (two non-negative integers)"
        )
    return info


def _check_layout(path: Path, infos: list[tuple[str, dict]], data_size: int) -> None:
    """Windows contiguous from 0, each the tensor's exact byte size, ending at the file's end."""
    position = 0
    cut = []
    for name, info in infos:
        begin, end = info["data_offsets"]
        if begin != position or end < begin:
            problem = (
                f"starts at {begin}, but the previous window ends at {position}"
                if begin != position
                else f"ends at {end}, before it begins"
            )
            raise WeightopsError(
                f"{path}: tensor {name!r}: invalid data_offsets [{begin}, {end}]: {problem} "
                "(windows must be contiguous from 0, without gaps or overlaps)"
            )
        nbytes = math.prod(info["shape"]) * dtypes.itemsize(info["dtype"])
        if nbytes > _USIZE or end - begin != nbytes:
            raise WeightopsError(
                f"{path}: tensor {name!r}: window of {end - begin} bytes, but shape {info['shape']} "
                f"x {info['dtype']} needs {nbytes}"
            )
        if end > data_size:
            cut.append(name)
        position = end
    if cut:
        raise WeightopsError(
            f"{path}: file is truncated ({data_size} data bytes); its header needs more for tensors: "
            + ", ".join(sorted(cut))
        )
    if position != data_size:
        raise WeightopsError(
            f"{path}: {data_size - position} bytes after the last tensor's data; the header does "
            "not cover the whole file (damaged, or not safetensors)"
        )


class _Mapping:
    """One safetensors file, memory-mapped on first use (copy-on-write, so tensors are
    writable views and torch does not warn; we never write to them)."""

    def __init__(self, path: Path, data_start: int):
        self.path, self.start = path, data_start
        self._map: mmap.mmap | None = None

    def tensor(self, info: dict) -> torch.Tensor:
        import torch

        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        begin, end = info["data_offsets"]
        dtype = dtypes.to_torch(info["dtype"])
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        flat = torch.frombuffer(
            self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self.start + begin
        )
        return flat.reshape(info["shape"])

    def release(self, info: dict) -> None:
        """Drop the tensor's pages from this process; a later access re-reads the file."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        page = mmap.PAGESIZE
        begin = (self.start + info["data_offsets"][0]) // page * page
        end = self.start + info["data_offsets"][1]
        if end > begin:
            self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)


@names_file("safetensors file")
def read_safetensors(path: Path) -> list[TensorRef]:
    """Lazy references to every tensor of one safetensors file, in file order."""
    path = Path(path)
    header, start = read_header(path)
    mapping = _Mapping(path, start)
    items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    return [
        TensorRef(
            name=name,
            shape=tuple(info["shape"]),
            dtype_name=info["dtype"],
            source=str(path),
            loader=partial(mapping.tensor, info),
            releaser=partial(mapping.release, info),
            span=(str(path), start + info["data_offsets"][0]),
            mapped=True,
        )
        for name, info in items
    ]


def _layout(refs: list[TensorRef], metadata: dict[str, str] | None) -> tuple[bytes, list[TensorRef]]:
    order = sorted(refs, key=lambda r: (-_DTYPE_ORDER.index(r.dtype_name), r.name))
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for r in order:
        header[r.name] = {"dtype": r.dtype_name, "shape": list(r.shape), "data_offsets": [offset, offset + r.nbytes]}
        offset += r.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def _copy_span(ref: TensorRef, fd: int, offset: int) -> bool:
    """Copy a tensor's stored bytes from its source file inside the kernel (as `cp` does:
    no page faults, no copies through Python). False when the kernel or file system cannot
    do it; the caller then loads the tensor instead."""
    if not hasattr(os, "copy_file_range"):
        return False
    assert ref.span is not None  # the caller copies only tensors stored in a file
    path, src_offset = ref.span
    remaining = ref.nbytes
    try:
        with open(path, "rb") as src:
            while remaining:
                n = os.copy_file_range(src.fileno(), fd, remaining, src_offset, offset)
                if n == 0:
                    return False
                remaining, src_offset, offset = remaining - n, src_offset + n, offset + n
    except OSError:
        return False
    return True


class PlannedFile:
    """One safetensors file whose layout (`_layout`) is fixed before any data: each tensor is
    written at its planned offset whenever it comes (`put`, `copy`), so several producers
    may fill it in any order and the bytes are those of a name-ordered write."""

    def __init__(self, refs: Iterable[TensorRef], path: Path, metadata: dict[str, str] | None = None):
        self.refs = list(refs)
        for r in self.refs:
            if r.dtype_name not in dtypes.SAFETENSORS_NAMES:
                raise WeightopsError(
                    f"tensor {r.name!r} from {r.source}: dtype {r.dtype_name.removeprefix('torch.')} "
                    "is not one weightops writes to safetensors"
                )
        self.path = Path(path)
        self.head, order = _layout(self.refs, metadata)
        self.offsets: dict[str, int] = {}
        position = len(self.head)
        for r in order:
            self.offsets[r.name] = position
            position += r.nbytes
        self._file: BinaryIO | None = None
        self._missing: set[str] = set()

    def open(self) -> None:
        with writing(self.path):
            self._file = open(self.path, "wb")
            self._file.write(self.head)
            self._file.flush()
        self._missing = set(self.offsets)

    def copy(self, ref: TensorRef) -> bool:
        """Copy a tensor stored unchanged in its source file (`span`) in the kernel; False when
        it has no span or the kernel cannot (then `put` it)."""
        assert self._file is not None, "open() first"
        with writing(self.path, ref.name):
            if ref.span is None or not _copy_span(ref, self._file.fileno(), self.offsets[ref.name]):
                return False
        self._missing.discard(ref.name)
        return True

    def put(self, ref: TensorRef, tensor: torch.Tensor) -> None:
        """Write `tensor`, the data of `ref` (one of the planned tensors), at its offset."""
        assert self._file is not None, "open() first"
        with writing(self.path, ref.name):
            if tensor.dtype != ref.dtype:
                raise WeightopsError(
                    f"tensor {ref.name!r} from {shown(ref.source)}: produced {tensor.dtype}, declared {ref.dtype}"
                )
            self._file.seek(self.offsets[ref.name])
            self._file.write(tensor_bytes(tensor).data)
            self._file.flush()
        self._missing.discard(ref.name)

    def close(self) -> None:
        """Make the file durable and drop its pages from the cache; an error if a planned tensor
        was never written (the file would hold a hole of zeros)."""
        if self._file is None:
            return
        f, self._file = self._file, None
        with writing(self.path), f:
            if self._missing:
                raise WeightopsError(f"{self.path}: tensors never written: {', '.join(sorted(self._missing))}")
            os.fsync(f.fileno())
            drop_cache(f.fileno())

    def abandon(self) -> None:
        """Close without the checks (a failed write: the caller removes the temporary)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> PlannedFile:
        self.open()
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abandon()


def fill(out: PlannedFile, on_tensor: Callable[[TensorRef], None] | None = None) -> None:
    """Write every planned tensor into the open `out` in name order, each released once
    written. Tensors stored unchanged in a source file are copied file to file in the kernel;
    others are loaded (the next one while the current one is written, so computing operators
    overlap with the disk). `on_tensor` is called once per tensor written (progress)."""
    in_name_order = sorted(out.refs, key=lambda r: r.name)

    def fetch(i: int) -> Future | None:
        """Start loading the next tensor that cannot be copied from its file."""
        if i < len(in_name_order) and in_name_order[i].span is None:
            return worker.submit(in_name_order[i].load)
        return None

    with ThreadPoolExecutor(max_workers=1) as worker:
        upcoming = fetch(0)
        for i, r in enumerate(in_name_order):
            loading, upcoming = upcoming, fetch(i + 1)
            if not out.copy(r):
                with writing(out.path, r.name):
                    t = loading.result() if loading is not None else r.load()
                out.put(r, t)
                del t
            if on_tensor:
                on_tensor(r)
            r.release()


def write_safetensors(
    refs: Iterable[TensorRef],
    path: Path,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[TensorRef], None] | None = None,
) -> None:
    """Write one safetensors file, one tensor at a time, in name order (`fill`)."""
    with PlannedFile(refs, path, metadata) as out:
        fill(out, on_tensor)
