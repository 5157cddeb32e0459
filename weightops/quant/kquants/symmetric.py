"""Q6_K and Q3_K: K-quants with one signed scale per sub-block of 16 (no minimum), byte for
byte libggml's `quantize_row_q6_K_ref` / `quantize_row_q3_K_ref` and, with an importance
matrix, `quantize_row_q6_K_impl` / `quantize_row_q3_K_impl` (shared/reference/kquants.md).

Why the code looks the way it does:
- Every sum the reference takes over a sub-block runs sequentially in float32. The values are
  laid out by element position, (16, sub-blocks), so each step of such a sum is one vectorised
  add across all sub-blocks; torch's own reductions would add in another order.
- C expressions are evaluated left to right in float32 (`w*x*l` is `(w*x)*l`), one rounding per
  torch op (no fused ops), divisions by device tensors (see `quant.ggml`), `torch.round` for
  `nearest_int` (half to even), strict comparisons so the first candidate wins.
- The scale search tries 19 (Q6_K) candidate scales per sub-block. Their rounded values and
  sums are computed for all candidates at once over slices of a chunk (cache-sized, few ops),
  then the reference's sequential choice runs on the sums, carrying only the best value and
  recording which candidates beat it; the winner (the last of those) and its scale and levels
  are taken once at the end.
- Each position's sums over the candidates are one `accumulate` (index_add_ on CPU, in order),
  and every chunk-sized temporary is a per-thread `scratch` buffer: fresh multi-MB tensors
  page-fault on first write, which had cost a third of the CPU time.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from ..ggml import _const, _put_f16, _signed_max
from .common import accumulate, nearest_exact, positions, scratch, sqrt

_GROUP_MAX_EPS = 1e-15
_SLICE_VALUES = 1 << 19  # float32 values per candidate tensor in the scale search (cache-sized)


def _candidates(nmax: int) -> torch.Tensor:
    """make_qx_quants' numerators in its order: -nmax, then -(nmax + 0.1f*is) for is = -9..9, is != 0,
    each rounded as the C float expression is."""
    tenth = np.float32(0.1)
    steps = [np.float32(nmax)] + [np.float32(nmax) + tenth * np.float32(i) for i in range(-9, 10) if i]
    return torch.tensor(np.negative(np.array(steps, dtype=np.float32)))


@cache
def _order(k: int, device: torch.device) -> torch.Tensor:
    """(k, 1) uint8 0..k-1: the candidates' indices."""
    return torch.arange(k, dtype=torch.uint8, device=device).unsqueeze(1)


def _sequential_sums(terms: torch.Tensor, out: torch.Tensor) -> None:
    """out = terms[0] + terms[1] + ... in that order (the reference's loop over positions)."""
    torch.add(terms[0], terms[1], out=out)
    for i in range(2, terms.shape[0]):
        out += terms[i]


