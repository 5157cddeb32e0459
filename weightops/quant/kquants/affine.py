"""Q2_K, Q4_K and Q5_K: a scale and a minimum per sub-block, chosen by libggml's
`make_qkx2_quants` search, then stored as 4-bit (Q2_K) or 6-bit (Q4_K, Q5_K) multiples of two
fp16 super-block scales (`quantize_row_q{2,4,5}_K_ref`; facts in shared/reference/kquants.md).

Every sub-block of a chunk is searched at once: values are laid out as (position, sub-block)
and each step of the reference's per-sub-block loops is one torch op over all sub-blocks, in
the reference's float32 order (no fused multiply-add, true divisions, sequential sums). Three
things keep the search cheap without changing any rounding:
- the level vector L of the best candidate is not carried through the 21 candidates: the
  candidate's (iscale, min) are, and L is recomputed from them only for the sub-blocks whose
  stored scale turns out to be zero (the only ones whose final L is the search's);
- the three sums of a candidate share one sequential pass (`common.accumulate`), laid out so
  that its least-squares fit takes three ops on (sub-block) vectors;
- rounding is torch.round, which equals the reference's nearest_int while |v| < 2**22. Each
  candidate's min is kept, and the extremes of each sub-block's rounded values are computed
  from them at the end (its smallest and largest x give them: the ops are monotonic); a chunk
  that leaves the range is redone with the bit-exact `nearest_exact` (only degenerate chunks:
  subnormal or overflowing ranges).
Every chunk-sized temporary is a per-thread `common.scratch` buffer written through `out=` and
in-place ops: fresh multi-MB tensors page-fault on their first write, which had cost a fifth
to a third of the CPU time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np
import torch

from ..ggml import _put_f16
from .common import NEAREST_LIMIT, accumulate, f32, nearest_byte, nearest_exact, scratch, sequential_sum, sqrt

CPU_BLOCKS = 1024  # super-blocks the CPU searches at once (256K values: fastest measured)


@dataclass(frozen=True)
class _Search:
    """make_qkx2_quants's arguments for one type."""

    size: int  # values per sub-block
    nmax: int  # largest level
    rmin: float
    rdelta: float
    nstep: int
    mad: bool  # absolute instead of squared errors
    scale_max: int  # sub-block scales and minimums are stored as 0..scale_max multiples of d, dmin

    @property
    def steps(self) -> list[float]:
        """The numerators `rmin + rdelta*is + nmax` of the candidate inverse scales, in float32."""
        one = np.float32
        return [float(one(self.rmin) + one(self.rdelta) * one(i) + one(self.nmax)) for i in range(self.nstep + 1)]


_Q2 = _Search(size=16, nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, mad=True, scale_max=15)
_Q4 = _Search(size=32, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20, mad=False, scale_max=63)
_Q5 = _Search(size=32, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15, mad=False, scale_max=63)
# With an importance matrix the search is make_qkx3_quants, which given weights is make_qkx2_quants
# with these arguments (squared errors for Q2_K too).
_Q2_WEIGHTED = _Search(size=16, nmax=3, rmin=-0.9, rdelta=0.05, nstep=36, mad=False, scale_max=15)
_Q4_WEIGHTED = _Search(size=32, nmax=15, rmin=-0.9, rdelta=0.05, nstep=36, mad=False, scale_max=63)
_Q5_WEIGHTED = _Search(size=32, nmax=31, rmin=-0.9, rdelta=0.05, nstep=36, mad=False, scale_max=63)


class _Fit(NamedTuple):
    """make_qkx2_quants's result per sub-block, plus what is needed to rebuild its L."""

    scale: torch.Tensor
    the_min: torch.Tensor  # -min
    iscale: torch.Tensor  # L = clamp(nearest(iscale * (x - base)))
    base: torch.Tensor
    ends: torch.Tensor  # (2, S): each sub-block's smallest and largest value
    regular: torch.Tensor  # 0-dim bool: every rounded value was below NEAREST_LIMIT (or exact)


def _levels(x: torch.Tensor, iscale: torch.Tensor, base: torch.Tensor, p: _Search, exact: bool, out: torch.Tensor):
    """clamp(nearest_int(iscale * (x - base)), 0, nmax) as float32 into out, per sub-block (column)."""
    v = torch.sub(x, base, out=out).mul_(iscale)
    if exact:
        nearest_exact(v, out=out)
    else:
        v.round_()
    return out.clamp_(0, p.nmax)


