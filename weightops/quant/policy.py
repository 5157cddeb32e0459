"""Which GGUF type each tensor gets, and in which order llama-quantize writes them.

Two tools make the files people use, and `--type` picks whose rules apply (`FileType.quantizer`):
- f32/f16/bf16/q8_0 are `convert_hf_to_gguf.py --outtype TYPE`'s files: 1-D tensors and norms
  F32, every other weight that type, in the model's order. (llama-quantize's Q8_0 gives every
  tensor the same type; only its metadata and tensor order differ, see `pipelines.gguf`.)
- q4_0 ... q6_k are llama-quantize's files (`llama_model_quantize` on an F32 GGUF), rule for
  rule from `src/llama-quant.cpp` at llama.cpp 0c1e57098 (the copy llama-cpp-python 0.3.36
  vendors; the rules change between versions): `llama_tensor_get_type` and its mix rules
  (`llama_tensor_get_type_impl`), evaluated in the loader's tensor order (`weights_map`), since
  the attn_v and ffn_down rules count the tensors seen so far.

With an importance matrix (`has_imatrix`, llama-quantize --imatrix) one rule changes for the
mixes we offer: the first eighth of the ffn_down tensors of a Q4_0/Q5_0 file become Q4_1/Q5_1.
Its other imatrix rules, and its refusal to quantize without one ("requires an imatrix":
IQ1/IQ2/IQ3_XXS tensors, Q2_K in a Q2_K_S file), concern types and mixes we do not write.

Not carried over, because no architecture in `weightops/arch/` has them: the expert (MoE) rules,
the IQ/TQ mixes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gguf import GGMLQuantizationType, LlamaFileType

from ..errors import WeightopsError
from ..stream import matches_any
from . import ggml_types

Q = GGMLQuantizationType
F = LlamaFileType

# llama.cpp's model loaders (src/models/<arch>.cpp, `load_hparams`) that set LLM_TYPE_70B, the
# only model size llama-quantize's rules read: general.architecture -> (block count, only when
# n_head != n_head_kv). LLaMA with 80 blocks and as many key/value heads as heads is "65B".
SEVENTY_B: dict[str, tuple[int, bool]] = {
    "llama": (80, True),
    "qwen2": (80, False),
    "deci": (80, False),
    "olmo": (80, False),
    "jais2": (68, False),
}
FALCON = "falcon"  # the architecture llama-quantize's output / ffn_down / attn_output rules name


@dataclass(frozen=True)
class Model:
    """The facts of a model that llama-quantize's rules read (its hparams: block count, head
    counts of layer 0; the architecture). Built from `arch.Hparams` by the pipeline."""

    arch: str  # general.architecture
    layers: int  # block_count (llama.cpp's n_layer_all)
    heads: int
    kv_heads: int

    @property
    def gqa(self) -> int:
        """hparams.n_gqa(): query heads per key/value head (0 without key/value heads)."""
        return self.heads // self.kv_heads if self.kv_heads else 0

    @property
    def is_70b(self) -> bool:
        rule = SEVENTY_B.get(self.arch)
        return rule is not None and self.layers == rule[0] and (not rule[1] or self.heads != self.kv_heads)


class Category(enum.Enum):
    """llama-quantize's tensor categories (`tensor_get_category`): broad, by name."""

    TOKEN_EMBD = enum.auto()
    ATTENTION_Q = enum.auto()
    ATTENTION_V = enum.auto()
    ATTENTION_K = enum.auto()
    ATTENTION_QKV = enum.auto()
    ATTENTION_KV_B = enum.auto()
    ATTENTION_OUTPUT = enum.auto()
    FFN_UP = enum.auto()
    FFN_GATE = enum.auto()
    FFN_DOWN = enum.auto()
    OUTPUT = enum.auto()
    OTHER = enum.auto()


