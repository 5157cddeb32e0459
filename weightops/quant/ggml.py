"""GGML block quantization (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) in vectorised torch, CPU or CUDA.

The bytes are exactly llama.cpp's reference quantizers' (the tests compare with `gguf.quants`
and with libggml itself; spec in shared/reference/gguf.md): float32 arithmetic, `id = 1/d`
(0 when d == 0), values multiplied by `id` (never divided by d, no fused multiply-add), scales
rounded to fp16 only when stored, llama.cpp's scan order for ties and signed zeros.

Two details make that hold on every device:
- Divisions by a constant divide by a device tensor, because PyTorch turns division by a
  Python scalar into multiplication by its reciprocal on some devices (not bit-identical).
- The reference converts floats to its small integers with a C cast, which on x86 goes
  through a 32-bit integer: the low byte of trunc(v) is kept, and values that are not finite
  or do not fit 32 bits give 0. Such values only occur in degenerate blocks (a scale in the
  float32 subnormal range, or max - min overflowing float32); `_to_int8` makes them come out
  the same on CPU and CUDA, whose own float-to-int conversions differ there.

Tensors are processed in chunks of whole blocks so temporaries stay bounded whatever the
shape. On CPU the chunks go to torch.get_num_threads() worker threads that each run torch
single-threaded (see `devices.cpu_pool`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..devices import cpu_pool, run_chunks
from ..errors import WeightopsError
from . import ggml_types
from .kquants.common import scratch, scratch_frame

CHUNK_VALUES = 1 << 18  # float32 values per chunk (1 MB; a K encoder's scratch is ~17x that per thread), whole blocks
_HALF_DOWN = 0.5 - 2.0**-25  # largest float32 below 0.5: trunc(v + copysign(it, v)) rounds half away from zero
_INT32_LIMIT = 2.0**31


def _block_type(qtype: str) -> ggml_types.GGMLType:
    """The record of block type `qtype` (its sizes and kernels)."""
    if qtype not in ggml_types.BLOCK_NAMES:
        raise WeightopsError(f"unknown GGML block type {qtype!r}; choose one of {', '.join(ggml_types.BLOCK_NAMES)}")
    return ggml_types.parse(qtype)


def _sizes(qtype: str) -> tuple[int, int]:
    """(values per block, bytes per block)."""
    t = _block_type(qtype)
    return t.block_size, t.type_size


def row_bytes(ncols: int, qtype: str) -> int:
    """Bytes of one row of `ncols` values stored as `qtype`."""
    block, size = _sizes(qtype)
    if ncols % block:
        raise WeightopsError(f"a row of {ncols} values cannot be stored as {qtype} (blocks of {block})")
    return ncols // block * size


def can_quantize(shape: Sequence[int], qtype: str) -> bool:
    """True when `shape`'s rows split into whole `qtype` blocks."""
    return qtype in ggml_types.BLOCK_NAMES and len(shape) > 0 and shape[-1] > 0 and shape[-1] % _sizes(qtype)[0] == 0


