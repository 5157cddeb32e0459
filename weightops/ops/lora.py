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
from dataclasses import dataclass, replace
from functools import partial

import torch

from ..devices import cpu_pool, run_chunks
from ..errors import WeightopsError, shown
from ..stream import BufferPool, TensorRef, cast

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
    without steps pass through untouched. A merged tensor may live in memory reused once its
    reference is released."""
    if rounding not in ROUNDINGS:
        raise WeightopsError(f"--rounding {rounding!r}: choose one of {', '.join(ROUNDINGS)}")
    pool = BufferPool()
    for ref in stream:
        chain = steps.get(ref.name, ())
        if not chain:
            yield from cast([ref], dtype)
            continue
        if not ref.is_float:
            raise WeightopsError(f"{shown(ref.source)}: tensor {ref.name!r} is {ref.dtype_name}: LoRA adds to floats")
        shape = next((s.replace.shape for s in reversed(chain) if s.replace is not None), ref.shape)
        out_dtype = dtype or ref.dtype
        lent: list[torch.Tensor] = []  # the pool buffer a loaded result lives in, until released
        merger = _merger(ref, tuple(chain), rounding, out_dtype, partial(_lend, pool, lent))
        merged = ref.derive(merger, shape=shape, dtype=out_dtype)
        yield replace(merged, releaser=partial(_give_back, ref, pool, lent))


def _lend(pool: BufferPool, lent: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    buffer, tensor = pool.take(shape, dtype)
    lent.append(buffer)
    return tensor


def _give_back(ref: TensorRef, pool: BufferPool, lent: list[torch.Tensor]) -> None:
    ref.release()
    while lent:
        pool.give(lent.pop())


def _merger(
    ref: TensorRef,
    chain: tuple[Step, ...],
    rounding: str,
    out_dtype: torch.dtype,
    take: Callable[[tuple[int, ...], torch.dtype], torch.Tensor],
):
    updates = _blockable(ref, chain)

    def merge(w: torch.Tensor) -> torch.Tensor:
        if updates is not None:
            out = take(ref.shape, out_dtype)
            return _blocked(ref, w, updates, rounding, out, partial(_refuse, ref, chain))
        out = _once(w, chain, out_dtype) if rounding == "once" else _peft(w, chain, out_dtype)
        if not _finite(out):
            _refuse(ref, chain, out.dtype)
        return out

    return merge


def _refuse(ref: TensorRef, chain: tuple[Step, ...], dtype: torch.dtype) -> None:
    adapters = ", ".join(dict.fromkeys(shown(s.adapter) for s in chain))
    raise WeightopsError(
        f"{shown(ref.source)}: tensor {ref.name!r}: merging {adapters} gives NaN or infinite values "
        f"({dtype}); a model with them computes NaN, so nothing was written"
    )


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
    wide = _wide(w.dtype)
    acc = w  # widened by the first change: `delta + w` is `acc += delta` with w widened first
    for step in chain:
        if step.replace is not None:
            acc = step.replace.load()
        for u in step.updates:
            if isinstance(u, Shift):
                bias = u.bias.load()
                acc = _owned(acc, wide).add_(bias.to(_wide(wide, bias.dtype)) * u.scaling)
                continue
            work = _wide(wide, u.a.dtype, u.b.dtype)
            delta = _delta(u, partial(torch.Tensor.to, dtype=work))
            acc = _dora(acc.to(wide), delta, u) if u.magnitude is not None else _add(acc, delta, u, wide)
    return acc.to(wide).to(out_dtype)


# --- peft: merge_and_unload's arithmetic, adapter after adapter ----------------------------------


def _autocast(t: torch.Tensor) -> torch.Tensor:
    """PeftModel.from_pretrained's autocast_adapter_dtype: 16-bit adapter weights become float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _peft(w: torch.Tensor, chain: tuple[Step, ...], dtype: torch.dtype) -> torch.Tensor:
    weight = w.to(dtype)  # the model loaded in `dtype` (still the reader's memory if it was `dtype`)
    for step in chain:
        if step.replace is not None:
            weight = step.replace.load().to(dtype)  # load_state_dict copies into the parameter
        for u in step.updates:
            if isinstance(u, Shift):
                weight = _owned(weight, dtype).add_(_autocast(u.bias.load()) * u.scaling)  # bias.data += ...
                continue
            delta = _delta(u, _autocast)
            if u.magnitude is not None:
                weight = _dora(weight, delta, u).to(dtype)
            elif u.embedding:
                weight = _owned(weight, dtype).add_(delta.to(dtype))  # Embedding.merge: delta cast to dtype first
            else:  # Linear.merge: weight.data += delta, computed in float32, rounded to the weight's dtype
                weight = _add(weight, delta, u, dtype)
    return weight


# --- the arithmetic both share -------------------------------------------------------------------

_SLICE = 1 << 16  # values per slice of a mixed-dtype addition (its temporaries stay cache-sized)


