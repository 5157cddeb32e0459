"""llama.cpp importance-matrix files: the GGUF format `llama-imatrix` writes by default and the
legacy `.dat`, read, written, combined, and turned into the per-column weights
`llama-quantize --imatrix` hands to `ggml_quantize_chunk`.

Every rule follows llama.cpp at the pinned commit (tools/imatrix/imatrix.cpp `save_imatrix*`
and `load_imatrix`, common/imatrix-loader.cpp, tools/quantize/quantize.cpp `load_imatrix`,
src/llama-quant.cpp), so that a file weightops writes is the file llama-imatrix would write for
the same sums, and a file llama.cpp accepts reads here to the same weights. Files that llama.cpp
would refuse, crash on, or silently misread are refused with the file and the tensor named.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import WeightopsError, names_file, shown, writing
from .gguf_header import read_header
from .outputs import Output

GGUF_TYPE = "imatrix"  # general.type
KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"
DEFAULT_CHUNK_SIZE = 512  # llama-imatrix's --ctx default, the chunk size it combines with
TOKEN_EMBD = ("token_embd.weight", "per_layer_token_embd.weight")  # llama-quantize tolerates their size
FORMATS = ("gguf", "dat")

_ALIGN = 32
_GGUF_VERSION = 3
_U32, _F32_TYPE = 4, 0
_STRING, _ARRAY = 8, 9
_I32 = struct.Struct("<i")


@dataclass
class Entry:
    """One weight matrix: per expert (`n_mat`, 1 for a dense matrix), the per-input-column sums
    of squared activations and the number of tokens (rows) summed."""

    sums: np.ndarray  # float32 [n_mat, ne0] raw sums of squared activations
    counts: np.ndarray  # float32 [n_mat] token counts


@dataclass
class Imatrix:
    """An importance matrix keyed by GGUF tensor name.

    `legacy` marks data read from a `.dat` file: llama.cpp keeps those values as stored,
    (sum/count)·ncall, with the one `ncall` as the count, and divides by it when quantizing;
    they become raw sums only through `combine`, which needs a chunk size."""

    entries: dict[str, Entry]  # GGUF tensor name -> entry
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False


# ---------------------------------------------------------------------------------------------- reading


@names_file("imatrix file")
def read_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF or legacy `.dat` imatrix file (told apart as llama.cpp does: a file that is
    not GGUF is legacy). Counts are rounded to whole tokens, as llama.cpp's loader does."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def _read_gguf(path: Path) -> Imatrix:
    header = read_header(path)
    meta = header.metadata
    kind = meta.get("general.type")
    if kind is not None and kind != GGUF_TYPE:
        raise WeightopsError(f"{shown(path)}: a GGUF {shown(kind)!r} file, not an importance matrix (general.type)")
    missing = [k for k in (KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE) if k not in meta]
    if missing:
        raise WeightopsError(
            f"{shown(path)}: not an importance matrix: no {', '.join(missing)} (llama-quantize refuses a GGUF "
            "imatrix without its metadata)"
        )
    for key in (KV_CHUNK_COUNT, KV_CHUNK_SIZE):
        if header.types.get(key) != _U32:
            raise WeightopsError(f"{shown(path)}: {key} must be a uint32 (llama.cpp aborts on any other type)")
    datasets = meta[KV_DATASETS]
    if isinstance(datasets, str) or not all(isinstance(d, str) for d in _items(datasets)):
        raise WeightopsError(f"{shown(path)}: {KV_DATASETS} must be an array of strings")

    pairs: dict[str, list] = {}
    for t in header.tensors:
        for suffix, slot in ((SUM_SUFFIX, 0), (COUNT_SUFFIX, 1)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
    if not pairs:  # llama-quantize would quantize without any weights and not say so
        raise WeightopsError(f"{shown(path)}: the importance matrix holds no entries (no *{SUM_SUFFIX} tensors)")

    entries = {}
    for name in sorted(pairs):
        sums_t, counts_t = pairs[name]
        where = f"{shown(path)}: tensor {shown(name)!r}"
        if sums_t is None or counts_t is None:
            raise WeightopsError(
                f"{where}: has {'counts' if sums_t is None else 'sums'} but no {'sums' if sums_t is None else 'counts'}"
            )
        if sums_t.ggml_type.name != "F32" or counts_t.ggml_type.name != "F32":
            raise WeightopsError(
                f"{where}: sums are {sums_t.ggml_type.name} and counts {counts_t.ggml_type.name}; both must be F32"
            )
        sums = np.frombuffer(header.map, "<f4", sums_t.nbytes // 4, sums_t.offset).astype(np.float32)
        counts = np.frombuffer(header.map, "<f4", counts_t.nbytes // 4, counts_t.offset).astype(np.float32)
        if counts.size == 0 or sums.size == 0 or sums.size % counts.size:
            raise WeightopsError(
                f"{where}: {sums.size} sums do not split into {counts.size} equal rows (one per expert count)"
            )
        _check_values(where, sums, "sums")
        _check_values(where, counts, "counts")
        entries[name] = Entry(sums.reshape(counts.size, -1), _lround(counts))
    return Imatrix(entries, list(_items(datasets)), int(meta[KV_CHUNK_COUNT]), int(meta[KV_CHUNK_SIZE]))


def _items(value) -> list:
    try:
        return list(value)
    except TypeError:
        return [value]


def _lround(counts: np.ndarray) -> np.ndarray:
    """C's lround (half away from zero) of non-negative counts, in float64 so no sum rounds."""
    return np.floor(counts.astype(np.float64) + 0.5).astype(np.float32)


