"""Which GGUF type each tensor gets (reference: shared/reference/gguf.md).

The rules follow llama.cpp's tools so that our files hold what users expect:
- 1-D tensors (biases, norms) and `*_norm.weight` stay F32, as convert_hf_to_gguf.py keeps them;
- `--type f32|f16|bf16|q8_0`: every other weight in that type, exactly as
  `convert_hf_to_gguf.py --outtype TYPE`;
- `--type q4_0|q4_1|q5_0|q5_1`: every other weight in that type with `pure`
  (as `llama-quantize --pure`); without it token_embd and output stay Q8_0, because
  llama-quantize's own mixes keep them at K-quants we do not write;
- `GLOB=TYPE` overrides (later ones win) apply to the 2-D weights;
- a block type whose blocks do not divide the row length falls back, with a warning, to the
  type llama.cpp uses then (`GGMLType.fallback_for`: F16 for the types above).

The types and file types themselves (names, ids, sizes, fallbacks) are in `ggml_types`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from gguf import GGMLQuantizationType, LlamaFileType

from ..errors import WeightopsError
from ..stream import matches_any
from . import ggml_types

KEEP_NAMES = ("token_embd.weight", "output.weight")  # get the file type's embed_output_type without --pure


def parse_overrides(specs: Iterable[str]) -> list[tuple[str, GGMLQuantizationType]]:
    """`GLOB=TYPE` strings (e.g. `blk.*.ffn_down.weight=q8_0`) -> (glob, type) pairs."""
    out = []
    for spec in specs:
        glob, sep, type_name = spec.rpartition("=")
        if not sep or not glob:
            raise WeightopsError(f"--tensor-type {spec!r}: expected GLOB=TYPE, e.g. 'blk.*.attn_v.weight=q8_0'")
        out.append((glob, ggml_types.parse(type_name).ggml))
    return out


def is_always_f32(name: str, shape: Sequence[int]) -> bool:
    """1-D tensors, norms and anything that is not a `.weight` stay F32 in llama.cpp's files."""
    return len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")


def assign_types(
    tensors: Iterable[tuple[str, Sequence[int]]],
    type_name: str,
    *,
    pure: bool = False,
    overrides: Sequence[tuple[str, GGMLQuantizationType]] = (),
    warn: Callable[[str], None] = lambda msg: None,
) -> dict[str, GGMLQuantizationType]:
    """GGUF type of every (name, shape) under the rules above."""
    ftype = ggml_types.parse_file_type(type_name)
    base = ggml_types.parse(ftype.tensor_type).ggml
    kept = ggml_types.parse(ftype.embed_output_type).ggml if ftype.embed_output_type and not pure else None
    out: dict[str, GGMLQuantizationType] = {}
    for name, shape in tensors:
        if is_always_f32(name, shape):
            out[name] = GGMLQuantizationType.F32
            continue
        qtype = kept if kept is not None and name in KEEP_NAMES else base
        for glob, t in overrides:
            if matches_any(name, (glob,)):
                qtype = t
        record = ggml_types.get(qtype)
        if not record.fits(shape):
            fallback = record.fallback_for(shape)
            warn(
                f"tensor {name!r} {tuple(shape)}: rows of {shape[-1]} values are not a multiple of "
                f"{record.block_size}, so it cannot be {qtype.name}; writing it as {fallback.ggml.name}"
            )
            qtype = fallback.ggml
        out[name] = qtype
    return out


def file_type(type_name: str) -> LlamaFileType:
    """`general.file_type` for `--type` (what llama.cpp's tools record for it)."""
    return ggml_types.parse_file_type(type_name).file_type
