"""GGUF files (llama.cpp): a lazy reader. Tensors are memory-mapped by `gguf.GGUFReader`;
`load()` dequantizes to float32 with `gguf.quants`, `raw()` gives the stored blocks."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from ..errors import WeightopsError
from ..stream import TensorRef

MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def open_reader(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # the library raises ValueError/IndexError/struct errors on damage
        raise WeightopsError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from None


def field_value(field) -> Any:
    """A GGUF key's value as plain Python (strings decoded, arrays as lists)."""
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


def read_metadata(path: Path, reader: GGUFReader | None = None) -> dict[str, Any]:
    reader = reader or open_reader(path)
    return {name: field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def read_gguf(path: Path, reader: GGUFReader | None = None) -> list[TensorRef]:
    """Lazy references in file order; shapes in torch order (GGUF stores them reversed)."""
    path = Path(path)
    reader = reader or open_reader(path)
    refs = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))

        def load(t=t, shape=shape) -> torch.Tensor:
            values = dequantize(np.asarray(t.data), t.tensor_type)
            return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)

        def raw(t=t) -> np.ndarray:
            return np.asarray(t.data).reshape(-1).view(np.uint8)

        refs.append(TensorRef(name=t.name, shape=shape, dtype=torch.float32, source=str(path), loader=load,
                              ggml_type=t.tensor_type.name, raw_loader=raw))
    return refs