def quantize(t: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """The bytes llama.cpp stores for float tensor `t` as `qtype`: uint8 of shape
    (*t.shape[:-1], row_bytes), on t's device, computed from t's values converted to float32.

    `imatrix`: an importance matrix, one value per column (t.shape[-1]), the same for every row
    as llama-quantize passes it: the weighted path (`ggml_quantize_chunk` with `imatrix`) for
    types that have one, ignored for the others (Q8_0), as libggml does."""
    record = _block_type(qtype)
    block, size = record.block_size, record.type_size
    if not can_quantize(t.shape, qtype):
        raise WeightopsError(
            f"tensor of shape {tuple(t.shape)} cannot be quantized to {qtype}: "
            f"the last dimension must be a positive multiple of {block}"
        )
    if not t.is_floating_point():
        raise WeightopsError(f"cannot quantize a {t.dtype} tensor to {qtype}: expected a float tensor")
    if imatrix is not None:
        if tuple(imatrix.shape) != (t.shape[-1],):
            raise WeightopsError(
                f"importance matrix of shape {tuple(imatrix.shape)} does not fit a tensor of shape "
                f"{tuple(t.shape)}: it needs one value per column ({t.shape[-1]})"
            )
        if record.weighted:
            return _quantize_weighted(t, record, imatrix.to(device=t.device, dtype=torch.float32))
    blocks = t.reshape(-1, block)
    out = torch.empty((blocks.shape[0], size), dtype=torch.uint8, device=t.device)
    workers, pool = cpu_pool() if t.device.type == "cpu" else (1, None)
    # chunks of at most CHUNK_VALUES, and at least one per worker
    step = max(1, min(CHUNK_VALUES // block, -(-blocks.shape[0] // workers)))
    encode = record.encoder

    def run(start: int) -> None:
        with scratch_frame():
            encode(blocks[start : start + step].to(torch.float32), out[start : start + step])

    run_chunks(run, range(0, blocks.shape[0], step), pool)
    return out.reshape(*t.shape[:-1], t.shape[-1] // block * size)


def _quantize_weighted(t: torch.Tensor, record: ggml_types.GGMLType, imatrix: torch.Tensor) -> torch.Tensor:
    """`quantize` with an importance matrix, in chunks of whole rows: each chunk's per-element
    weights are the imatrix repeated over its rows (chunk-sized, never the whole tensor's), and
    the legacy types' weights also need each row's mean square."""
    block, size = record.block_size, record.type_size
    cols = t.shape[-1]
    per_row = cols // block
    rows = t.reshape(-1, cols)
    out = torch.empty((rows.shape[0] * per_row, size), dtype=torch.uint8, device=t.device)
    workers, pool = cpu_pool() if t.device.type == "cpu" else (1, None)
    step = max(1, min(CHUNK_VALUES // cols, -(-rows.shape[0] // workers)))
    encode = record.weighted_encoder
    by_row = record.imatrix == ggml_types.ROW_WEIGHTS

    def run(start: int) -> None:
        x = rows[start : start + step].to(torch.float32)
        n = x.shape[0]
        dst = out[start * per_row : (start + n) * per_row]
        with scratch_frame():
            weights = scratch("imatrix", (n, cols), x).copy_(imatrix).view(-1, block)  # repeated over the rows
            if by_row:
                from .weighted_legacy import row_mean_square

                sigma2 = row_mean_square(x).repeat_interleave(per_row)
                encode(x.reshape(-1, block), dst, weights, sigma2)
            else:
                encode(x.reshape(-1, block), dst, weights)

    run_chunks(run, range(0, rows.shape[0], step), pool)
    return out.reshape(*t.shape[:-1], per_row * size)


def dequantize(blocks: torch.Tensor, qtype: str, shape: Sequence[int]) -> torch.Tensor:
    """float32 values of `shape` from their `qtype` bytes (as `gguf.quants.dequantize` computes them)."""
    block, size = _sizes(qtype)
    shape = tuple(shape)
    expected = math.prod(shape) // block * size if can_quantize(shape, qtype) else -1
    if blocks.dtype != torch.uint8 or blocks.numel() != expected:
        raise WeightopsError(f"{blocks.numel()} {blocks.dtype} bytes are not a {qtype} tensor of shape {shape}")
    rows = blocks.reshape(-1, size)
    out = torch.empty((rows.shape[0], block), dtype=torch.float32, device=blocks.device)
    step = max(1, CHUNK_VALUES // block)
    decode = _block_type(qtype).decoder
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = decode(rows[start : start + step])
    return out.reshape(shape)


# --- helpers shared by the encoders ----------------------------------------------------------


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 0-dim tensor on `like`'s device (so division stays true division)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _inverse(d: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(id, regular): id = 1/d in float32, 0 where d == 0 (the reference's `id`); regular when
    every d is zero or a normal finite float32, which keeps |x * id| within the reference's range."""
    size = d.abs()
    smallest, largest = torch.aminmax(size)
    if bool((smallest >= _FLOAT32_MIN_NORMAL) & (largest <= _FLOAT32_MAX)):  # the usual case: no zero d
        return torch.reciprocal(d), True
    zero = d == 0
    regular = bool((zero | ((size >= _FLOAT32_MIN_NORMAL) & (size <= _FLOAT32_MAX))).all())
    return torch.where(zero, torch.zeros((), dtype=d.dtype, device=d.device), torch.reciprocal(d)), regular


def _to_int8(v: torch.Tensor, regular: bool) -> torch.Tensor:
    """trunc(v) as int8, as the reference's C cast gives it on x86.

    In regular blocks every value fits (Q4/Q5 values 0..32 too) and a plain conversion is exact
    on every device. Otherwise (degenerate blocks) the x86 rule is applied explicitly: the low
    byte of a 32-bit trunc(v), 0 when v is not finite or does not fit 32 bits."""
    if regular:
        return v.to(torch.int8)
    v = torch.where(v.abs() < _INT32_LIMIT, v, torch.zeros((), dtype=v.dtype, device=v.device))
    return v.to(torch.int32).to(torch.uint8).view(torch.int8)


def _put_f16(out: torch.Tensor, offset: int, value: torch.Tensor) -> None:
    """Store (n, 1) float32 `value` as fp16 at byte `offset` of each row of `out` (every block
    size is even, so each row is a run of int16 and one strided column copy does it)."""
    out.view(torch.int16)[:, offset // 2] = value.to(torch.float16).view(torch.int16).view(-1)


def _put_nibbles(out: torch.Tensor, offset: int, q: torch.Tensor) -> None:
    """Byte j of the 16 at `offset` holds q[j] (low 4 bits) and q[j + 16] (high 4 bits of the
    byte); q is contiguous (n, 32) uint8 below 16 (shifting all of q at once is the fast way)."""
    torch.bitwise_or(q[:, :16], (q << 4)[:, 16:], out=out[:, offset : offset + 16])


def _put_high_bits(out: torch.Tensor, offset: int, q: torch.Tensor) -> None:
    """4 bytes at `offset`: bit j (little-endian) = bit 4 of q[j]. Each int64 word holds 8 of
    the q bytes; multiplying its bits (one per byte) by _GATHER_BITS moves them into the top byte."""
    bits = (q.view(torch.int64) >> 4) & _BYTE_LOW_BITS
    out[:, offset : offset + 4] = ((bits * _GATHER_BITS) >> 56).to(torch.uint8)


_BYTE_LOW_BITS = 0x0101010101010101
_GATHER_BITS = 0x0102040810204080  # bit 8i * 2**(56 - 7i) lands on bit 56 + i; no other product reaches bits 56-63
_FLOAT32_MIN_NORMAL = 2.0**-126
_SIGN_BIT = -(2**31)  # float32 sign bit as an int32
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each block as (n, 1); two plain reductions beat torch.aminmax on CPU."""
    return x.amin(1, keepdim=True), x.amax(1, keepdim=True)


def _signed_max(x: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """Per block, the value of largest magnitude with its sign: the first one when +a and -a
    both occur, +0.0 when every value is zero (llama.cpp starts from max = 0.0f and replaces
    it only on a strictly larger magnitude).

    Integer maxima of the bit patterns (twice as fast as float reductions on CPU): the largest
    int32 is the largest value with a clear sign bit, and with the sign bit flipped, the
    negative value of largest magnitude. A block without one of the two gets the other twice,
    which still picks the right one below. hi + lo is exactly 0 only when hi == -lo (a tie).
    `work`: an int32 tensor of x's shape for the flipped bits (a reused buffer saves page faults)."""
    bits = x.view(torch.int32)
    hi = bits.amax(1, keepdim=True).view(torch.float32)
    flipped = torch.bitwise_xor(bits, _SIGN_BIT, out=work)
    lo = flipped.amax(1, keepdim=True).bitwise_xor_(_SIGN_BIT).view(torch.float32)
    balance = hi + lo
    m = torch.where(balance > 0, hi, lo)
    if not bool(balance.all()):
        rows = (balance == 0).view(-1).nonzero().view(-1)
        sub = x[rows]
        first = sub.gather(1, sub.abs().argmax(1, keepdim=True))
        m[rows] = torch.where(first == 0, torch.zeros((), dtype=m.dtype, device=m.device), first)
    return m


def _first_zeros(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Where a block's min or max is zero, give it the sign of the block's first zero, as
    llama.cpp's scan (`if (v < min) min = v`) keeps it; torch's and numpy's reductions pick
    either of +0.0 and -0.0. Changes lo and hi in place."""
    zero = ((lo == 0) | (hi == 0)).view(-1)
    if bool(zero.any()):
        rows = zero.nonzero().view(-1)
        sub = x[rows]
        first = sub.gather(1, (sub == 0).to(torch.uint8).argmax(1, keepdim=True))
        lo[rows] = torch.where(lo[rows] == 0, first, lo[rows])
        hi[rows] = torch.where(hi[rows] == 0, first, hi[rows])


# --- encoders: (n, 32) float32 blocks -> (n, bytes) uint8 rows of `out` (named in ggml_types) ---


def encode_q8_0(x: torch.Tensor, out: torch.Tensor) -> None:
    # max|x| as the largest sign-cleared bit pattern: an integer max is twice as fast as a float one on CPU
    amax = (x.view(torch.int32) & 0x7FFFFFFF).amax(1, keepdim=True).view(torch.float32)
    d = amax / _const(127.0, x)
    inverse, regular = _inverse(d)
    v = x * inverse
    v += torch.sign(v).mul_(_HALF_DOWN)  # = copysign(_HALF_DOWN, v) but where v is ±0 (q = 0 either way); faster
    _put_f16(out, 0, d)
    out[:, 2:] = _to_int8(v, regular).view(torch.uint8)


def _symmetric(x: torch.Tensor, out: torch.Tensor, levels: int) -> torch.Tensor:
    """Q4_0/Q5_0: d = m / -(levels/2), q = min(levels - 1, trunc(x * id + levels/2 + 0.5))."""
    half = levels // 2
    d = _signed_max(x) / _const(-half, x)
    inverse, regular = _inverse(d)
    v = x * inverse
    v += half + 0.5
    _put_f16(out, 0, d)
    return _to_int8(v, regular).view(torch.uint8).clamp_(max=levels - 1)


def _affine(x: torch.Tensor, out: torch.Tensor, levels: int) -> torch.Tensor:
    """Q4_1/Q5_1: d = (max - min) / (levels - 1), q = min(levels - 1, trunc((x - min) * id + 0.5))."""
    lo, hi = _range(x)
    _first_zeros(x, lo, hi)
    d = (hi - lo) / _const(levels - 1, x)
    inverse, regular = _inverse(d)
    v = x - lo
    v *= inverse
    v += 0.5
    _put_f16(out, 0, d)
    _put_f16(out, 2, lo)
    return _to_int8(v, regular).view(torch.uint8).clamp_(max=levels - 1)


def encode_q4_0(x: torch.Tensor, out: torch.Tensor) -> None:
    _put_nibbles(out, 2, _symmetric(x, out, 16))


def encode_q5_0(x: torch.Tensor, out: torch.Tensor) -> None:
    q = _symmetric(x, out, 32)
    _put_high_bits(out, 2, q)
    _put_nibbles(out, 6, q.bitwise_and_(0x0F))


def encode_q4_1(x: torch.Tensor, out: torch.Tensor) -> None:
    _put_nibbles(out, 4, _affine(x, out, 16))


def encode_q5_1(x: torch.Tensor, out: torch.Tensor) -> None:
    q = _affine(x, out, 32)
    _put_high_bits(out, 4, q)
    _put_nibbles(out, 8, q.bitwise_and_(0x0F))


# --- decoders: (n, bytes) uint8 -> (n, 32) float32 (named in ggml_types) ----------------------


def _f16(rows: torch.Tensor, offset: int) -> torch.Tensor:
    return rows[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(rows: torch.Tensor, offset: int) -> torch.Tensor:
    packed = rows[:, offset : offset + 16]
    return torch.cat([packed & 0x0F, packed >> 4], dim=1)


def _high_bits(rows: torch.Tensor, offset: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=rows.device)
    return ((rows[:, offset : offset + 4, None] >> shifts) & 1).reshape(-1, 32) << 4


def decode_q8_0(rows: torch.Tensor) -> torch.Tensor:
    return rows[:, 2:].view(torch.int8).to(torch.float32) * _f16(rows, 0)


def decode_q4_0(rows: torch.Tensor) -> torch.Tensor:
    return _f16(rows, 0) * (_nibbles(rows, 2).to(torch.float32) - 8)


def decode_q5_0(rows: torch.Tensor) -> torch.Tensor:
    return _f16(rows, 0) * ((_nibbles(rows, 6) | _high_bits(rows, 2)).to(torch.float32) - 16)


def decode_q4_1(rows: torch.Tensor) -> torch.Tensor:
    return _f16(rows, 0) * _nibbles(rows, 4).to(torch.float32) + _f16(rows, 2)


def decode_q5_1(rows: torch.Tensor) -> torch.Tensor:
    return _f16(rows, 0) * (_nibbles(rows, 8) | _high_bits(rows, 4)).to(torch.float32) + _f16(rows, 2)
