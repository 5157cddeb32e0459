"""Merging LoRA adapters into a stream of base tensors, one tensor at a time.

PEFT's `merge_and_unload` and TencentPretrain's `eval()` add `scaling · B @ A` to weights
held in memory, so the whole model must be. Here each adapter's change to a tensor is a
`Step` (take a whole tensor in its place, then add low-rank products or bias shifts), every
tensor of the stream goes through the steps of all adapters in their order, and only that
tensor (plus the adapters' small factors) is in memory.

Two rounding rules, because the two reference implementations differ:

* `once`: everything in float32 (float64 for float64 inputs), rounded once to the output
  dtype at the end, whatever the number of adapters: Chinese-LLaMA-Alpaca's merge scripts'
  `W += transpose(B.float() @ A.float()) · scaling` on a float16 W, bit for bit.
* `peft`: `merge_and_unload` on CPU, bit for bit, adapter after adapter. PEFT holds the
  factors in float32 (`autocast_adapter_dtype` upcasts float16/bfloat16), so a Linear's
  float32 delta is added to the weight in place (rounded once per adapter); an embedding's
  delta is first cast to the weight dtype and then added (rounded twice); DoRA rescales in
  float32 and rounds once; `lora_bias` adds `lora_B.bias · scaling`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import WeightopsError, shown
from ..stream import TensorRef, cast

ROUNDINGS = ("once", "peft")


@dataclass(frozen=True)
class LowRank:
    """`scaling · B @ A` added to a tensor: A is [r, in] and B [out, r] (`transpose`: the
    product is stored transposed, as for fan_in_fan_out layers and embeddings, whose
    lora_embedding_A is [r, rows]). `magnitude` makes it DoRA: each output row is rescaled to
    the magnitude's length. `rows` gives the view of the tensor the product lands on, in the
    adapter's row order (a TencentPretrain adapter on Hugging Face rows); None: all of it."""

    a: TensorRef
    b: TensorRef
    scaling: float
    transpose: bool = False
    embedding: bool = False
    magnitude: TensorRef | None = None
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class Shift:
    """`scaling · bias` added to a bias (PEFT's lora_bias: `lora_B.bias`)."""

    bias: TensorRef
    scaling: float


Update = LowRank | Shift


@dataclass(frozen=True)
class Step:
    """What one adapter does to one tensor, in PEFT's order: `replace` it with a whole tensor
    (modules_to_save; it may have more vocabulary rows), then add the `updates`. `adapter`
    names the adapter in errors."""

    adapter: str
    replace: TensorRef | None = None
    updates: tuple[Update, ...] = ()


def merge_lora(
    stream: Iterable[TensorRef],
    steps: Mapping[str, Sequence[Step]],
    *,
    rounding: str = "once",
    dtype: torch.dtype | None = None,
) -> Iterator[TensorRef]:
    """Every tensor of `stream` with the `steps` for its name applied in order (see the module
    doc for `rounding`), cast to `dtype` (None: each tensor keeps the base's dtype). Tensors
    without steps pass through untouched."""
    if rounding not in ROUNDINGS:
        raise WeightopsError(f"--rounding {rounding!r}: choose one of {', '.join(ROUNDINGS)}")
    for ref in stream:
        chain = steps.get(ref.name, ())
        if not chain:
            yield from cast([ref], dtype)
            continue
        if not ref.is_float:
            raise WeightopsError(f"{shown(ref.source)}: tensor {ref.name!r} is {ref.dtype_name}: LoRA adds to floats")
        shape = next((s.replace.shape for s in reversed(chain) if s.replace is not None), ref.shape)
        out_dtype = dtype or ref.dtype
        yield ref.derive(_merger(ref, tuple(chain), rounding, out_dtype), shape=shape, dtype=out_dtype)