# substring -> category, tried in this order after the exact output / token embedding names
_BY_SUBSTRING = (
    ("attn_qkv.weight", Category.ATTENTION_QKV),
    ("attn_kv_b.weight", Category.ATTENTION_KV_B),
    ("attn_v.weight", Category.ATTENTION_V),
    ("attn_k.weight", Category.ATTENTION_K),
    ("attn_q.weight", Category.ATTENTION_Q),
    ("attn_output.weight", Category.ATTENTION_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)
_ATTN_V_LIKE = (Category.ATTENTION_V, Category.ATTENTION_QKV, Category.ATTENTION_KV_B)
OUTPUT_NAME = "output.weight"
_TOKEN_EMBD_NAMES = ("token_embd.weight", "per_layer_token_embd.weight")
# tensor_allows_quantization: names containing these stay in the input file's type
_NEVER_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    *(
        f"time_mix_{n}.weight"
        for n in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2")
        + ("decay_w1", "decay_w2", "lerp_fused")
    ),
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")  # LLM_TN(POS_EMBD / TOKEN_TYPES)


def category(name: str) -> Category:
    if name == OUTPUT_NAME:
        return Category.OUTPUT
    if name in _TOKEN_EMBD_NAMES:
        return Category.TOKEN_EMBD
    return next((c for s, c in _BY_SUBSTRING if s in name), Category.OTHER)


def weights_map_key(name: str) -> tuple[int, bytes]:
    """llama-model-loader's `weights_map` order (`weight_name_comparer`): by the block index
    of `blk.N.` (-1 for tensors outside the blocks), then by name, bytewise. llama-quantize
    writes and evaluates the tensors in this order."""
    m = re.match(r"blk\.([+-]?\d+)", name)  # sscanf("blk.%d.") counts the number whatever follows
    return (int(m.group(1)) if m else -1, name.encode())


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quantize's layers that get more bits in the _M mixes: the first and last eighth,
    and every third layer in between (C integer division)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


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
    """convert_hf_to_gguf.py's rule: 1-D tensors, norms and anything that is not a `.weight`
    stay F32."""
    return len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama-quantize's `tensor_allows_quantization` (its architecture-specific lists aside:
    none of our architectures has such tensors)."""
    n_dims = len(shape) - next((i for i, d in enumerate(shape) if d > 1), len(shape) - 1)  # ggml_n_dims
    return (
        n_dims >= 2
        and name.endswith("weight")
        and not any(s in name for s in _NEVER_QUANTIZED)
        and name not in _NEVER_QUANTIZED_NAMES
    )


def converter_type(name: str, shape: Sequence[int], type_name: str) -> GGMLQuantizationType:
    """The type convert_hf_to_gguf.py --outtype `type_name` gives a tensor, before fallbacks."""
    base = ggml_types.parse(ggml_types.parse_file_type(type_name).tensor_type).ggml
    return Q.F32 if is_always_f32(name, shape) else base


def input_type(name: str, shape: Sequence[int], via: str | None = None) -> GGMLQuantizationType:
    """The tensor's type in llama-quantize's input file: convert_hf_to_gguf.py's F32 file, or its
    `via` (f16/bf16) file. llama-quantize quantizes (and weights with an importance matrix) only
    the tensors whose type differs from it."""
    return converter_type(name, shape, via or "f32")


@dataclass
class _Counters:
    """quantize_state_impl's state: counters advanced only when the mix rules see a tensor."""

    n_attention_wv: int
    tied: bool  # no output.weight: token_embd is quantized as the output
    has_imatrix: bool = False
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    fallbacks: int = 0


def assign_types(
    tensors: Iterable[tuple[str, Sequence[int]]],
    type_name: str,
    *,
    model: Model | None = None,
    pure: bool = False,
    overrides: Sequence[tuple[str, GGMLQuantizationType]] = (),
    output_type: GGMLQuantizationType | None = None,
    token_embedding_type: GGMLQuantizationType | None = None,
    via: str | None = None,
    has_imatrix: bool = False,
    warn: Callable[[str], None] = lambda msg: None,
) -> dict[str, GGMLQuantizationType]:
    """GGUF type of every (name, shape), in llama-quantize's precedence:
    1. `token_embedding_type` / `output_type` for those tensors;
    2. the first `overrides` glob that matches the name (later ones do not count);
    3. unless `pure`, the file type's rules (convert_hf_to_gguf.py's, or llama-quantize's mix,
       which needs `model`);
    4. the row-size fallback (`GGMLType.fallback_for`), warned per tensor and counted at the end.
    Tensors llama-quantize does not quantize keep the type of its input file: F32, or with
    `via` that of a convert_hf_to_gguf.py --outtype `via` file. `has_imatrix`: the mix rules
    as llama-quantize applies them when given an importance matrix."""
    ftype = ggml_types.parse_file_type(type_name)
    items = list(tensors)
    if ftype.quantizer:
        if model is None:
            raise ValueError(f"--type {ftype.name}: llama-quantize's rules need the model's facts")
        items.sort(key=lambda item: weights_map_key(item[0]))
    names = [name for name, _ in items]
    counters = _Counters(
        n_attention_wv=sum(category(n) in _ATTN_V_LIKE for n in names),
        tied=OUTPUT_NAME not in names,
        has_imatrix=has_imatrix,
    )
    default = ggml_types.parse(ftype.tensor_type).ggml
    out: dict[str, GGMLQuantizationType] = {}
    for name, shape in items:
        if ftype.quantizer and not allows_quantization(name, shape):
            out[name] = input_type(name, shape, via)
            continue
        if not ftype.quantizer and is_always_f32(name, shape):
            out[name] = Q.F32
            continue
        cat = category(name)
        explicit = None
        if cat is Category.TOKEN_EMBD and token_embedding_type is not None:
            # a separate per-layer table follows it too, unless a --tensor-type names it
            named = name != _TOKEN_EMBD_NAMES[0] and any(matches_any(name, (g,)) for g, _ in overrides)
            explicit = None if named else token_embedding_type
        elif cat is Category.OUTPUT:
            explicit = output_type
        if explicit is not None:
            _check_explicit(name, shape, explicit)
            out[name] = explicit
            continue
        qtype = default
        manual = next((t for glob, t in overrides if matches_any(name, (glob,))), None)
        if manual is not None:
            qtype = manual
        elif ftype.quantizer and not pure:
            assert model is not None
            qtype = _mix(counters, model, ftype.file_type, qtype, name, shape, cat, output_type, token_embedding_type)
        out[name] = _fallback(counters, name, shape, qtype, warn)
    if counters.fallbacks:
        warn(f"{counters.fallbacks} of {len(items)} tensor(s) required fallback quantization")
    return out