def _owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as `dtype` in memory of our own, to change in place (a loaded tensor may be the
    reader's read-only mapping)."""
    return t.to(dtype, copy=True)


def _delta(u: LowRank, convert: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`transpose(B @ A) · scaling` of the factors as `convert` gives them, as PEFT's
    get_delta_weight and the Chinese-LLaMA scripts write it. The factors' pages are dropped
    afterwards: together they are as large as a few layers, and kept mapped they would add up
    over the whole model."""
    product = convert(u.b.load()) @ convert(u.a.load())
    u.a.release()
    u.b.release()
    return (product.T if u.transpose else product).mul_(u.scaling)  # in place: product is ours


def _add(w: torch.Tensor, delta: torch.Tensor, u: LowRank, dtype: torch.dtype) -> torch.Tensor:
    """`w += delta` as `dtype` (computed in the wider of w's and delta's dtypes), on `u.rows` of
    w, without changing `w` itself. With `delta` the wider and the same shape, w is added into
    delta (addition commutes: the same bits) slice by slice, so neither a copy of w nor the
    mixed-dtype kernel's whole-tensor temporary is made."""
    if (
        u.rows is None
        and w.dim() > 0
        and delta.shape == w.shape
        and torch.promote_types(w.dtype, delta.dtype) == delta.dtype
    ):
        rows = max(1, _SLICE // max(1, w[0].numel()))
        for start in range(0, w.shape[0], rows):
            delta[start : start + rows].add_(w[start : start + rows])
        return delta.to(dtype, memory_format=torch.contiguous_format)
    w = _owned(w, dtype)
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


# --- row-blocked: Linear products, one block of output rows at a time ------------------------------

_ROWS = 128  # output rows per block: every block's product has exactly this many rows (see _blocked)
_DROP_EVERY = 1 << 22  # bytes of a mapped base read between drops of its pages


def _blockable(ref: TensorRef, chain: tuple[Step, ...]) -> tuple[LowRank, ...] | None:
    """The chain's updates when all are plain Linear products on a whole, non-empty 2-D tensor
    (no replacement, row view, transposition, embedding or DoRA), which `_blocked` merges."""
    if len(ref.shape) != 2 or ref.numel == 0 or any(step.replace is not None for step in chain):
        return None
    updates = [u for step in chain for u in step.updates]
    plain = [
        u
        for u in updates
        if isinstance(u, LowRank) and u.rows is None and not (u.transpose or u.embedding or u.magnitude)
    ]
    return tuple(plain) if plain and len(plain) == len(updates) else None


def _blocked(
    ref: TensorRef,
    w: torch.Tensor,
    updates: tuple[LowRank, ...],
    rounding: str,
    out: torch.Tensor,
    refuse: Callable[[torch.dtype], None],
) -> torch.Tensor:
    """`_once` / `_peft` for `_blockable` updates, computed block of output rows by block into
    `out` (of the output dtype): each block's products (`B[rows] @ A`), sums and roundings are
    those of the same rows of the whole-tensor formula, but stay in cache, and neither the
    float32 product nor any float32 copy of the tensor is ever whole in memory. The blocks are split among the CPU
    workers (`devices.cpu_pool`), each running torch single-threaded: a block is a few small
    ops, and torch's own threads would meet at a barrier after each.

    Bit identity rests on one property of the matrix product: the rows of `B[r0:r0+n] @ A` are
    those of `B @ A` when every block has the same `n` rows (MKL computes an element the same
    way for any such block, on any number of threads; blocks of 1 to 7 rows, such as a short
    last block, may not). So every block has exactly `_ROWS` rows, and the last one overlaps the
    one before instead of being short (its product is computed from the base rows the block
    before also covers; only its own rows are written); a tensor with fewer rows is one block,
    the whole formula itself. tests/ops/test_lora_blocked.py checks the property on this
    machine's BLAS."""
    once = rounding == "once"
    wide, out_dtype = _wide(w.dtype), out.dtype
    factors = []
    for u in updates:  # as `_delta` converts them
        convert = partial(torch.Tensor.to, dtype=_wide(wide, u.a.dtype, u.b.dtype)) if once else _autocast
        factors.append((convert(u.b.load()), convert(u.a.load()), u.scaling))
    rows = w.shape[0]
    n = min(_ROWS, rows)
    blocks = -(-rows // n)
    workers, pool = cpu_pool()
    per_worker = -(-blocks // workers)
    drop = max(1, _DROP_EVERY // (n * w[0].numel() * w.element_size() or 1)) if ref.mapped else 0

    def run(first: int) -> None:
        for i in range(first, min(blocks, first + per_worker)):
            start = min(i * n, rows - n)  # the last block overlaps the one before
            block = slice(start, start + n)
            acc = w[block] if once else w[block].to(out_dtype)
            for j, (b, a, scaling) in enumerate(factors):
                acc = _plus((b[block] @ a).mul_(scaling), acc)
                if once or j < len(factors) - 1:  # peft's last rounding is the copy into `out`
                    acc = acc.to(wide if once else out_dtype)
            target = out[i * n : start + n]
            target.copy_(acc[i * n - start :])
            if not _finite(target):
                refuse(out_dtype)
            if drop and (i - first + 1) % drop == 0:
                ref.release()  # the base's pages read so far leave RSS (`TensorRef.mapped`)

    run_chunks(run, range(0, blocks, per_worker), pool)
    for u in updates:
        u.a.release()
        u.b.release()
    if ref.mapped:
        ref.release()
    return out


def _plus(delta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`w + delta` in the wider dtype, in delta's memory when it is the wider (the sum commutes)."""
    if torch.promote_types(w.dtype, delta.dtype) == delta.dtype:
        return delta.add_(w)
    return torch.add(w, delta)