def _error(x, w, scale, low, levels, mad: bool, out: torch.Tensor) -> torch.Tensor:
    """The terms w * f(scale * L + min - x), f = abs or square, in out."""
    e = torch.mul(levels, scale, out=out).add_(low).sub_(x)
    return (e.abs_() if mad else e.mul_(e)).mul_(w)


# Row order of the sums table: the determinant and the two numerators of each candidate's
# least-squares fit are three products of slices of it (see _qkx2), computed in three ops.
_SUM_X, _SL, _SXL, _SUM_W, _SL2 = 0, 1, 2, 3, 4


def _qkx2(x: torch.Tensor, w: torch.Tensor, p: _Search, exact: bool) -> _Fit:
    """make_qkx2_quants for every column of (positions, sub-blocks) x with weights w."""
    size, n = x.shape
    dev = x.device
    lo, hi = x.amin(0), x.amax(0)
    _first_zero(x, lo)
    zero = torch.zeros((), dtype=x.dtype, device=dev)
    mn = torch.where(lo > 0, zero, lo)
    flat = hi == mn  # the reference returns L = 0, scale 0 at once
    ends = torch.stack([lo, hi])

    # xl[:, 0] = the candidate's L, xl[:, 1] = x; prod = [w*L, (w*L)*L, (w*L)*x] (one op for the last two)
    xl = scratch("affine.xl", (size, 2, n), x)
    xl[:, 1] = x
    x, levels = xl[:, 1], xl[:, 0]
    prod = scratch("affine.prod", (size, 3, n), x)
    # sums = [sum_x, sum_l, sum_xl, sum_w, sum_l2, sum_x]:
    #   sums[2:5] * sums[3:6] = [sum_w*sum_xl, sum_w*sum_l2, sum_l2*sum_x]
    #   sum_l * sums[0:3]     = [sum_x*sum_l,  sum_l*sum_l,  sum_l*sum_xl]
    # so their difference is [this_scale numerator, D, this_min numerator], as the reference has them
    sums = torch.zeros((6, n), dtype=x.dtype, device=dev)
    prod[:, 0] = w
    torch.mul(w, x, out=prod[:, 1])
    accumulate(sums, prod[:, :2], (_SUM_W, _SUM_X) * size)
    sums[5] = sums[_SUM_X]
    sum_l = sums[_SL]

    iscale = torch.where(flat, zero, f32(p.nmax, x) / (hi - mn))
    scale = torch.where(flat, zero, f32(1.0, x) / iscale)
    _levels(x, iscale, mn, p, exact, out=levels)
    err = scratch("affine.err", (size, n), x)  # contiguous: index_add_ is slow on strided rows
    best = torch.zeros((1, n), dtype=x.dtype, device=dev)
    accumulate(best, _error(x, w, scale, mn, levels, p.mad, out=err), (0,) * size)
    best = torch.where(flat, -torch.inf, best[0])  # no candidate is ever better
    # best error, scale, min, and the (iscale, min) that gave the best L; `new`: this candidate's
    state = torch.stack([best, scale, mn, iscale, mn])
    new = torch.empty_like(state)
    cur, fit = new[0:1], new[1:3]  # fit = [this_scale, this_min]
    refit = torch.zeros_like(fit)  # [sum_xl / sum_l2, 0]: the fit when this_min > 0
    mins = scratch("affine.mins", (p.nstep + 2, n), x)  # the min each candidate starts from
    terms, other = scratch("affine.terms", (3, n), x), scratch("affine.other", (3, n), x)
    mins[0] = mn
    targets = (_SL, _SL2, _SXL) * size
    for k, step in enumerate(_steps(p, dev), start=1):
        mn = mins[k].copy_(state[2])
        new[4] = mn
        iscale = torch.div(step, hi - mn, out=new[3])
        _levels(x, iscale, mn, p, exact, out=levels)
        torch.mul(w, levels, out=prod[:, 0])
        torch.mul(prod[:, 0:1], xl, out=prod[:, 1:3])
        sums[_SL : _SXL + 1].zero_()
        sums[_SL2].zero_()
        accumulate(sums, prod, targets)
        torch.mul(sums[2:5], sums[3:6], out=terms)
        terms.sub_(torch.mul(sum_l, sums[0:3], out=other))
        det = terms[1]
        torch.div(terms[0::2], det, out=fit)
        torch.div(sums[_SXL], sums[_SL2], out=refit[0])
        torch.where(fit[1] > 0, refit, fit, out=fit)
        cur.zero_()
        accumulate(cur, _error(x, w, fit[0], fit[1], levels, p.mad, out=err), (0,) * size)
        better = (cur[0] < state[0]).logical_and_(det > 0)
        torch.where(better, new, state, out=state)
    if exact:
        regular = torch.ones((), dtype=torch.bool, device=dev)
    else:  # every rounded value lies between those of the block's extremes
        inverse = torch.sub(hi, mins, out=scratch("affine.inverse", mins.shape, x))
        torch.div(_numerators(p, dev), inverse, out=inverse)
        bound = torch.sub(ends, mins.unsqueeze(1), out=scratch("affine.bound", (mins.shape[0], 2, n), x))
        bound = bound.mul_(inverse.unsqueeze(1)).abs_().amax((0, 1))
        regular = ((bound < NEAREST_LIMIT) | flat).all()
    return _Fit(state[1], -state[2], state[3], state[4], ends, regular)