def make_qx(
    x: torch.Tensor, xt: torch.Tensor, w: torch.Tensor, nmax: int, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(size, nmax, x, L, rmse_type=1, qw) for every sub-block: (scale (S,), L
    (size, S) float32 levels 0..2*nmax-1, in `out` when given). `x` is the (S, size) sub-blocks,
    `xt` the same by position, `w` the weights by position (x*x without an importance matrix)."""
    m = _signed_max(x, scratch("signs", x.shape, x, torch.int32)).view(-1)  # the first value of largest magnitude
    empty = m.abs() < _GROUP_MAX_EPS
    numerators = _candidates(nmax).to(x.device)[:, None]
    k, s, size = numerators.shape[0], m.shape[0], xt.shape[0]
    iscales = torch.div(numerators, m, out=scratch("qx.iscales", (k, s), x))  # true division
    wx = torch.mul(w, xt, out=scratch("qx.wx", (size, s), x))  # w*x*l is (w*x)*l, w*l*l is (w*l)*l
    sums = scratch("qx.sums", (2, k, s), x)
    step = max(1, _SLICE_VALUES // (size * k))
    targets = (0,) * size
    for a in range(0, s, step):
        b = min(s, a + step)
        lv = scratch("qx.levels", (size, 1, k, b - a), x)
        terms = scratch("qx.terms", (size, 2, k, b - a), x)
        acc = scratch("qx.acc", (1, 2, k, b - a), x).zero_()
        torch.mul(xt[:, None, None, a:b], iscales[:, a:b], out=lv)
        lv.round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx[:, None, None, a:b], lv, out=terms[:, :1])
        torch.mul(w[:, None, None, a:b], lv, out=terms[:, 1:])
        terms[:, 1:] *= lv
        accumulate(acc, terms, targets)
        sums[:, :, a:b] = acc[0]
    slx, sl2 = sums[0], sums[1]
    scales = torch.div(slx, sl2, out=scratch("qx.scales", (k, s), x))
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    torch.where(sl2[0] != 0, scales[0], zero, out=scales[0])
    bests = torch.mul(scales, slx, out=scratch("qx.bests", (k, s), x))  # the best each candidate would set
    # slx^2, or -inf where sl2 > 0 fails (then slx^2 > best*sl2 fails too, as the C's && does)
    squares = torch.mul(slx, slx, out=scratch("qx.squares", (k, s), x))
    squares.masked_fill_(sl2 <= 0, -float("inf"))
    best = bests[0].clone()
    bound = torch.empty_like(best)
    better = scratch("qx.better", (k, s), x, torch.bool)  # better[c]: c beat the best before it
    better[0] = True
    for c in range(1, k):
        torch.mul(best, sl2[c], out=bound)
        torch.gt(squares[c], bound, out=better[c])
        torch.where(better[c], bests[c], best, out=best)
    # the winner is the last candidate that beat the best before it (one op, not one per candidate)
    chosen = torch.mul(better.view(torch.uint8), _order(k, x.device)).amax(0, keepdim=True).long()
    scale = scales.gather(0, chosen)[0]
    iscale = iscales.gather(0, chosen)[0]
    levels = torch.mul(xt, iscale, out=out).round_().clamp_(-nmax, nmax - 1).add_(nmax)
    if bool(empty.any()):  # all |x| < 1e-15: levels 0 and scale 0
        levels.masked_fill_(empty, 0)
        scale = torch.where(empty, zero, scale)
    return scale, levels


def _requantize(xt: torch.Tensor, d: torch.Tensor, levels: torch.Tensor, nmax: int) -> torch.Tensor:
    """The reference's second pass: L = clamp(nearest(x / d_j)) + nmax where the stored scale d_j
    (S,) is not zero, the search's levels where it is. A non-finite d_j (fp16 d overflowed)
    gives level nmax, as libggml's nearest_int of x/inf (0) and of x/NaN (its bit trick reads the
    x86 default NaN as 0) do. Overwrites and returns `levels`."""
    q = torch.div(xt, d, out=scratch("requantize", xt.shape, xt)).round_().clamp_(-nmax, nmax - 1).add_(nmax)
    if not bool(torch.isfinite(d).all()):
        q.masked_fill_(~torch.isfinite(d), nmax)
    return torch.where(d != 0, q, levels, out=levels)


# --- Q6_K: ql[128], qh[64], scales[16] int8, d --------------------------------------------------


def encode_q6_k(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """(n, 256) float32 -> (n, 210) uint8 Q6_K blocks; `weights` (n, 256): the importance
    matrix values of each element (quantize_row_q6_K_impl), None for the reference path."""
    n = x.shape[0]
    sub = x.reshape(-1, 16)
    xt = scratch("q6.x", (16, sub.shape[0]), x).copy_(sub.t())
    w = scratch("q6.w", xt.shape, x)
    if weights is None:
        torch.mul(xt, xt, out=w)
    else:
        w.copy_(weights.reshape(-1, 16).t())
    scales, levels = make_qx(sub, xt, w, 32, out=scratch("q6.levels", xt.shape, x))
    scales = scales.view(n, 16)
    max_scale = _signed_max(scales)  # (n, 1)
    empty = (max_scale.abs() < _GROUP_MAX_EPS).view(-1)
    iscale = _const(-128.0, x) / max_scale
    d = _const(1.0, x) / iscale
    sc = (iscale * scales).round_().clamp_(max=127)  # the largest maps to -128
    d16 = d.to(torch.float16).to(torch.float32)
    dj = (d16 * sc).view(-1)  # (S,)
    q = scratch("q6.q", (xt.shape[1], 16), x, torch.uint8)
    q.copy_(_requantize(xt, dj, levels, 32).t())
    q = q.view(n, 2, 4, 32)
    low, high = q & 15, q >> 4
    out[:, :128].view(n, 2, 2, 32).copy_(low[:, :, :2] | (low[:, :, 2:] << 4))
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out[:, 128:192].view(n, 2, 32).copy_(qh)
    out[:, 192:208] = sc.to(torch.int8).view(torch.uint8)
    _put_f16(out, 208, d)
    if bool(empty.any()):
        out[empty] = 0


def decode_q6_k(rows: torch.Tensor) -> torch.Tensor:
    n = rows.shape[0]
    ql = rows[:, :128].reshape(n, 2, 2, 32)
    qh = rows[:, 128:192].reshape(n, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=rows.device).view(1, 1, 4, 1)
    low = torch.cat([ql & 15, ql >> 4], dim=2)  # (n, 2, 4, 32): q1, q2, q3, q4
    q = low | (((qh >> shifts) & 3) << 4)
    sc = rows[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = rows[:, 208:210].contiguous().view(torch.float16).to(torch.float32)
    dl = (d * sc).view(n, 16, 1)
    return (dl * (q.reshape(n, 16, 16).to(torch.float32) - 32)).reshape(n, 256)


# --- Q3_K: hmask[32], qs[64], scales[12] (6-bit, offset 32), d ---------------------------------


def _q3_step(
    x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, li: torch.Tensor, sumlx: torch.Tensor, suml2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_q3_quants' test of one descent move, elementwise: (accept, new level, new sumlx, new
    suml2) for moving each element x (weight w = x*x, wx = w*x) from level li to its best level
    given its sub-block's sums (broadcast: `_make_q3` passes all 16 positions of the sub-blocks
    still descending). Plain ops, not scratch buffers: after the first test those sub-blocks
    are a fifth of the chunk, then a few percent, so each op is short and more of them (the
    `out=` form needs about twice as many) costs two worker threads more in dispatch, under
    the GIL, than it saves in page faults."""
    slx = sumlx - wx * li
    sl2 = suml2 - (w * li) * li
    new = nearest_exact(x * sl2 / slx).clamp_(-4, 3)
    slx_new = slx + wx * new
    sl2_new = sl2 + (w * new) * new
    accept = (slx > 0) & (new != li) & (sl2_new > 0)
    accept &= (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new
    return accept, new, slx_new, sl2_new


def _make_q3(x: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(16, 4, x, L, do_rmse=true) for every sub-block: (scale (S,), L (16, S)
    float32 levels 0..7).

    Each of the (at most) five passes of coordinate descent visits the positions in order and
    goes on to the next pass only if it changed something. Within a pass nothing moves until
    the first element that is accepted against the current sums, so one vectorised test over
    the positions not yet visited finds that element for every sub-block at once; it is
    applied and the pass resumes after it. A step therefore costs one acceptance (or one pass
    end) per sub-block, not one position: a few steps of ~25 ops on the sub-blocks still
    descending (a fifth of them, then a few percent), instead of 16 steps a pass."""
    m = _signed_max(x, scratch("signs", x.shape, x, torch.int32)).view(-1)
    empty = m.abs() < _GROUP_MAX_EPS
    w = torch.mul(xt, xt, out=scratch("q3.w", xt.shape, x))
    wx = torch.mul(w, xt, out=scratch("q3.wx", xt.shape, x))
    levels = torch.mul(xt, _const(-4.0, x) / m, out=scratch("q3.levels", xt.shape, x)).round_().clamp_(-4, 3)
    terms = scratch("q3.terms", (16, 2, xt.shape[1]), x)
    torch.mul(wx, levels, out=terms[:, 0])
    torch.mul(w, levels, out=terms[:, 1])
    terms[:, 1] *= levels
    sums = torch.empty((2, xt.shape[1]), dtype=torch.float32, device=x.device)
    _sequential_sums(terms, sums)
    sumlx, suml2 = sums[0], sums[1]
    position = torch.arange(16, device=x.device).view(16, 1)
    ranks = torch.arange(16, 0, -1, dtype=torch.uint8, device=x.device).view(16, 1)
    rows = torch.arange(xt.shape[1], device=x.device)  # the sub-blocks still descending
    xa, wa, wxa, la, sxa, s2a = xt, w, wx, levels, sumlx, suml2
    start = torch.zeros_like(rows)  # the first position of the pass not yet visited
    changed = torch.zeros_like(rows, dtype=torch.bool)  # the pass has moved an element
    passes = torch.zeros_like(rows)  # passes finished
    while rows.numel():
        accept, new, slx, sl2 = _q3_step(xa, wa, wxa, la, sxa, s2a)
        accept &= position >= start
        # 16 - the first accepted position, 0 where none (a uint8 amax: argmax over dim 0 is 100x slower)
        rank = torch.mul(accept.view(torch.uint8), ranks).amax(0, keepdim=True)
        found = rank[0] > 0
        first = 16 - rank.long()
        # the pass goes on after that element, or ends; an ended pass that moved starts another
        at = first.clamp(max=15)
        la.scatter_(0, at, torch.where(found, new.gather(0, at), la.gather(0, at)))
        torch.where(found, slx.gather(0, at)[0], sxa, out=sxa)
        torch.where(found, sl2.gather(0, at)[0], s2a, out=s2a)
        ended = ~found
        passes += ended
        again = ended & changed & (passes < 5)
        start = torch.where(found, first[0] + 1, 0)
        changed = (changed | found) & ~again
        done = ended & ~again
        if bool(done.any()):
            finished = done.nonzero().view(-1)
            levels[:, rows[finished]] = la[:, finished]
            sumlx[rows[finished]] = sxa[finished]
            suml2[rows[finished]] = s2a[finished]
            keep = (~done).nonzero().view(-1)
            rows, start, changed, passes = rows[keep], start[keep], changed[keep], passes[keep]
            xa, wa, wxa, la = xa[:, keep], wa[:, keep], wxa[:, keep], la[:, keep]
            sxa, s2a = sxa[keep], s2a[keep]
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    scale = torch.where(suml2 > 0, sumlx / suml2, zero)
    levels.add_(4)
    if bool(empty.any()):  # all |x| < 1e-15: levels 0 and scale 0
        levels = torch.where(empty, zero, levels)
        scale = torch.where(empty, zero, scale)
    return scale, levels


def _q3_weighted(
    x: torch.Tensor, sub: torch.Tensor, xt: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_row_q3_K_impl's search: (sub-scales (n, 16), their 6-bit levels (n, 16) float32
    0..63, levels (16, S)). Element weights qw*sqrt(sigma2 + x^2) with sigma2 = 2*sum(x^2)/256
    (sequential), make_qx_quants for the values and again for the 16 scales weighted by their
    sub-blocks' weight sums."""
    n = x.shape[0]
    xb = x.t().contiguous()  # (256, n): the super-block sum runs over all 256 positions
    sq = xb * xb
    sumx2 = torch.empty(n, dtype=torch.float32, device=x.device)
    _sequential_sums(sq, sumx2)
    sigma2 = (_const(2.0, x) * sumx2) / _const(256.0, x)  # (n,)
    sigma = sigma2.repeat_interleave(16)  # (S,)
    w = positions(weights.to(torch.float32), 16) * sqrt(sigma + xt * xt)
    sw = torch.empty(xt.shape[1], dtype=torch.float32, device=x.device)
    _sequential_sums(w, sw)
    scales, levels = make_qx(sub, xt, w, 4, out=scratch("q3.levels", xt.shape, x))
    scales = scales.view(n, 16)
    st = scales.t().contiguous()
    d_block, ls = make_qx(scales, st, sw.view(n, 16).t().contiguous(), 32)
    return d_block, ls.t().contiguous(), levels


def encode_q3_k(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """(n, 256) float32 -> (n, 110) uint8 Q3_K blocks; `weights` (n, 256): the importance
    matrix values of each element (quantize_row_q3_K_impl), None for the reference path."""
    n = x.shape[0]
    sub = x.reshape(-1, 16)
    xt = scratch("q3.x", (16, sub.shape[0]), x).copy_(sub.t())
    if weights is None:
        scales, levels = _make_q3(sub, xt)
        scales = scales.view(n, 16)
        max_scale = _signed_max(scales)
        iscale = _const(-32.0, x) / max_scale
        ls = (iscale * scales).round_().clamp_(-32, 31).add_(32)
        d = _const(1.0, x) / iscale
        none = (max_scale == 0).view(-1)
        ls[none] = 0  # d is 0 and every scale byte 0: the stored scales are all -32
        d[none] = 0
    else:
        d_block, ls, levels = _q3_weighted(x, sub, xt, weights)
        d = d_block.view(n, 1)
    d16 = d.to(torch.float16).to(torch.float32)
    dj = (d16 * (ls - 32)).reshape(-1)
    q = scratch("q3.q", (xt.shape[1], 16), x, torch.uint8)
    q = q.copy_(_requantize(xt, dj, levels, 4).t()).view(n, 256)  # levels 0..7
    high = q >> 2  # bit 2: hmask bit (j // 32) of byte j % 32
    hbits = high.view(n, 8, 32) << torch.arange(8, dtype=torch.uint8, device=x.device).view(1, 8, 1)
    hmask = hbits[:, 0]
    for j in range(1, 8):
        hmask = hmask | hbits[:, j]
    out[:, :32] = hmask
    low = (q & 3).view(n, 2, 4, 32)
    qs = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)
    out[:, 32:96].view(n, 2, 32).copy_(qs)
    li = ls.to(torch.uint8)  # (n, 16) 0..63
    lo = li & 15
    out[:, 96:104] = lo[:, :8] | (lo[:, 8:] << 4)
    hi = (li >> 4).view(n, 4, 4)  # [j // 4, j % 4]
    out[:, 104:108] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    _put_f16(out, 108, d)


def decode_q3_k(rows: torch.Tensor) -> torch.Tensor:
    n = rows.shape[0]
    hmask = rows[:, :32].reshape(n, 1, 32)
    qs = rows[:, 32:96].reshape(n, 2, 1, 32)
    sc = rows[:, 96:108]
    shifts2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=rows.device)
    low = torch.cat([sc[:, :8] & 15, sc[:, :8] >> 4], dim=1)  # (n, 16)
    high = ((sc[:, 8:12, None] >> shifts2) & 3).transpose(1, 2).reshape(n, 16)
    scales = (low | (high << 4)).to(torch.float32) - 32
    d = rows[:, 108:110].contiguous().view(torch.float16).to(torch.float32)
    dl = (d * scales).view(n, 16, 1)
    ql = ((qs >> shifts2.view(1, 1, 4, 1)) & 3).reshape(n, 256)
    hbit = (hmask >> torch.arange(8, dtype=torch.uint8, device=rows.device).view(1, 8, 1)) & 1
    q = ql.to(torch.float32) - 4 * (1 - hbit.reshape(n, 256).to(torch.float32))
    return (dl * q.view(n, 16, 16)).reshape(n, 256)
