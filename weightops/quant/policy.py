"""Which GGUF type each tensor gets (reference: shared/reference/gguf.md).

The rules follow llama.cpp's tools so that our files hold what users expect:
- 1-D tensors (biases, norms) and `*_norm.weight` stay F32, as convert_hf_to_gguf.py keeps them;
- `--type f32|f16|bf16|q8_0`: every other weight in that type, exactly as
  `convert_hf_to_gguf.py --outtype TYPE`;
- `--type q4_0|q4_1|q5_0|q5_1`: every other weight in that type with `pure`
  (as `llama-quantize --pure`); without it token_embd and output stay Q8_0, because
  llama-quantize's own mixes keep them at K-quants we do not write;
- `GLOB=TYPE` overrides (later ones win) apply to the 2-D weights;
- a block type whose blocks do not divide the row length falls back to F16, with a warning.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ..errors import WeightopsError
from ..stream import matches_any

Q = GGMLQuantizationType
TYPES: dict[str, GGMLQuantizationType] = {
    "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16,
    "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1,
}
FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0, "q5_1": LlamaFileType.MOSTLY_Q5_1,
}
SMALL_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1")
KEEP_Q8_0 = ("token_embd.weight", "output.weight")  # without --pure, for the small types


def parse_type(name: str) -> GGMLQuantizationType:
    try:
        return TYPES[name.lower()]
    except KeyError:
        raise WeightopsError(f"unknown GGUF type {name!r}; choose one of {', '.join(TYPES)}") from None


def parse_overrides(specs: Iterable[str]) -> list[tuple[str, GGMLQuantizationType]]:
    """`GLOB=TYPE` strings (e.g. `blk.*.ffn_down.weight=q8_0`) -> (glob, type) pairs."""
    out = []
    for spec in specs:
        glob, sep, type_name = spec.rpartition("=")
        if not sep or not glob:
            raise WeightopsError(f"--tensor-type {spec!r}: expected GLOB=TYPE, e.g. 'blk.*.attn_v.weight=q8_0'")
        out.append((glob, parse_type(type_name)))
    return out


def is_always_f32(name: str, shape: Sequence[int]) -> bool:
    """1-D tensors, norms and anything that is not a `.weight` stay F32 in llama.cpp's files."""
    return len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")


def fits(shape: Sequence[int], qtype: GGMLQuantizationType) -> bool:
    return bool(shape) and shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0


def assign_types(tensors: Iterable[tuple[str, Sequence[int]]], type_name: str, *, pure: bool = False,
                 overrides: Sequence[tuple[str, GGMLQuantizationType]] = (),
                 warn: Callable[[str], None] = lambda msg: None) -> dict[str, GGMLQuantizationType]:
    """GGUF type of every (name, shape) under the rules above."""
    base, type_name = parse_type(type_name), type_name.lower()
    out: dict[str, GGMLQuantizationType] = {}
    for name, shape in tensors:
        if is_always_f32(name, shape):
            out[name] = Q.F32
            continue
        qtype = Q.Q8_0 if type_name in SMALL_TYPES and not pure and name in KEEP_Q8_0 else base
        for glob, t in overrides:
            if matches_any(name, (glob,)):
                qtype = t
        if not fits(shape, qtype):
            warn(f"tensor {name!r} {tuple(shape)}: rows of {shape[-1]} values are not a multiple of "
                 f"{GGML_QUANT_SIZES[qtype][0]}, so it cannot be {qtype.name}; writing it as F16")
            qtype = Q.F16
        out[name] = qtype
    return out


def file_type(type_name: str) -> LlamaFileType:
    """`general.file_type` for `--type` (what llama.cpp's tools record for it)."""
    parse_type(type_name)
    return FILE_TYPES[type_name.lower()]