def _first_zero(x: torch.Tensor, lo: torch.Tensor) -> None:
    """Where a column's minimum is zero, give it the sign of the column's first zero, as the
    reference's scan (`if (x[i] < min) min = x[i]`) keeps it and torch's amin may not. The
    legacy types store the search's min itself (Q4_1's m), so its sign reaches the bytes."""
    zero = lo == 0
    if bool(zero.any()):
        cols = zero.nonzero().view(-1)
        sub = x[:, cols]
        lo[cols] = sub.gather(0, (sub == 0).to(torch.uint8).argmax(0, keepdim=True))[0]


@cache
def _steps(p: _Search, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The candidates' `rmin + rdelta*is + nmax` as float32 0-dim tensors on device."""
    return tuple(torch.tensor(s, dtype=torch.float32, device=device) for s in p.steps)


@cache
def _numerators(p: _Search, device: torch.device) -> torch.Tensor:
    """(nstep + 2, 1): the first guess's nmax, then the candidates' numerators (`_steps`)."""
    return torch.tensor([float(p.nmax), *p.steps], dtype=torch.float32, device=device).unsqueeze(1)


def _super_scale(v: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, d): the sub-block values v (n, k) as `(uint8) nearest_int(top / max * v)` and
    d = fp16(max / top), max the largest positive value (0 if none; then every level is 0)."""
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    largest = torch.where(v > 0, v, zero).amax(1, keepdim=True)
    inverse = torch.where(largest > 0, f32(top, v) / largest, zero)
    return nearest_byte(inverse * v), (largest / f32(top, v)).to(torch.float16)


class _Levels(NamedTuple):
    """A chunk's stored values: levels (n, 256), d and dmin (n, 1) fp16, the sub-blocks' scale
    and min levels (n, k) uint8."""

    levels: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor


def _reference_scales(fit: _Fit, p: _Search) -> tuple[torch.Tensor, ...]:
    """(scale levels, min levels, d, dmin) as quantize_row_q{2,4,5}_K_ref stores them: levels
    against the largest sub-block scale and min."""
    per = 256 // p.size
    ls, d = _super_scale(fit.scale.view(-1, per), p.scale_max)
    lm, dmin = _super_scale(fit.the_min.view(-1, per), p.scale_max)
    if p.scale_max == 63:
        return ls.clamp_(max=63), lm.clamp_(max=63), d, dmin
    packed = ls | (lm << 4)  # Q2_K: one byte, scale | min << 4 (the reference ORs the shifted int into the byte)
    return packed & 0x0F, packed >> 4, d, dmin


def _importance(x: torch.Tensor, xs: torch.Tensor, weights: torch.Tensor, p: _Search) -> torch.Tensor:
    """The search's element weights qw * sqrt(sigma2 + x²), by position like `xs`: sigma2 is the
    super-block's sequential Σx² / 256, doubled for Q4_K and Q5_K (quantize_row_q{4,5}_K_impl)
    and not for Q2_K (quantize_row_q2_K_impl)."""
    w = scratch("affine.w", xs.shape, x)
    xb = w.view(256, -1).copy_(x.t())  # the sum runs over the whole super-block in element order
    factor = 1.0 if p.size == 16 else 2.0
    sigma2 = (f32(factor, x) * sequential_sum(xb.mul_(xb))) / f32(256, x)
    sigma2 = sigma2.repeat_interleave(256 // p.size)  # per sub-block (column of xs)
    torch.mul(xs, xs, out=w).add_(sigma2)  # sigma2 + x*x
    return sqrt(w, out=w).mul_(weights.reshape(-1, p.size).t())


def _weighted_scales(fit: _Fit, sw: torch.Tensor, p: _Search) -> tuple[torch.Tensor, ...]:
    """(scale levels, min levels, d, dmin) as quantize_row_q{2,4,5}_K_impl stores them: make_qp_quants
    of the sub-block scales and of the mins, each weighted by the sub-blocks' weight sums `sw`
    (n, k). The levels go through the bytes as the C stores them (uint8 stores that wrap, Q5_K's
    clamp to 63 that Q4_K lacks) and are read back from them."""
    per = sw.shape[1]
    ls, d = make_qp(fit.scale.view(-1, per), sw, p.scale_max)
    lm, dmin = make_qp(fit.the_min.view(-1, per), sw, p.scale_max)
    if p.scale_max == 15:  # Q2_K: scale | min << 4 in one byte
        packed = ls | (lm << 4)
        return packed & 0x0F, packed >> 4, d, dmin
    if p.nmax == 31:
        ls.clamp_(max=63)
        lm.clamp_(max=63)
    stored = torch.empty((ls.shape[0], 16), dtype=torch.uint8, device=ls.device)
    _put_scales_k4(stored, ls, lm)
    scales, mins = _scales_k4(stored)
    return scales, mins, d, dmin


def _qp_candidates(nmax: int) -> list[float]:
    """make_qp_quants' numerators `0.1f*is + nmax` for is = -4..4, is != 0, in float32."""
    one = np.float32
    return [float(one(0.1) * one(i) + one(nmax)) for i in range(-4, 5) if i]


def _wrap(levels: torch.Tensor) -> torch.Tensor:
    """Integer-valued float32 levels as the C's uint8 store keeps them (the low byte)."""
    return (levels.to(torch.int32) & 0xFF).to(torch.float32)


def make_qp(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """libggml's make_qp_quants(k, nmax, x, L, w) for every row of (n, k) x, weights w: (L (n, k)
    uint8 as the C stores it, scale (n, 1) float16 as the block stores it).

    A search over 9 inverse scales for the least weighted squared error, then at most five passes
    of coordinate descent, each a loop over the k positions vectorised across rows. A row whose
    pass changed nothing would change nothing in the next one, so rows run on together until
    no row changes. Rounding is the bit-exact nearest_int: the descent's x*sl2/slx can be huge."""
    xt, wt = x.t().contiguous(), w.t().contiguous()  # (k, n): sums run over the k positions in order
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    one = f32(1.0, x)
    top = xt.amax(0).clamp_(min=0)
    empty = top < 1e-15  # GROUP_MAX_EPS: L = 0, scale 0
    top = torch.where(empty, one, top)

    def error(iscale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        diff = xt - (one / iscale) * levels
        return sequential_sum((wt * diff) * diff)

    iscale = f32(nmax, x) / top
    best = error(iscale, _wrap(nearest_exact(iscale * xt)))
    for numerator in _qp_candidates(nmax):
        candidate = f32(numerator, x) / top
        mse = error(candidate, nearest_exact(candidate * xt).clamp_(max=nmax))
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, candidate, iscale)
    levels = nearest_exact(iscale * xt).clamp_(max=nmax)
    wx = wt * xt
    sumlx = sequential_sum(wx * levels)
    suml2 = sequential_sum((wt * levels) * levels)
    levels = _wrap(levels)
    for _ in range(5):
        changed = torch.zeros_like(empty)
        for i in range(xt.shape[0]):
            li = levels[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (wt[i] * li) * li
            new = nearest_exact((xt[i] * sl2) / slx).clamp_(max=nmax)
            slx_new = slx + wx[i] * new
            sl2_new = sl2 + (wt[i] * new) * new
            accept = (slx > 0) & (sl2 > 0) & (new != li)
            accept &= (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new
            torch.where(accept, _wrap(new), li, out=levels[i])
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
            changed |= accept
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, zero)
    scale = torch.where(empty, zero, scale)
    levels = torch.where(empty, zero, levels)
    return levels.t().to(torch.uint8).contiguous(), scale.view(-1, 1).to(torch.float16)


def qkx3(xs: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx3_quants(size, nmax, x, w, L, &the_min, Laux, -0.9f, 0.05f, 36, false) for every
    column of (size, S) xs with weights w (the legacy types' weighted path): (scale (S,), -the_min
    (S,), L (size, S) float32 levels)."""
    p = _Search(size=xs.shape[0], nmax=nmax, rmin=-0.9, rdelta=0.05, nstep=36, mad=False, scale_max=0)
    fit = _qkx2(xs, w, p, exact=False)
    exact = not bool(fit.regular)
    if exact:
        fit = _qkx2(xs, w, p, exact=True)
    return fit.scale, -fit.the_min, _levels(xs, fit.iscale, fit.base, p, exact, torch.empty_like(xs))


def _fit(x: torch.Tensor, p: _Search, exact: bool, weights: torch.Tensor | None = None) -> _Levels | None:
    """The stored values of (n, 256) x; None when this chunk must be redone with exact rounding.
    With `weights` (the importance matrix values of x) the search and scales are the weighted ones."""
    xs = scratch("affine.x", (p.size, x.numel() // p.size), x).copy_(x.reshape(-1, p.size).t())
    if weights is not None:
        w = _importance(x, xs, weights.to(torch.float32), p)
    elif p.mad:  # Q2_K: w = |x|
        w = torch.abs(xs, out=scratch("affine.w", xs.shape, x))
    else:  # w = sqrt(Σx²/32) + |x|
        w = torch.mul(xs, xs, out=scratch("affine.w", xs.shape, x))
        av = sqrt(sequential_sum(w) / f32(p.size, x))
        torch.abs(xs, out=w).add_(av)
    fit = _qkx2(xs, w, p, exact)
    per = 256 // p.size
    if weights is None:
        scale_levels, min_levels, d, dmin = _reference_scales(fit, p)
    else:
        scale_levels, min_levels, d, dmin = _weighted_scales(fit, sequential_sum(w).view(-1, per), p)
    dq = (d.to(torch.float32) * scale_levels.to(torch.float32)).view(-1)
    dm = (dmin.to(torch.float32) * min_levels.to(torch.float32)).view(-1)
    skip = dq == 0  # the reference keeps the search's L there
    if not exact:
        bound = ((fit.ends + dm) / dq).abs_().amax(0)
        if not bool(fit.regular & ((bound < NEAREST_LIMIT) | skip).all()):
            return None
    v = torch.add(xs, dm, out=scratch("affine.err", xs.shape, x)).div_(dq)  # the search is done with its buffers
    levels = (nearest_exact(v, out=v) if exact else v.round_()).clamp_(0, p.nmax)
    if bool(skip.any()):
        searched = _levels(xs, fit.iscale, fit.base, p, exact, scratch("affine.xl", xs.shape, x))
        torch.where(skip, searched, levels, out=levels)
    q = scratch("affine.q", (xs.shape[1], p.size), x, torch.uint8).copy_(levels.t())  # integers: exact
    return _Levels(q.view(-1, 256), d, dmin, scale_levels, min_levels)


def _fit_exactly(x: torch.Tensor, p: _Search, weights: torch.Tensor | None) -> _Levels:
    found = _fit(x, p, False, weights)
    if found is None:
        found = _fit(x, p, True, weights)
        assert found is not None  # the exact path always finishes
    return found


def _encode(
    x: torch.Tensor,
    out: torch.Tensor,
    p: _Search,
    pack: Callable[[torch.Tensor, _Levels], None],
    weights: torch.Tensor | None = None,
) -> None:
    """Fit and pack (n, 256) x into out; on CPU in pieces of CPU_BLOCKS super-blocks (the search
    makes ~20 passes over its temporaries, which then stay in the core's cache)."""
    step = CPU_BLOCKS if x.device.type == "cpu" else x.shape[0]
    for start in range(0, x.shape[0], step):
        w = None if weights is None else weights[start : start + step]
        pack(out[start : start + step], _fit_exactly(x[start : start + step], p, w))


def _put_scales_k4(out: torch.Tensor, ls: torch.Tensor, lm: torch.Tensor) -> None:
    """The 12 bytes at offset 4 holding eight 6-bit scales and mins (get_scale_min_k4's layout)."""
    out[:, 4:8] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 8:12] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 12:16] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)


def _put_nibbles64(out: torch.Tensor, offset: int, levels: torch.Tensor) -> None:
    """128 bytes: byte 32c + l = L[64c + l] | L[64c + 32 + l] << 4 (levels (n, 256) below 16)."""
    pairs = levels.view(-1, 4, 2, 32)
    out[:, offset : offset + 128] = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).view(-1, 128)


def _pack_q4_k(out: torch.Tensor, fit: _Levels) -> None:
    _put_f16(out, 0, fit.d)
    _put_f16(out, 2, fit.dmin)
    _put_scales_k4(out, fit.scales, fit.mins)
    _put_nibbles64(out, 16, fit.levels)


def _pack_q5_k(out: torch.Tensor, fit: _Levels) -> None:
    _put_f16(out, 0, fit.d)
    _put_f16(out, 2, fit.dmin)
    _put_scales_k4(out, fit.scales, fit.mins)
    high = (fit.levels >> 4).view(-1, 8, 32) << _bit_shifts(8, out.device).view(1, 8, 1)
    out[:, 16:48] = high.sum(1, dtype=torch.uint8)  # distinct bits: the sum is their OR
    _put_nibbles64(out, 48, fit.levels & 0x0F)


def _pack_q2_k(out: torch.Tensor, fit: _Levels) -> None:
    out[:, :16] = fit.scales | (fit.mins << 4)
    quads = fit.levels.view(-1, 2, 4, 32) << (2 * _bit_shifts(4, out.device)).view(1, 1, 4, 1)
    out[:, 16:80] = quads.sum(2, dtype=torch.uint8).view(-1, 64)
    _put_f16(out, 80, fit.d)
    _put_f16(out, 82, fit.dmin)


def encode_q4_k(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """(n, 256) float32 -> (n, 144) uint8 Q4_K blocks; `weights` (n, 256): the importance matrix
    values of each element (quantize_row_q4_K_impl), None for the reference path."""
    _encode(x, out, _Q4 if weights is None else _Q4_WEIGHTED, _pack_q4_k, weights)


def encode_q5_k(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """As `encode_q4_k`, (n, 176) Q5_K blocks (quantize_row_q5_K_impl with weights)."""
    _encode(x, out, _Q5 if weights is None else _Q5_WEIGHTED, _pack_q5_k, weights)


def encode_q2_k(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """As `encode_q4_k`, (n, 84) Q2_K blocks (quantize_row_q2_K_impl with weights)."""
    _encode(x, out, _Q2 if weights is None else _Q2_WEIGHTED, _pack_q2_k, weights)


def _bit_shifts(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8, device=device)


# --- decoders: (n, bytes) uint8 -> (n, 256) float32, as dequantize_row_q*_K and gguf.quants ---


def _f16(rows: torch.Tensor, offset: int) -> torch.Tensor:
    return rows[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def _scales_k4(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, mins) (n, 8) uint8 from the 12 bytes at offset 4 (get_scale_min_k4)."""
    s = rows[:, 4:16]
    low, mid, high = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 6) << 4)], dim=1)
    mins = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 6) << 4)], dim=1)
    return scales, mins


def _nibbles64(rows: torch.Tensor, offset: int) -> torch.Tensor:
    """(n, 8, 32) levels from 128 nibble bytes (the inverse of `_put_nibbles64`)."""
    q = rows[:, offset : offset + 128].reshape(-1, 4, 1, 32)
    return torch.cat([q & 0x0F, q >> 4], dim=2).view(-1, 8, 32)


def _affine(rows: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """d * sc * q - dmin * m per sub-block (levels (n, k, size), scales and mins (n, k))."""
    step = (_f16(rows, 0) * scales.to(torch.float32)).unsqueeze(2)
    low = (_f16(rows, 2) * mins.to(torch.float32)).unsqueeze(2)
    return (step * levels.to(torch.float32) - low).view(-1, 256)


def decode_q4_k(rows: torch.Tensor) -> torch.Tensor:
    return _affine(rows, _nibbles64(rows, 16), *_scales_k4(rows))


def decode_q5_k(rows: torch.Tensor) -> torch.Tensor:
    high = (rows[:, 16:48].unsqueeze(1) >> _bit_shifts(8, rows.device).view(1, 8, 1)) & 1
    return _affine(rows, _nibbles64(rows, 48) | (high << 4), *_scales_k4(rows))


def decode_q2_k(rows: torch.Tensor) -> torch.Tensor:
    d, dmin = rows[:, 80:84].contiguous().view(torch.float16).to(torch.float32).unbind(1)
    quads = (rows[:, 16:80].reshape(-1, 2, 1, 32) >> (2 * _bit_shifts(4, rows.device)).view(1, 1, 4, 1)) & 3
    scales = rows[:, :16]
    step = (d.unsqueeze(1) * (scales & 0x0F).to(torch.float32)).unsqueeze(2)
    low = (dmin.unsqueeze(1) * (scales >> 4).to(torch.float32)).unsqueeze(2)
    return (step * quads.reshape(-1, 16, 16).to(torch.float32) - low).view(-1, 256)