def _check_values(where: str, values: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise WeightopsError(f"{where}: {what} hold a non-finite value ({values.flat[i]} at index {i})")
    if (values < 0).any():
        i = int(np.argmax(values < 0))
        raise WeightopsError(
            f"{where}: {what} hold a negative value ({values.flat[i]} at index {i}); sums of squares and "
            "token counts cannot be negative"
        )


class _Reader:
    """Reads a legacy file front to back, refusing anything that would run past its end."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise WeightopsError(
                f"{shown(self.path)}: truncated legacy imatrix file: {what} needs {n} bytes at byte {self.pos}, "
                f"only {self.left()} remain"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return _I32.unpack(self.take(4, what))[0]


def _read_dat(path: Path) -> Imatrix:
    r = _Reader(path, path.read_bytes())
    n_entries = r.i32("the entry count")
    if n_entries < 1:
        raise WeightopsError(
            f"{shown(path)}: not an importance matrix: {n_entries} entries (neither GGUF nor legacy .dat)"
        )
    if n_entries * 13 > r.left():  # each entry is at least length, 1-byte name, ncall, nval, one value
        raise WeightopsError(
            f"{shown(path)}: not an importance matrix: {n_entries} entries cannot fit in {r.left()} bytes "
            "(neither GGUF nor legacy .dat)"
        )
    entries: dict[str, Entry] = {}
    for i in range(n_entries):
        length = r.i32(f"the name length of entry {i + 1}")
        if length < 1:
            raise WeightopsError(f"{shown(path)}: entry {i + 1} has a name of {length} bytes")
        raw = r.take(length, f"the name of entry {i + 1}")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            name = ""
        if not name or "\0" in name:
            raise WeightopsError(f"{shown(path)}: entry {i + 1} has an unreadable name {raw[:60]!r}")
        where = f"{shown(path)}: tensor {shown(name)!r}"
        if name in entries:
            raise WeightopsError(f"{where}: appears twice")
        ncall = r.i32(f"the call count of {name!r}")
        nval = r.i32(f"the value count of {name!r}")
        if nval < 1:
            raise WeightopsError(f"{where}: {nval} values")
        values = np.frombuffer(r.take(4 * nval, f"{nval} values of {name!r}"), "<f4").astype(np.float32)
        _check_values(where, values, "values")
        entries[name] = Entry(values.reshape(1, -1), np.array([ncall], np.float32))
    chunk_count, datasets = 0, []
    if r.left():  # optional trailer: chunk count, dataset name
        chunk_count = r.i32("the chunk count")
        length = r.i32("the dataset name length")
        if length > 0:
            datasets.append(r.take(length, "the dataset name").decode("utf-8", errors="replace").split("\0")[0])
        if r.left():
            raise WeightopsError(f"{shown(path)}: {r.left()} unexpected bytes after the dataset name")
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


# ---------------------------------------------------------------------------------------------- writing


def write_imatrix(
    data: Imatrix,
    path: str | Path | Output,
    fmt: str = "gguf",
    *,
    inputs: Iterable[Path | str | None] = (),
    force: bool = False,
) -> Path:
    """Write `data` as llama-imatrix writes it (`fmt` "gguf" or "dat"): entries in sorted name
    order, no timestamps, so equal data gives equal bytes. `path` is a path, or an `Output` the
    caller planned before its own work; the file appears only once complete and never replaces
    what weightops did not write (`inputs`, `force`: see `io.outputs.Output`)."""
    if fmt not in FORMATS:
        raise WeightopsError(f"imatrix format {fmt!r}: one of {', '.join(FORMATS)}")
    target = path if isinstance(path, Output) else Output(path, inputs, kind="file", force=force, what="imatrix")
    _check_data(data, target.path)
    if fmt == "gguf" and data.legacy:
        raise WeightopsError(
            f"{shown(target.path)}: legacy .dat values are not raw sums; combine() them with the chunk size they "
            "were computed with before writing GGUF"
        )
    blob = _gguf_bytes(data) if fmt == "gguf" else _dat_bytes(data, target.path)
    with target.writing() as tmp, writing(target.path):
        tmp.write_bytes(blob)
    return target.path


def _check_data(data: Imatrix, path: Path) -> None:
    """Refuse, before anything is written, what llama.cpp could not read back."""
    if not data.entries:
        raise WeightopsError(f"{shown(path)}: the importance matrix has no entries")
    for value, what in ((data.chunk_count, "chunk count"), (data.chunk_size, "chunk size")):
        if not 0 <= value < 2**31:
            raise WeightopsError(f"{shown(path)}: {what} {value} is out of range")
    for name, e in data.entries.items():
        where = f"{shown(path)}: tensor {shown(name)!r}"
        if not name or "\0" in name:
            raise WeightopsError(f"{shown(path)}: an entry has the name {name!r}")
        if e.sums.ndim != 2 or e.counts.shape != (e.sums.shape[0],) or e.sums.size == 0:
            raise WeightopsError(
                f"{where}: sums of shape {tuple(e.sums.shape)} and counts of shape {tuple(e.counts.shape)} "
                "(expected [n_mat, ne0] and [n_mat])"
            )
        _check_values(where, np.asarray(e.sums, np.float32), "sums")
        _check_values(where, np.asarray(e.counts, np.float32), "counts")
        if not data.legacy and (np.asarray(e.counts, np.float64) % 1).any():
            raise WeightopsError(f"{where}: token counts must be whole numbers")


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pad(n: int) -> bytes:
    return bytes(-n % _ALIGN)


def _gguf_bytes(data: Imatrix) -> bytes:
    """The file gguf_write_to_file writes for save_imatrix's context, byte for byte."""
    kvs = [
        _string("general.type") + struct.pack("<I", _STRING) + _string(GGUF_TYPE),
        _string(KV_DATASETS)
        + struct.pack("<IIQ", _ARRAY, _STRING, len(data.datasets))
        + b"".join(_string(d) for d in data.datasets),
        _string(KV_CHUNK_COUNT) + struct.pack("<II", _U32, data.chunk_count),
        _string(KV_CHUNK_SIZE) + struct.pack("<II", _U32, data.chunk_size),
    ]
    infos, blobs, offset = [], [], 0
    for name in sorted(data.entries):
        e = data.entries[name]
        n_mat, ne0 = e.sums.shape
        for suffix, values, ne in (
            (SUM_SUFFIX, e.sums, (ne0, n_mat)),
            (COUNT_SUFFIX, e.counts, (1, n_mat)),
        ):
            dims = ne if ne[1] > 1 else ne[:1]  # ggml_n_dims: trailing 1s are not written
            blob = np.ascontiguousarray(values, "<f4").tobytes()
            infos.append(
                _string(name + suffix)
                + struct.pack(f"<I{len(dims)}q", len(dims), *dims)
                + struct.pack("<IQ", _F32_TYPE, offset)
            )
            blobs.append(blob + _pad(len(blob)))
            offset += len(blobs[-1])
    head = b"GGUF" + struct.pack("<Iqq", _GGUF_VERSION, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + _pad(len(head)) + b"".join(blobs)


def _dat_bytes(data: Imatrix, path: Path) -> bytes:
    """save_imatrix_legacy's file: per entry (sum/count)·ncall with ncall = ceil(max count /
    chunk size); entries with no tokens at all are left out, experts with none store 1."""
    if not data.legacy and data.chunk_size < 1:
        raise WeightopsError(f"{shown(path)}: the legacy .dat format needs the chunk size (it is {data.chunk_size})")
    out = []
    for name in sorted(data.entries):
        e = data.entries[name]
        counts = np.asarray(e.counts, np.float64).astype(np.int64)
        if data.legacy:
            ncall, values = int(counts[0]), np.asarray(e.sums, np.float32).reshape(-1)
        else:
            if not counts.any():
                continue
            ncall = int((counts.max() + data.chunk_size - 1) // data.chunk_size)
            count = counts.astype(np.float32)[:, None]
            sums = np.asarray(e.sums, np.float32)
            empty = count == 0
            values = (np.where(empty, np.float32(1), sums) / np.where(empty, np.float32(1), count)) * np.float32(ncall)
            values = values.astype(np.float32).reshape(-1)
        raw = name.encode("utf-8")
        out.append(_I32.pack(len(raw)) + raw + struct.pack("<ii", ncall, values.size) + values.astype("<f4").tobytes())
    dataset = (data.datasets[-1] if data.datasets else "").encode("utf-8")
    trailer = struct.pack("<ii", data.chunk_count, len(dataset)) + dataset
    return _I32.pack(len(out)) + b"".join(out) + trailer


# ---------------------------------------------------------------------------------------------- using


def combine(items: Sequence[Imatrix], chunk_size: int = DEFAULT_CHUNK_SIZE) -> Imatrix:
    """`llama-imatrix --in-file A --in-file B ... -c CHUNK_SIZE` without a text: sums and token
    counts added entry by entry (a single-count entry broadcast over experts), datasets
    joined, legacy files turned into raw sums by multiplying by `chunk_size`, and the chunk
    count recomputed as the largest token count divided by `chunk_size` (not the inputs' sum)."""
    if chunk_size < 1:
        raise WeightopsError(f"chunk size {chunk_size}: must be at least 1")
    if not items:
        raise WeightopsError("no importance matrices to combine")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    datasets: list[str] = []
    for item in items:
        for name, e in item.entries.items():
            flat = np.asarray(e.sums, np.float32).reshape(-1)
            got = np.asarray(e.counts, np.float64).astype(np.int64)
            acc = sums.get(name)
            if acc is not None and acc.size != flat.size:
                raise WeightopsError(f"imatrix tensor {shown(name)!r}: {flat.size} sums do not match {acc.size} before")
            if item.legacy:
                if acc is None:
                    sums[name], counts[name] = np.zeros(flat.size, np.float32), np.zeros(1, np.int64)
                sums[name] += flat * np.float32(chunk_size)
                counts[name] += got[0] * chunk_size
                continue
            have = counts.get(name)
            if have is None:
                sums[name], counts[name] = np.zeros(flat.size, np.float32), np.zeros(got.size, np.int64)
            elif have.size == 1 and got.size > 1:
                counts[name] = np.full(got.size, have[0], np.int64)
            elif have.size != got.size:
                raise WeightopsError(
                    f"imatrix tensor {shown(name)!r}: {got.size} expert counts do not match {have.size} before"
                )
            sums[name] += flat
            counts[name] += got
        datasets += item.datasets
    most = max((int(c.max()) for c in counts.values()), default=0)
    entries = {
        name: Entry(sums[name].reshape(counts[name].size, -1), counts[name].astype(np.float32)) for name in sorted(sums)
    }
    return Imatrix(entries, datasets, most // chunk_size, chunk_size)


def weights_for(data: Imatrix, name: str, n_per_row: int, n_expert: int = 1) -> np.ndarray | None:
    """The float32 weights llama-quantize passes to `ggml_quantize_chunk` for tensor `name`
    (rows of `n_per_row`, `n_expert` experts; expert i's weights at [i·n_per_row, ...]):
    sum/count per expert, 1.0 for an expert that saw no token, a legacy value/ncall. None
    when the tensor has no entry, or when a token embedding's size differs (llama-quantize
    then quantizes it unweighted); any other size difference is refused, as llama-quantize does."""
    entry = data.entries.get(name)
    if entry is None:
        return None
    sums = np.asarray(entry.sums, np.float32).reshape(np.asarray(entry.counts).size, -1)
    if data.legacy:
        ncall = int(np.asarray(entry.counts, np.float64)[0])
        w = sums.reshape(-1) / np.float32(ncall) if ncall > 0 else sums.reshape(-1).copy()
    else:
        count = np.asarray(entry.counts, np.float32)[:, None]
        w = np.where(count > 0, sums / np.where(count > 0, count, np.float32(1)), np.float32(1)).reshape(-1)
    w = w.astype(np.float32)
    if w.size != n_per_row * n_expert:
        if name in TOKEN_EMBD:
            return None
        raise WeightopsError(
            f"imatrix tensor {shown(name)!r}: {w.size} weights, but the tensor has {n_per_row * n_expert} "
            f"({n_expert} x {n_per_row} columns); the importance matrix was computed for another model"
        )
    if not np.isfinite(w).all():
        raise WeightopsError(f"imatrix tensor {shown(name)!r}: its weights hold a non-finite value")
    return w