def _check_explicit(name: str, shape: Sequence[int], qtype: GGMLQuantizationType) -> None:
    """llama-quantize applies --output-tensor-type / --token-embedding-type to those tensors
    without a fallback (and writes a broken tensor when the rows do not fit); refuse instead."""
    record = ggml_types.get(qtype)
    if not record.fits(shape):
        raise WeightopsError(
            f"tensor {name!r} {tuple(shape)}: rows of {shape[-1]} values cannot be {qtype.name} "
            f"(blocks of {record.block_size}); choose another type for it"
        )


def _fallback(
    counters: _Counters, name: str, shape: Sequence[int], qtype: GGMLQuantizationType, warn: Callable[[str], None]
) -> GGMLQuantizationType:
    """tensor_type_fallback: rows that are not whole blocks of `qtype` take its fallback, or F16."""
    record = ggml_types.get(qtype)
    if record.fits(shape):
        return qtype
    counters.fallbacks += 1
    chosen = record.fallback_for(shape)
    forced = "(WARNING: must use F16 due to unusual shape) " if chosen.ggml is Q.F16 else ""
    warn(
        f"{name} - ncols {shape[-1]} not divisible by {record.block_size} (required for type {record.c_name}) "
        f"{forced}-> falling back to {chosen.c_name}"
    )
    return chosen.ggml


def _mix(
    s: _Counters,
    model: Model,
    ftype: LlamaFileType,
    new: GGMLQuantizationType,
    name: str,
    shape: Sequence[int],
    cat: Category,
    output_type: GGMLQuantizationType | None,
    token_embedding_type: GGMLQuantizationType | None,
) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl for the file types we offer (dense models)."""
    falcon = model.arch == FALCON
    if cat is Category.OUTPUT or (s.tied and cat is Category.TOKEN_EMBD):
        if output_type is not None:
            return output_type
        if falcon or shape[-1] % ggml_types.get(new).block_size:
            return Q.Q8_0
        return new if new is Q.Q8_0 else Q.Q6_K
    if cat is Category.TOKEN_EMBD:
        return token_embedding_type or new  # only the IQ/TQ mixes change it otherwise
    if cat in _ATTN_V_LIKE:
        i, n = s.i_attention_wv, s.n_attention_wv
        if ftype is F.MOSTLY_Q2_K:
            new = Q.Q4_K if model.gqa >= 4 else Q.Q3_K
        elif ftype is F.MOSTLY_Q3_K_M:
            new = Q.Q5_K if i < 2 else Q.Q4_K
        elif ftype is F.MOSTLY_Q3_K_L:
            new = Q.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i, n):
            new = Q.Q6_K
        elif ftype is F.MOSTLY_Q4_K_S and i < 4:
            new = Q.Q5_K
        if model.is_70b and new in (Q.Q3_K, Q.Q4_K):
            new = Q.Q5_K  # 8 heads share attn_v: more bits cost little
        s.i_attention_wv += 1
    elif cat is Category.FFN_DOWN:
        i, n = s.i_ffn_down, model.layers
        if ftype is F.MOSTLY_Q2_K:
            new = Q.Q3_K
        elif ftype is F.MOSTLY_Q3_K_M:
            new = Q.Q5_K if i < n // 16 else Q.Q4_K if not falcon or use_more_bits(i, n) else Q.Q3_K
        elif ftype is F.MOSTLY_Q3_K_L:
            new = Q.Q4_K if falcon else Q.Q5_K
        elif ftype is F.MOSTLY_Q4_K_M:
            if falcon:
                new = Q.Q6_K if i < n // 16 else Q.Q5_K if use_more_bits(i, n) else Q.Q4_K
            elif use_more_bits(i, n):
                new = Q.Q6_K
        elif ftype is F.MOSTLY_Q5_K_M and use_more_bits(i, n):
            new = Q.Q6_K
        elif ftype is F.MOSTLY_Q4_K_S and not falcon and i < n // 8:
            new = Q.Q5_K
        elif ftype in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and s.has_imatrix and i < n // 8:
            new = Q.Q4_1 if ftype is F.MOSTLY_Q4_0 else Q.Q5_1  # guards the first layers' ffn_down
        s.i_ffn_down += 1
    elif cat is Category.ATTENTION_OUTPUT:
        if not falcon:
            new = {F.MOSTLY_Q2_K: Q.Q3_K, F.MOSTLY_Q3_K_M: Q.Q4_K, F.MOSTLY_Q3_K_L: Q.Q5_K}.get(ftype, new)
        elif ftype is F.MOSTLY_Q3_K_L:
            new = Q.Q4_K
    return new


def file_type(type_name: str) -> LlamaFileType:
    """`general.file_type` for `--type` (what llama.cpp's tools record for it)."""
    return ggml_types.parse_file_type(type_name).file_type
