"""Tensor dtypes by name, so references can be made, laid out and copied without torch.

Names are safetensors' header spellings ("BF16", "F32", ...). Importing torch takes longer
than `cp` of a 1 GB checkpoint (benchmarks/README.md); a pass-through copy never needs it, so
torch dtypes are looked up (and torch imported) only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import WeightopsError

if TYPE_CHECKING:
    import torch

# name -> (torch attribute, bytes per element, floating point)
_TABLE: dict[str, tuple[str, int, bool]] = {
    "BOOL": ("bool", 1, False),
    "U8": ("uint8", 1, False),
    "I8": ("int8", 1, False),
    "I16": ("int16", 2, False),
    "U16": ("uint16", 2, False),
    "F16": ("float16", 2, True),
    "BF16": ("bfloat16", 2, True),
    "I32": ("int32", 4, False),
    "U32": ("uint32", 4, False),
    "F32": ("float32", 4, True),
    "F64": ("float64", 8, True),
    "I64": ("int64", 8, False),
    "U64": ("uint64", 8, False),
    "F8_E5M2": ("float8_e5m2", 1, True),
    "F8_E4M3": ("float8_e4m3fn", 1, True),
}
SAFETENSORS_NAMES = frozenset(_TABLE)
# What `--dtype` (apply/make-delta, convert, verify) and bnb's `--compute-dtype` accept, in
# torch's spelling -> the name here; `auto` is each command's own default (documented there).
FLOAT_CHOICES: dict[str, str] = {_TABLE[n][0]: n for n in ("F32", "F16", "BF16")}
AUTO = "auto"
DTYPE_CHOICES: tuple[str, ...] = (AUTO, *FLOAT_CHOICES)
_TORCH_PREFIX = "torch."  # names of other torch dtypes (not written to safetensors), e.g. "torch.complex64"


def to_torch(name: str) -> torch.dtype:
    import torch

    entry = _TABLE.get(name)
    return getattr(torch, entry[0] if entry else name.removeprefix(_TORCH_PREFIX))


def name_of(dtype: torch.dtype) -> str:
    """The name of a torch dtype: safetensors' spelling, or "torch.<dtype>" outside the table."""
    text = str(dtype).removeprefix(_TORCH_PREFIX)
    for name, (attr, _, _) in _TABLE.items():
        if attr == text:
            return name
    return _TORCH_PREFIX + text


def torch_name(name: str) -> str:
    """torch's spelling without the module ("bfloat16"), as reports and manifests print it."""
    entry = _TABLE.get(name)
    return entry[0] if entry else name.removeprefix(_TORCH_PREFIX)


def itemsize(name: str) -> int:
    entry = _TABLE.get(name)
    return entry[1] if entry else to_torch(name).itemsize


def is_float(name: str) -> bool:
    entry = _TABLE.get(name)
    return entry[2] if entry else to_torch(name).is_floating_point


def from_choice(choice: str | None) -> torch.dtype | None:
    """A `--dtype` choice as a torch dtype; None for `auto` (or None)."""
    if choice is None or choice == AUTO:
        return None
    if choice not in FLOAT_CHOICES:
        raise WeightopsError(f"--dtype {choice!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    return to_torch(FLOAT_CHOICES[choice])