def _merger(ref: TensorRef, chain: tuple[Step, ...], rounding: str, out_dtype: torch.dtype):
    def merge(w: torch.Tensor) -> torch.Tensor:
        out = _once(w, chain, out_dtype) if rounding == "once" else _peft(w, chain, out_dtype)
        if not _finite(out):
            adapters = ", ".join(dict.fromkeys(shown(s.adapter) for s in chain))
            raise WeightopsError(
                f"{shown(ref.source)}: tensor {ref.name!r}: merging {adapters} gives NaN or infinite values "
                f"({out.dtype}); a model with them computes NaN, so nothing was written"
            )
        return out

    return merge


def _finite(x: torch.Tensor) -> bool:
    """No NaN or infinity: min and max propagate NaN and an infinity is one of them (one
    read-only pass; isfinite().all() takes many times longer)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


# --- once: float32 throughout, one rounding ----------------------------------------------------


def _wide(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _once(w: torch.Tensor, chain: tuple[Step, ...], out_dtype: torch.dtype) -> torch.Tensor:
    acc = w.to(_wide(w.dtype), copy=True)
    for step in chain:
        if step.replace is not None:
            acc = step.replace.load().to(_wide(acc.dtype), copy=True)
        for u in step.updates:
            if isinstance(u, Shift):
                bias = u.bias.load()
                acc.add_(bias.to(_wide(acc.dtype, bias.dtype)) * u.scaling)
                continue
            a, b = u.a.load(), u.b.load()
            work = _wide(acc.dtype, a.dtype, b.dtype)
            delta = _delta(a.to(work), b.to(work), u)
            acc = _dora(acc, delta, u) if u.magnitude is not None else _add(acc, delta, u)
    return acc.to(out_dtype)


# --- peft: merge_and_unload's arithmetic, adapter after adapter ----------------------------------


def _autocast(t: torch.Tensor) -> torch.Tensor:
    """PeftModel.from_pretrained's autocast_adapter_dtype: 16-bit adapter weights become float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _peft(w: torch.Tensor, chain: tuple[Step, ...], dtype: torch.dtype) -> torch.Tensor:
    weight = w.to(dtype, copy=True)  # the model loaded in `dtype`
    for step in chain:
        if step.replace is not None:
            weight = step.replace.load().to(dtype, copy=True)  # load_state_dict copies into the parameter
        for u in step.updates:
            if isinstance(u, Shift):
                weight.add_(_autocast(u.bias.load()) * u.scaling)  # bias.data += lora_B.bias * scaling
                continue
            delta = _delta(_autocast(u.a.load()), _autocast(u.b.load()), u)
            if u.magnitude is not None:
                weight = _dora(weight, delta, u).to(dtype)
            elif u.embedding:
                weight.add_(delta.to(dtype))  # Embedding.merge: delta cast to the weight dtype first
            else:
                _add(weight, delta, u)  # Linear.merge: weight.data += delta, computed in float32
    return weight


# --- the arithmetic both share -------------------------------------------------------------------


def _delta(a: torch.Tensor, b: torch.Tensor, u: LowRank) -> torch.Tensor:
    """`transpose(B @ A) · scaling`, as PEFT's get_delta_weight and the Chinese-LLaMA scripts write it."""
    product = b @ a
    return (product.T if u.transpose else product) * u.scaling


def _add(w: torch.Tensor, delta: torch.Tensor, u: LowRank) -> torch.Tensor:
    """`w += delta` in place (in w's dtype, computed in the wider of the two), on `u.rows` of w."""
    if u.rows is None:
        w.add_(delta)
    else:
        target = u.rows(w)
        target.add_(delta.reshape(target.shape))
    return w


def _dora(w: torch.Tensor, delta: torch.Tensor, u: LowRank) -> torch.Tensor:
    """DoRA's merge (PEFT's DoraLinearVariant): `m / ‖W + ΔW‖ · (W + ΔW)`, the norm taken per
    output row of the unmerged weight `w`."""
    assert u.magnitude is not None
    oriented = (w.T if u.transpose else w) + 1 * (delta.T if u.transpose else delta)
    norm = torch.linalg.norm(oriented, dim=1).to(oriented.dtype)
    factor = _autocast(u.magnitude.load()) / norm
    factor = factor.view(-1, 1)
    return (factor.T if u.transpose else factor) * (w + delta)
