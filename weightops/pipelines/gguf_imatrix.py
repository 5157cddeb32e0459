"""`llama-quantize --imatrix FILE` for `pipelines.gguf`: the per-column weights it hands the
quantizer for each tensor, checked against the model before anything is written, and the four
`quantize.imatrix.*` keys it records in the file.

Facts from llama.cpp at the pinned commit: tools/quantize/quantize.cpp (`load_imatrix`, the KV
overrides it builds: the file name and the first dataset cut to 127 bytes, the entry count, the
chunk count only when positive, integers stored as uint32) and src/llama-quant.cpp (which tensors
get weights: those it quantizes that have an entry of their size; a token embedding of another
size is quantized unweighted; any other size difference stops it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import WeightopsError, shown
from ..io.imatrix import Imatrix, read_imatrix, weights_for

if TYPE_CHECKING:
    from gguf import GGUFWriter

KV_FILE = "quantize.imatrix.file"
KV_DATASET = "quantize.imatrix.dataset"
KV_ENTRIES = "quantize.imatrix.entries_count"
KV_CHUNKS = "quantize.imatrix.chunks_count"
_OVERRIDE_CHARS = 127  # llama_model_kv_override.val_str holds 128 bytes; quantize.cpp strncpy's 127


@dataclass(frozen=True)
class Calibration:
    """An importance matrix as one GGUF export uses it."""

    file: str  # as given: llama-quantize records the path as typed, not resolved
    data: Imatrix
    weights: dict[str, np.ndarray]  # tensor name -> float32 weights, one per column


def load_calibration(file: str | Path, quantized: Iterable[tuple[str, Sequence[int]]]) -> Calibration:
    """Read `file` and give each tensor llama-quantize would quantize (`quantized`: name and
    shape) the weights it would use. Tensors without an entry get none (unweighted, as in
    llama-quantize); entries for tensors the model lacks are ignored, as llama-quantize does.
    An entry whose size does not fit its tensor is refused, naming the file and the tensor."""
    data = read_imatrix(file)
    weights = {}
    for name, shape in quantized:
        try:
            w = weights_for(data, name, shape[-1])
        except WeightopsError as e:
            raise WeightopsError(f"{shown(file)}: {e}") from None
        if w is not None:
            weights[name] = w
    return Calibration(str(file), data, weights)


def add_quantize_kv(writer: GGUFWriter, calibration: Calibration) -> tuple[str, ...]:
    """Add the `quantize.imatrix.*` keys llama-quantize writes; returns them in its order, for
    the caller to place after general.file_type (`io.gguf.move_keys_to_end`)."""
    from gguf import GGUFValueType

    data = calibration.data
    values: list[tuple[str, object, GGUFValueType]] = [(KV_FILE, _c_string(calibration.file), GGUFValueType.STRING)]
    if data.datasets:
        values.append((KV_DATASET, _c_string(data.datasets[0]), GGUFValueType.STRING))
    values.append((KV_ENTRIES, len(data.entries), GGUFValueType.UINT32))
    if 0 < data.chunk_count < 2**31:  # llama.cpp reads it into an int32 and writes it only when positive
        values.append((KV_CHUNKS, data.chunk_count, GGUFValueType.UINT32))
    for key, value, vtype in values:
        writer.add_key_value(key, value, vtype)
    return tuple(key for key, _, _ in values)


def _c_string(text: str) -> bytes:
    """What `strncpy(val_str, text, 127)` keeps: the bytes up to the first NUL, at most 127 (a
    name cut inside a UTF-8 sequence is stored cut, as llama.cpp stores it)."""
    return text.encode("utf-8", "surrogateescape").split(b"\0")[0][:_OVERRIDE_CHARS]
