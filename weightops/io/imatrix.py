"""STAND-IN (branch imcompute): the interface of the imatrix file module another helper writes,
only as much as `weightops imatrix` needs to run its tests. Replace it with that module at merge.

llama.cpp's importance-matrix files (tools/imatrix/imatrix.cpp): GGUF (`<name>.in_sum2` raw sums
[n_mat, ne0], `<name>.counts` [n_mat], three imatrix.* keys) and the legacy `.dat`."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import WeightopsError


@dataclass
class Entry:
    sums: np.ndarray  # float32 [n_mat, ne0]
    counts: np.ndarray  # float32 [n_mat]


@dataclass
class Imatrix:
    entries: dict[str, Entry]  # GGUF tensor name -> entry
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 512


def write_imatrix(data: Imatrix, path: str | Path, fmt: str = "gguf") -> None:
    if fmt == "dat":
        _write_dat(data, Path(path))
        return
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.kv_data[0].pop("general.architecture", None)
    writer.add_type("imatrix")
    writer.add_array(gguf.Keys.IMatrix.DATASETS, list(data.datasets))
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, data.chunk_count)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, data.chunk_size)
    for name in sorted(data.entries):
        e = data.entries[name]
        writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, dtype=np.float32))
        writer.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_dat(data: Imatrix, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(data.entries)))
        for name in sorted(data.entries):
            e = data.entries[name]
            ncall = int((e.counts.max() + data.chunk_size - 1) // data.chunk_size)
            values = (e.sums / np.maximum(e.counts, 1)[:, None] * ncall).astype(np.float32).reshape(-1)
            f.write(struct.pack("<i", len(name.encode())) + name.encode())
            f.write(struct.pack("<ii", ncall, values.size) + values.tobytes())
        dataset = (data.datasets[-1] if data.datasets else "").encode()
        f.write(struct.pack("<ii", data.chunk_count, len(dataset)) + dataset)


def read_imatrix(path: str | Path) -> Imatrix:
    from .gguf import is_gguf
    from .gguf_header import read_header

    path = Path(path)
    if not is_gguf(path):
        raise WeightopsError(f"{path}: the stand-in reads GGUF imatrix files only")
    header = read_header(path)
    meta = dict(header.metadata)
    arrays = {
        t.name: np.frombuffer(header.map, np.float32, t.nbytes // 4, t.offset).reshape(t.shape) for t in header.tensors
    }
    entries = {
        n.removesuffix(".in_sum2"): Entry(a.copy(), arrays[n.removesuffix(".in_sum2") + ".counts"].reshape(-1).copy())
        for n, a in arrays.items()
        if n.endswith(".in_sum2")
    }
    return Imatrix(
        entries,
        list(meta.get("imatrix.datasets", [])),
        int(meta["imatrix.chunk_count"]),
        int(meta["imatrix.chunk_size"]),
    )


def combine(items: list[Imatrix]) -> Imatrix:
    """Sums and counts added, datasets concatenated (llama-imatrix --in-file)."""
    out: dict[str, Entry] = {}
    for item in items:
        for name, e in item.entries.items():
            if name in out:
                out[name] = Entry(out[name].sums + e.sums, out[name].counts + e.counts)
            else:
                out[name] = Entry(e.sums.copy(), e.counts.copy())
    size = items[-1].chunk_size if items else 512
    most = max((float(e.counts.max()) for e in out.values()), default=0.0)
    return Imatrix(out, [d for i in items for d in i.datasets], int(most // size), size)
