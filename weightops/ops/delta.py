"""Deltas between checkpoints: `apply_delta` (base + delta) and `make_delta` (target − base).

Models such as Vicuna or ChatYuan-7B are published as `target − base` so that the base's
licence is respected. The scripts that rebuild them load both models whole and add by
position; these operators join two lazy streams by tensor name instead (the inputs may be
sharded differently and stored in different formats), compute each tensor in float32
rounded once to the output dtype, and hold only the pair in flight — never a model.

Conventions (see the README): embedding / output-head rows beyond the base's vocabulary
are stored as they are; tensors matched by `replace` are carried whole; everything else
that does not line up is an error naming the tensor, both shapes and both files; and a
"delta" whose norm gains look like a model's is refused unless `allow_suspicious`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import arch, dtypes
from ..arch import VOCAB_ROLES, ArchSpec, Role
from ..errors import WeightopsError, shown
from ..stream import BufferPool, Stream, TensorRef, matches_any, require_unique

# A fine-tune moves norm gains by a few percent; a model's gains are the size of the
# base's. A delta whose norm gains reach this fraction of the base's is not a difference.
GUARD_RATIO = 0.5
# Elements per arithmetic step: float32 temporaries stay at 16 MiB whatever the tensor.
_CHUNK = 1 << 22
# Buffers that old transformers saved and new ones recompute (rotary inv_freq), of any architecture.
_DROPPABLE = tuple(sorted({p.replace("{n}", "*") for name in arch.supported() for p in arch.get(name).droppable}))
_MAX_LISTED = 20
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class DeltaReport:
    """What a delta job did besides writing tensors: warnings for the user and, for
    make-delta, how many elements apply-delta will give back differently, per tensor."""

    warnings: list[str] = field(default_factory=list)
    round_trip: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (differing, total)
    expanded: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def round_trip_warning(self, dtypes: str) -> str | None:
        differing = sum(d for d, _ in self.round_trip.values())
        if not differing:
            return None
        total = sum(t for _, t in self.round_trip.values())
        worst = sorted(self.round_trip.items(), key=lambda kv: -kv[1][0] / max(kv[1][1], 1))[:3]
        listed = ", ".join(f"{n} {d / t:.2%}" for n, (d, t) in worst if d)
        return (
            f"the {dtypes} delta does not round-trip: apply-delta will give back {differing / total:.4%} of the "
            f"target's elements ({differing} of {total}) differently (worst: {listed}); "
            "use --dtype float32 for a delta that rebuilds the target bit for bit"
        )


@dataclass(frozen=True)
class _Pair:
    """One output tensor: `other` is the delta (apply) or the target (make); `base` may be None."""

    base: TensorRef | None
    other: TensorRef
    mode: str  # "combine", "expand" or "replace"


def apply_delta(
    base: Stream,
    delta: Stream,
    *,
    dtype: torch.dtype | None = None,
    replace: Sequence[str] = (),
    allow_suspicious: bool = False,
    labels: tuple[str, str] = ("BASE", "DELTA"),
    report: DeltaReport | None = None,
) -> list[TensorRef]:
    """`base + delta` per tensor, joined by name, in float32, cast to `dtype` (None: the delta's).

    Rows of the delta's embedding / output head beyond the base's are taken as they are;
    tensors matching a `replace` glob are taken whole from the delta.
    """
    pairs = _join(list(base), list(delta), replace, labels, report)
    _guard_apply([p for p in pairs if p.mode == "combine"], labels, allow_suspicious)
    pool = BufferPool()
    return [_output(p, +1, dtype, None, pool) for p in pairs]


def make_delta(
    base: Stream,
    target: Stream,
    *,
    dtype: torch.dtype | None = None,
    replace: Sequence[str] = (),
    allow_suspicious: bool = False,
    labels: tuple[str, str] = ("BASE", "TARGET"),
    report: DeltaReport | None = None,
) -> list[TensorRef]:
    """`target − base` per tensor, joined by name, in float32, cast to `dtype` (None: the target's).

    Rows of the target's embedding / output head beyond the base's are stored as they are;
    tensors matching a `replace` glob are stored whole. While the output streams, `report`
    collects per tensor how many elements `apply_delta` would give back differently.
    """
    pairs = _join(list(base), list(target), replace, labels, report)
    _guard_make([p for p in pairs if p.mode == "combine"], labels, allow_suspicious)
    pool = BufferPool()
    return [_output(p, -1, dtype, report, pool) for p in pairs]


# --- joining by name ---------------------------------------------------------------------------


def _join(
    base: list[TensorRef],
    other: list[TensorRef],
    replace: Sequence[str],
    labels: tuple[str, str],
    report: DeltaReport | None,
) -> list[_Pair]:
    """Pair tensors by (architecture-normalised) name; collect every mismatch, then fail once."""
    require_unique(base)
    require_unique(other)
    table = arch.detect({r.name for r in base} | {r.name for r in other}, "hf")
    key = table.normalize_hf if table else (lambda n: n)
    by_key_base = _keyed(base, key, labels[0])
    by_key_other = _keyed(other, key, labels[1])
    vocab = _vocab_keys(table, set(by_key_base) | set(by_key_other))
    for glob in replace:
        if not any(matches_any(r.name, [glob]) or matches_any(key(r.name), [glob]) for r in other):
            raise WeightopsError(f"--replace {glob!r} matches no tensor of {labels[1]}")
    problems: list[str] = []
    pairs: list[_Pair] = []
    for k, o in by_key_other.items():
        b = by_key_base.get(k)
        if matches_any(o.name, replace) or matches_any(k, replace):
            pairs.append(_Pair(b, o, "replace"))
        elif b is None:
            problems += _unpaired(k, o, labels[1], labels[0], by_key_base, vocab, report)
        else:
            problem, mode = _check_pair(b, o, k in vocab, labels)
            if problem:
                problems.append(problem)
            else:
                pairs.append(_Pair(b, o, mode))
    for k, b in by_key_base.items():
        if k not in by_key_other:
            problems += _unpaired(k, b, labels[0], labels[1], by_key_other, vocab, report)
    if problems:
        shown = problems[:_MAX_LISTED] + (
            [f"... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else []
        )
        raise WeightopsError(f"{labels[0]} and {labels[1]} do not line up:\n  " + "\n  ".join(shown))
    if report is not None:
        report.expanded += [p.other.name for p in pairs if p.mode == "expand"]
        report.replaced += [p.other.name for p in pairs if p.mode == "replace"]
    return pairs


def _keyed(refs: list[TensorRef], key: Callable[[str], str], label: str) -> dict[str, TensorRef]:
    out: dict[str, TensorRef] = {}
    for r in refs:
        k = key(r.name)
        if k in out:
            raise WeightopsError(
                f"{label}: tensors {out[k].name!r} ({out[k].source}) and {r.name!r} ({r.source}) "
                "are the same tensor under two spellings"
            )
        out[k] = r
    return out


def _vocab_keys(table: ArchSpec | None, keys: set[str]) -> dict[str, Role]:
    """Keys of the embedding and output head (rows indexed by token id) -> their role."""
    if table is None:
        return {}
    return {k: role for k in keys if (role := table.role(k, "hf")) in VOCAB_ROLES}


def _unpaired(
    key: str,
    ref: TensorRef,
    have: str,
    lack: str,
    lacking: dict[str, TensorRef],
    vocab: dict[str, Role],
    report: DeltaReport | None,
) -> list[str]:
    """A tensor on one side only: tied/untied heads and everything else are errors; buffers
    that transformers recomputes are dropped with a warning."""
    if matches_any(key, _DROPPABLE):
        if report is not None:
            report.warnings.append(
                f"dropped {ref.name!r} ({ref.source}): only {have} has it, and transformers "
                "recomputes this buffer on load"
            )
        return []
    if vocab.get(key) is Role.OUTPUT and any(vocab.get(k) is Role.EMBEDDING for k in lacking):
        return [
            f"tied vs untied embeddings: {have} has a separate output head {ref.name!r} ({ref.source}) but "
            f"{lack} has none (its output head is tied to the embedding); the two are not the same model "
            "layout and cannot be combined"
        ]
    return [f"tensor {ref.name!r} {ref.shape} is in {have} ({ref.source}) but missing from {lack}"]


def _check_pair(b: TensorRef, o: TensorRef, is_vocab: bool, labels: tuple[str, str]) -> tuple[str | None, str]:
    """(problem or None, mode) for a tensor present on both sides."""
    where = f"{labels[0]} has {b.shape} ({b.source}), {labels[1]} has {o.shape} ({o.source})"
    for r, label in ((b, labels[0]), (o, labels[1])):
        if not r.dtype.is_floating_point:
            return (
                f"tensor {r.name!r} is {_dtype_name(r.dtype)} in {label} ({r.source}): differences are only "
                f"defined for floating-point tensors; pass --replace {r.name!r} to carry it whole"
            ), ""
    if b.shape == o.shape:
        return None, "combine"
    if is_vocab and len(b.shape) == len(o.shape) and b.shape[1:] == o.shape[1:] and o.shape[0] > b.shape[0]:
        return None, "expand"
    if is_vocab and b.shape[1:] == o.shape[1:]:
        return (
            f"tensor {o.name!r}: {labels[1]} has fewer vocabulary rows than {labels[0]}: {where}; "
            f"a delta can add rows to the base's vocabulary, not remove them"
        ), ""
    return f"tensor {o.name!r} has different shapes: {where}", ""


# --- guard rails -----------------------------------------------------------------------------


def _norm_gains(pairs: list[_Pair]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, base, other) in float64 for every 1-D `*weight` pair: RMSNorm/LayerNorm gains
    (biases are named `bias`). They are tiny, so loading them all up front is cheap."""
    return [
        (p.other.name, p.base.load().double(), p.other.load().double())
        for p in pairs
        if p.base is not None and len(p.other.shape) == 1 and p.other.name.endswith("weight")
    ]


def _flagged(rows: list[tuple[str, float, float]]) -> list[str]:
    return [
        f"{name} ({num / den:.2f})" if den else f"{name} (base all zero)"
        for name, num, den in rows
        if num and num >= GUARD_RATIO * den
    ]


def _listing(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _guard_apply(pairs: list[_Pair], labels: tuple[str, str], allow: bool) -> None:
    """Refuse a delta whose norm gains are as large as the base's: it is a model, not a difference."""
    gains = _norm_gains(pairs)
    if allow or not gains:
        return
    sum_b = sum(float(b.abs().sum()) for _, b, _ in gains)
    sum_d = sum(float(d.abs().sum()) for _, _, d in gains)
    if not sum_d or sum_d < GUARD_RATIO * sum_b:
        return
    result = sum(float((b + d).abs().sum()) for _, b, d in gains) / sum_b if sum_b else float("inf")
    if sum_d >= sum_b / GUARD_RATIO:
        why = (
            f"{labels[0]}'s norm weights sit near 0 while {labels[1]}'s do not: {labels[0]} looks like a delta "
            "(were BASE and DELTA swapped?)"
        )
    elif result >= 1 + GUARD_RATIO:
        why = (
            f"the result's norm weights would be {result:.2f}x the base's (near 2, not 1): {labels[1]} looks "
            "like a full model, or a delta that was already applied"
        )
    elif result <= 1 - GUARD_RATIO:
        why = (
            f"the result's norm weights would nearly vanish ({result:.2f}x the base's, near 0, not 1): the delta "
            f"was made against another base, or as base - target"
        )
    else:
        why = (
            f"{labels[1]}'s norm weights are {sum_d / sum_b:.2f}x the base's, where a fine-tune's differences "
            f"sit near 0: {labels[1]} looks like a full model, or {labels[0]} is itself a delta"
        )
    flagged = _flagged([(n, float(d.abs().sum()), float(b.abs().sum())) for n, b, d in gains])
    raise WeightopsError(
        f"refusing to apply: {why}. Norm weights that triggered this (delta/base ratio): "
        f"{_listing(flagged)}. Pass --allow-suspicious-delta if this is really intended"
    )


def _guard_make(pairs: list[_Pair], labels: tuple[str, str], allow: bool) -> None:
    """Refuse a delta whose norm gains are as large as the base's: the inputs are not a model
    and its fine-tune (one of them may already be a delta)."""
    gains = _norm_gains(pairs)
    if allow or not gains:
        return
    sum_b = sum(float(b.abs().sum()) for _, b, _ in gains)
    sum_t = sum(float(t.abs().sum()) for _, _, t in gains)
    sum_d = sum(float((t - b).abs().sum()) for _, b, t in gains)
    if not sum_d or sum_d < GUARD_RATIO * sum_b:
        return
    if not sum_b or sum_t / sum_b >= 1 / GUARD_RATIO:
        why = f"{labels[0]}'s norm weights sit near 0 while {labels[1]}'s do not: {labels[0]} looks like a delta"
    elif sum_t / sum_b <= GUARD_RATIO:
        why = f"{labels[1]}'s norm weights sit near 0 while {labels[0]}'s do not: {labels[1]} looks like a delta"
    else:
        why = (
            f"the delta's norm weights would be {sum_d / sum_b:.2f}x the base's, where a fine-tune's differences "
            f"sit near 0: {labels[1]} is not a fine-tune of {labels[0]}"
        )
    flagged = _flagged([(n, float((t - b).abs().sum()), float(b.abs().sum())) for n, b, t in gains])
    raise WeightopsError(
        f"refusing to make a delta: {why}. Norm weights that triggered this (delta/base ratio): "
        f"{_listing(flagged)}. Pass --allow-suspicious-delta if this is really intended"
    )


# --- arithmetic ------------------------------------------------------------------------------


def _output(
    pair: _Pair, sign: int, dtype: torch.dtype | None, report: DeltaReport | None, pool: BufferPool
) -> TensorRef:
    o, b = pair.other, pair.base
    out_dtype = dtype if dtype is not None and o.dtype.is_floating_point else o.dtype
    if pair.mode == "replace":
        return TensorRef(
            name=o.name,
            shape=o.shape,
            dtype_name=dtypes.name_of(out_dtype),
            source=o.source,
            loader=_carry(o, out_dtype, report),
            releaser=o.release,
        )
    assert b is not None  # only a replaced tensor may lack a base
    lent: list[torch.Tensor] = []  # the pool buffer the loaded tensor lives in, until release

    def release() -> None:
        b.release()
        o.release()
        while lent:
            pool.give(lent.pop())

    return TensorRef(
        name=o.name,
        shape=o.shape,
        dtype_name=dtypes.name_of(out_dtype),
        loader=_combiner(b, o, sign, out_dtype, report, pool, lent),
        source=f"{b.source} {'+' if sign > 0 else '-'} {o.source}",
        releaser=release,
    )


def _carry(o: TensorRef, out_dtype: torch.dtype, report: DeltaReport | None) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        t = o.load()
        out = t.to(out_dtype)
        if out.is_floating_point() and not _finite(out):
            raise _not_finite(out, o.name, o.source, "carried whole (--replace)", _finite(t))
        if report is not None:
            report.round_trip[o.name] = (_count_different(out.to(t.dtype), t), t.numel())
        return out

    return load


def _combiner(
    b: TensorRef,
    o: TensorRef,
    sign: int,
    out_dtype: torch.dtype,
    report: DeltaReport | None,
    pool: BufferPool,
    lent: list[torch.Tensor],
) -> Callable[[], torch.Tensor]:
    """`other ± base` for the base's rows, `other` as it is for rows beyond them, in a pool
    buffer (`lent` until released); with a report (make-delta), also count the elements
    `base + delta` would not give back."""

    def load() -> torch.Tensor:
        base_t, other_t = b.load().reshape(-1), o.load()
        buffer, out = pool.take(o.shape, out_dtype)
        lent.append(buffer)
        flat_o, flat_out = other_t.reshape(-1), out.view(-1)
        n = base_t.numel()
        differing = 0
        for i in range(0, n, _CHUNK):
            part = slice(i, min(i + _CHUNK, n))
            _combine_into(flat_out[part], flat_o[part], base_t[part], sign)
            if not _finite(flat_out[part]):
                inputs_finite = _finite(flat_o[part]) and _finite(base_t[part])
                raise _not_finite(
                    flat_out[part],
                    o.name,
                    f"{b.source} {'+' if sign > 0 else '-'} {o.source}",
                    "base + delta" if sign > 0 else "target - base",
                    inputs_finite,
                )
            if report is not None:
                back = torch.empty(part.stop - i, dtype=other_t.dtype)
                _combine_into(back, base_t[part], flat_out[part], +1)
                differing += _count_different(back, flat_o[part])
        flat_out[n:].copy_(flat_o[n:])  # expanded vocabulary rows, stored as they are
        if not _finite(flat_out[n:]):
            raise _not_finite(
                flat_out[n:], o.name, o.source, "its rows beyond the base's vocabulary", _finite(flat_o[n:])
            )
        if report is not None:
            differing += _count_different(flat_out[n:].to(other_t.dtype), flat_o[n:])
            report.round_trip[o.name] = (differing, out.numel())
        return out

    return load


def _finite(x: torch.Tensor) -> bool:
    """No NaN and no infinity in `x`. min and max propagate NaN, and an infinity is the min or
    the max: one read-only pass, about as long as the add itself (isfinite().all() takes 8x)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x.float() if x.dtype.itemsize == 1 else x)  # no float8 kernel
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _not_finite(values: torch.Tensor, name: str, source: str, what: str, inputs_finite: bool) -> WeightopsError:
    """NaN or inf in an output tensor: a model built from it computes NaN. Either an input
    holds them, or the sum overflowed the output dtype."""
    wide = values.float()
    nan, inf = int(torch.isnan(wide).sum()), int(torch.isinf(wide).sum())
    why = (
        "the inputs are finite, so the result overflows the output dtype "
        f"{_dtype_name(values.dtype)}: use --dtype float32"
        if inputs_finite
        else "an input holds them"
    )
    return WeightopsError(
        f"{shown(source)}: tensor {name!r}: {what} has NaN or infinite values (at least {nan} "
        f"NaN and {inf} inf) "
        f"({why}); a model with them computes NaN, so nothing was written"
    )


def _combine_into(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, sign: int) -> None:
    """`out = x ± y`, computed in float32 (float64 for float64 inputs), rounded once to out's dtype.

    When all three share a dtype, torch's own kernel gives the same bits in one pass: for
    16-bit floats it rounds the float32 result once (and float32 carries more than 2p + 2
    bits, so even a kernel that rounds the exact sum directly agrees).
    """
    if x.dtype == y.dtype == out.dtype:
        (torch.add if sign > 0 else torch.sub)(x, y, out=out)
        return
    acc = x.to(torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32), copy=True)
    acc.add_(y) if sign > 0 else acc.sub_(y)
    out.copy_(acc)


def _count_different(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bits differ (so -0.0 vs 0.0 and NaN payloads count: checksums see them)."""
    if a.numel() == 0:
        return 0
    as_int = _INT_OF_SIZE[a.dtype.itemsize]
    return int(torch.count_nonzero(a.view(as_int) != b.view(as_int)))  # faster than bool .sum()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
