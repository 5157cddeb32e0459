"""The GGML tensor types and GGUF file types weightops writes: one record each, read by every
module that needs a fact about them (policy, GGUF export and writer, kernels, verify, jobs, CLI).

Block sizes and bytes per block come from gguf-py's `GGML_QUANT_SIZES`, type and file-type ids
from its `GGMLQuantizationType` / `LlamaFileType`, so nothing llama.cpp defines is retyped here.
What is ours: the spelling on the command line, where the encoder and decoder live, the
fallback for rows that do not split into blocks, and the verify gate's class of the type.

Adding a type is adding a `GGMLType`; adding a `--type` is adding a `FileType` (and, for a
llama-quantize mix, its rules in `quant.policy`). The kernels are named, not imported: they need torch, and this table
is read without it (and by `quant.ggml` itself).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ..errors import WeightopsError

if TYPE_CHECKING:
    import torch

Q = GGMLQuantizationType
_GGML = "weightops.quant.ggml"
_KQUANTS = "weightops.quant.kquants"
_WEIGHTED_LEGACY = "weightops.quant.weighted_legacy"

# GGMLType.imatrix: how a type's encoder uses an importance matrix (None: it has no weighted path
# and libggml ignores the matrix, as for Q8_0 and the float types).
BLOCK_WEIGHTS = "block"  # the encoder takes `weights`, the matrix's value for each element (K-quants)
ROW_WEIGHTS = "row"  # a separate encoder also takes the mean square of each block's row (Q4_0..Q5_1)


@dataclass(frozen=True)
class Kernels:
    """`module:function` names of a block type's encoder, `(n, block) float32 -> (n, bytes) uint8
    rows of out`, and decoder, `(n, bytes) uint8 -> (n, block) float32`."""

    encoder: str
    decoder: str


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type: how a tensor is stored in a GGUF file."""

    name: str  # our spelling, lower case ("q8_0"): --tensor-type, kernels, messages
    ggml: GGMLQuantizationType
    verify_kind: str  # the verify gate's class (`verify.gate.KINDS`)
    float_dtype: str | None = None  # float types: the `weightops.dtypes` name they are a cast to
    kernels: Kernels | None = None  # block types: their encoder and decoder
    fallback: str | None = None  # the type for rows that are not whole blocks (then F16 if that fails too)
    imatrix: str | None = None  # BLOCK_WEIGHTS, ROW_WEIGHTS or None: the type's weighted path, if any

    def __post_init__(self) -> None:
        if (self.float_dtype is None) == (self.kernels is None):
            raise ValueError(f"{self.name}: a GGML type is either a float cast or a block type with kernels")

    @property
    def block_size(self) -> int:
        """Values per block (1 for float types)."""
        return GGML_QUANT_SIZES[self.ggml][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return GGML_QUANT_SIZES[self.ggml][1]

    @property
    def c_name(self) -> str:
        """libggml's spelling (`ggml_type_name`: "q4_K"), as llama-quantize's messages use it."""
        return self.name[:-1] + "K" if self.name.endswith("_k") else self.name

    @property
    def is_block(self) -> bool:
        """A quantized type (llama.cpp's `ggml_is_quantized`), not a float cast."""
        return self.kernels is not None

    @property
    def bytes_per_weight(self) -> float:
        return self.type_size / self.block_size

    def fits(self, shape: Sequence[int]) -> bool:
        """True when `shape`'s rows split into whole blocks."""
        return bool(shape) and shape[-1] % self.block_size == 0

    def fallback_for(self, shape: Sequence[int]) -> GGMLType:
        """The type llama.cpp writes a tensor of `shape` in when its rows are not whole blocks of
        this type: the fallback, or F16 when that does not fit either."""
        fallback = _BY_NAME[self.fallback] if self.fallback else None
        return fallback if fallback is not None and fallback.fits(shape) else _BY_NAME["f16"]

    @property
    def encoder(self) -> Callable[[torch.Tensor, torch.Tensor], None]:
        return _resolve(self._kernels().encoder)

    @property
    def decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return _resolve(self._kernels().decoder)

    @property
    def weighted(self) -> bool:
        """True when an importance matrix changes this type's bytes (llama-quantize --imatrix)."""
        return self.imatrix is not None

    @property
    def weighted_encoder(self) -> Callable[..., None]:
        """The encoder with an importance matrix: `(x, out, weights)` for BLOCK_WEIGHTS types,
        `(x, out, weights, sigma2)` for ROW_WEIGHTS ones (`quant.weighted_legacy`)."""
        if self.imatrix == ROW_WEIGHTS:
            return _resolve(f"{_WEIGHTED_LEGACY}:encode_{self.name}")
        if self.imatrix == BLOCK_WEIGHTS:
            return self.encoder
        raise WeightopsError(f"{self.name} has no weighted path: llama.cpp ignores an importance matrix for it")

    def encode(self, x: torch.Tensor, device: torch.device, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """The stored bytes (uint8 on the CPU, one row per row of `x`) of `x`'s values: a cast
        through float32 for float types (on the CPU), the block kernels on `device` otherwise.
        Always from the source values, never from an F16 intermediate, as llama.cpp's converter.
        `imatrix` (one value per column) selects the weighted path where the type has one."""
        import torch

        if self.float_dtype is not None:
            from .. import dtypes

            return x.to(torch.float32).to(dtypes.to_torch(self.float_dtype)).cpu().contiguous().view(torch.uint8)
        from . import ggml

        weights = None if imatrix is None else imatrix.to(device)
        return ggml.quantize(x.to(device), self.name, imatrix=weights).cpu()

    def decode(self, stored: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """float32 values of `shape` from the stored bytes (uint8)."""
        import torch

        if self.float_dtype is not None:
            from .. import dtypes

            return stored.contiguous().view(dtypes.to_torch(self.float_dtype)).to(torch.float32).reshape(tuple(shape))
        from . import ggml

        return ggml.dequantize(stored, self.name, shape)

    def _kernels(self) -> Kernels:
        if self.kernels is None:
            raise WeightopsError(f"{self.name} is a float type: it has no block kernels")
        return self.kernels


@dataclass(frozen=True)
class FileType:
    """One `--type` of `weightops gguf`: the `general.file_type` it records, the default type of
    the 2-D weights, and which llama.cpp tool makes such a file (`quant.policy` applies that
    tool's rules: which tensor gets which type, the metadata and tensor order)."""

    name: str  # --type spelling
    file_type: LlamaFileType  # general.file_type, as llama.cpp's tools record it
    tensor_type: str  # GGMLType.name of the 2-D weights (llama_ftype_get_default_type)
    quantizer: bool = False  # llama-quantize's file (its mixes), else convert_hf_to_gguf.py --outtype's


def _legacy(name: str, ggml: GGMLQuantizationType, verify_kind: str, imatrix: str | None) -> GGMLType:
    """llama.cpp's original block types: kernels in `quant.ggml` (weighted ones in
    `quant.weighted_legacy`); rows that are not whole blocks fall back to F16, as
    convert_hf_to_gguf.py does."""
    kernels = Kernels(f"{_GGML}:encode_{name}", f"{_GGML}:decode_{name}")
    return GGMLType(name, ggml, verify_kind, kernels=kernels, fallback="f16", imatrix=imatrix)


def _k(name: str, ggml: GGMLQuantizationType, module: str, verify_kind: str, fallback: str) -> GGMLType:
    """llama.cpp's K-quants (super-blocks of 256 in `quant.kquants.MODULE`); rows that are not
    whole super-blocks fall back as llama-quantize does (then to F16 if that fails too)."""
    kernels = Kernels(f"{_KQUANTS}.{module}:encode_{name}", f"{_KQUANTS}.{module}:decode_{name}")
    return GGMLType(name, ggml, verify_kind, kernels=kernels, fallback=fallback, imatrix=BLOCK_WEIGHTS)


GGML_TYPES: tuple[GGMLType, ...] = (
    GGMLType("f32", Q.F32, "float", float_dtype="F32"),
    GGMLType("f16", Q.F16, "float", float_dtype="F16"),
    GGMLType("bf16", Q.BF16, "float", float_dtype="BF16"),
    _legacy("q8_0", Q.Q8_0, "q8", imatrix=None),  # quantize_q8_0 ignores quant_weights
    _legacy("q4_0", Q.Q4_0, "q4", imatrix=ROW_WEIGHTS),
    _legacy("q4_1", Q.Q4_1, "q4", imatrix=ROW_WEIGHTS),
    _legacy("q5_0", Q.Q5_0, "q5", imatrix=ROW_WEIGHTS),
    _legacy("q5_1", Q.Q5_1, "q5", imatrix=ROW_WEIGHTS),
    _k("q2_k", Q.Q2_K, "affine", "low", fallback="q4_0"),
    _k("q3_k", Q.Q3_K, "symmetric", "low", fallback="q4_0"),
    _k("q4_k", Q.Q4_K, "affine", "q4", fallback="q5_0"),
    _k("q5_k", Q.Q5_K, "affine", "q5", fallback="q5_1"),
    _k("q6_k", Q.Q6_K, "symmetric", "q6", fallback="q8_0"),
)

FILE_TYPES: tuple[FileType, ...] = (
    FileType("f32", LlamaFileType.ALL_F32, "f32"),
    FileType("f16", LlamaFileType.MOSTLY_F16, "f16"),
    FileType("bf16", LlamaFileType.MOSTLY_BF16, "bf16"),
    FileType("q8_0", LlamaFileType.MOSTLY_Q8_0, "q8_0"),
    FileType("q4_0", LlamaFileType.MOSTLY_Q4_0, "q4_0", quantizer=True),
    FileType("q4_1", LlamaFileType.MOSTLY_Q4_1, "q4_1", quantizer=True),
    FileType("q5_0", LlamaFileType.MOSTLY_Q5_0, "q5_0", quantizer=True),
    FileType("q5_1", LlamaFileType.MOSTLY_Q5_1, "q5_1", quantizer=True),
    FileType("q2_k", LlamaFileType.MOSTLY_Q2_K, "q2_k", quantizer=True),
    FileType("q3_k_s", LlamaFileType.MOSTLY_Q3_K_S, "q3_k", quantizer=True),
    FileType("q3_k_m", LlamaFileType.MOSTLY_Q3_K_M, "q3_k", quantizer=True),
    FileType("q3_k_l", LlamaFileType.MOSTLY_Q3_K_L, "q3_k", quantizer=True),
    FileType("q4_k_s", LlamaFileType.MOSTLY_Q4_K_S, "q4_k", quantizer=True),
    FileType("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, "q4_k", quantizer=True),
    FileType("q5_k_s", LlamaFileType.MOSTLY_Q5_K_S, "q5_k", quantizer=True),
    FileType("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, "q5_k", quantizer=True),
    FileType("q6_k", LlamaFileType.MOSTLY_Q6_K, "q6_k", quantizer=True),
)

_BY_NAME = {t.name: t for t in GGML_TYPES}
_BY_GGML = {t.ggml: t for t in GGML_TYPES}
_FILE_BY_NAME = {f.name: f for f in FILE_TYPES}
NAMES: tuple[str, ...] = tuple(_BY_NAME)  # --tensor-type choices
FILE_TYPE_NAMES: tuple[str, ...] = tuple(_FILE_BY_NAME)  # --type choices
BLOCK_NAMES: tuple[str, ...] = tuple(t.name for t in GGML_TYPES if t.kernels)
VIA_NAMES: tuple[str, ...] = ("f16", "bf16")  # --via: the intermediate files of the two-pass route


def get(qtype: GGMLQuantizationType) -> GGMLType:
    """The record of a GGML type we write."""
    try:
        return _BY_GGML[qtype]
    except KeyError:
        raise WeightopsError(
            f"GGML type {qtype.name} is not one weightops writes (it writes {', '.join(NAMES)})"
        ) from None


def find(name: str) -> GGMLType | None:
    """The record of a type by our name or gguf's (any case); None for a type we do not write."""
    return _BY_NAME.get(name.lower())


def parse(name: str) -> GGMLType:
    """A `--tensor-type` type name."""
    found = find(name)
    if found is None:
        raise WeightopsError(f"unknown GGUF type {name!r}; choose one of {', '.join(NAMES)}")
    return found


def find_file_type(name: str) -> FileType | None:
    """The record of a `--type` name (any case); None for an unknown one."""
    return _FILE_BY_NAME.get(name.lower())


def parse_file_type(name: str) -> FileType:
    """A `--type` name."""
    found = find_file_type(name)
    if found is None:
        raise WeightopsError(f"unknown GGUF type {name!r}; choose one of {', '.join(FILE_TYPE_NAMES)}")
    return found


@cache
def _resolve(ref: str) -> Callable:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
