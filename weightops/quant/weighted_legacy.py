"""Q4_0, Q4_1, Q5_0 and Q5_1 with an importance matrix: libggml's `quantize_row_q{4,5}_{0,1}_impl`,
which `ggml_quantize_chunk` runs whenever it is given one (Q8_0 ignores it). Byte for byte
those functions at the pinned commit (facts: shared/reference/imatrix.md, kquants.md).

Unlike the reference path (`quant.ggml`: a scale from the block's extremes) these search for
the scale with the K-quants' weighted least squares: `make_qx_quants` for the symmetric types,
`make_qkx3_quants` for the affine ones, on element weights qw * sqrt(sigma2 + x²) where sigma2
is the mean square of the block's whole *row*: the encoders take it per block, and
`row_mean_square` computes it as the reference does (a sequential float32 sum over the row).
"""

from __future__ import annotations

import torch

from .ggml import _put_f16, _put_high_bits, _put_nibbles
from .kquants.affine import qkx3
from .kquants.common import blocks, f32, positions, sequential_sum, sqrt
from .kquants.symmetric import make_qx


def row_mean_square(rows: torch.Tensor) -> torch.Tensor:
    """Σx² / n_per_row of each row of (r, n_per_row) float32, summed in element order: (r,)."""
    xt = rows.t().contiguous()
    return sequential_sum(xt * xt) / f32(rows.shape[1], rows)


def _importance(xt: torch.Tensor, weights: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """qw * sqrtf(sigma2 + x*x) by position (32, n), for blocks xt (32, n)."""
    return positions(weights.to(torch.float32), 32) * sqrt(sigma2.reshape(1, -1) + xt * xt)


def _symmetric(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, sigma2: torch.Tensor, nmax: int):
    """make_qx_quants(32, nmax, x, L, 1, w): stores d at byte 0, returns the levels (n, 32) uint8."""
    xt = positions(x, 32)
    scale, levels = make_qx(x, xt, _importance(xt, weights, sigma2), nmax)
    _put_f16(out, 0, scale)
    return blocks(levels, 1).to(torch.uint8).contiguous()


def _affine(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, sigma2: torch.Tensor, nmax: int):
    """make_qkx3_quants(32, nmax, ...): stores d and m = the search's min, returns the levels."""
    xt = positions(x, 32)
    scale, low, levels = qkx3(xt, _importance(xt, weights, sigma2), nmax)
    _put_f16(out, 0, scale)
    _put_f16(out, 2, low)
    return blocks(levels, 1).to(torch.uint8).contiguous()


# Encoders: (n, 32) float32 blocks x, their importance matrix values `weights` (n, 32) and the
# mean square of each block's row `sigma2` (n,) -> (n, bytes) uint8 rows of out.


def encode_q4_0(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, sigma2: torch.Tensor) -> None:
    _put_nibbles(out, 2, _symmetric(x, out, weights, sigma2, 8))


def encode_q5_0(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, sigma2: torch.Tensor) -> None:
    q = _symmetric(x, out, weights, sigma2, 16)
    _put_high_bits(out, 2, q)
    _put_nibbles(out, 6, q.bitwise_and_(0x0F))


def encode_q4_1(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, sigma2: torch.Tensor) -> None:
    _put_nibbles(out, 4, _affine(x, out, weights, sigma2, 15))


def encode_q5_1(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, sigma2: torch.Tensor) -> None:
    q = _affine(x, out, weights, sigma2, 31)
    _put_high_bits(out, 4, q)
    _put_nibbles(out, 8, q.bitwise_and_(0x0F))
