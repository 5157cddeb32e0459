"""Helpers every K-quant kernel needs to reproduce libggml's float32 arithmetic exactly.

The reference reduces within a (sub-)block with a plain `for` loop: float32, element order,
starting from 0. torch's reductions (`sum`, `cumsum`) use other orders or wider accumulators, so
values are laid out as (positions, blocks) and summed one position at a time (`sequential_sum`).
Its rounding is `nearest_int` (add 1.5 * 2**23, read the low mantissa bits): round half to even
while |v| < 2**22, which torch.round is; `nearest_exact` is the bit trick itself, for the rare
chunks whose values leave that range (degenerate scales), where the two differ.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from functools import cache

import torch

QK_K = 256
NEAREST_LIMIT = float(2**22)  # torch.round(v) == nearest_int(v) for |v| below this
_MAGIC = 12582912.0  # 1.5 * 2**23: v + _MAGIC has round(v) in its low mantissa bits

# CPU index_add_ adds the source slices to their target in index order, one vectorised add per
# slice: the reference's sequential loop in a single op (CUDA's uses atomics in no fixed order).
INDEX_ADD_DEVICES = frozenset({"cpu"})


_ALIGN = 64  # bytes: every scratch region starts on a cache line (and suits any dtype)


class _Arena(threading.local):
    """One thread's scratch memory: a byte buffer carved into regions, one per key, in the order
    the frame asks for them; `top` is where the next region goes."""

    def __init__(self) -> None:
        self.block = torch.empty(0, dtype=torch.uint8)
        self.top = 0
        self.depth = 0
        self.regions: dict[str, tuple[int, int]] = {}  # key -> (offset, bytes)


_arena = _Arena()


@contextlib.contextmanager
def scratch_frame() -> Iterator[None]:
    """Scratch buffers asked for inside are valid until this frame (the outermost one, frames
    nest) ends; the next frame of the thread reuses the same memory. One frame per chunk
    (`ggml.quantize`): every encoder of the thread shares one buffer, sized to the largest
    chunk's needs, not the sum of every encoder's (one chunk runs at a time per thread)."""
    arena = _arena
    arena.depth += 1
    try:
        yield
    finally:
        arena.depth -= 1
        if arena.depth == 0:
            if arena.top > arena.block.numel():  # this frame overflowed: size the next ones to it
                arena.block = torch.empty(0, dtype=torch.uint8)
                arena.block = torch.empty(arena.top, dtype=torch.uint8)
            arena.top = 0
            arena.regions.clear()


def scratch(key: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor of `shape` on `like`'s device, for a chunk-sized temporary: inside
    a `scratch_frame` on CPU, a region of the thread's arena that later calls with the same key
    get again (a larger request gets a new region), and that later frames reuse.

    Why: on CPU, a fresh tensor of a few MB is new memory from the kernel, and its first write
    page-faults every 4 KB; the search's temporaries are chunk-sized and made again for every
    chunk, which cost a third of the CPU time in faults. The caller must be done with the
    tensor before it asks for the same key again (keys are per function; results are never
    scratch). Outside a frame, and on other devices (CUDA's caching allocator already reuses
    memory), a plain torch.empty."""
    arena = _arena
    if like.device.type != "cpu" or arena.depth == 0:
        return torch.empty(shape, dtype=dtype, device=like.device)
    size = math.prod(shape) * dtype.itemsize
    offset, held = arena.regions.get(key, (0, -1))
    if held < size:
        offset = arena.top
        arena.top += -(-size // _ALIGN) * _ALIGN
        arena.regions[key] = (offset, size)
    if offset + size <= arena.block.numel():
        memory = arena.block[offset : offset + size]
    else:  # beyond the arena (a thread's first chunks): a fresh tensor, and a larger arena next frame
        memory = torch.empty(size, dtype=torch.uint8)
    return memory.view(dtype).view(shape)


def positions(x: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 256) super-blocks as contiguous (size, n * 256 / size): column s is sub-block s (the
    sub-blocks of a super-block are consecutive columns), row i its i-th value."""
    return x.reshape(-1, size).t().contiguous()


def blocks(t: torch.Tensor, per_block: int) -> torch.Tensor:
    """The inverse of `positions` for (size, n * per_block) values: (n, per_block * size)."""
    return t.t().reshape(-1, per_block * t.shape[0])


@cache
def _index(targets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(targets, dtype=torch.long, device=device)


def accumulate(out: torch.Tensor, rows: torch.Tensor, targets: tuple[int, ...]) -> None:
    """out[targets[i]] += rows[i] for i = 0, 1, ... in turn (float32, one rounding per step):
    the reference's `for` loop sums, when out starts at zero. rows is (len(targets), ...)."""
    rows = rows.reshape(len(targets), -1)
    flat = out.view(out.shape[0], -1)
    if out.device.type in INDEX_ADD_DEVICES:
        flat.index_add_(0, _index(targets, out.device), rows)
    else:
        for target, row in zip(targets, rows.unbind(0), strict=True):
            flat[target].add_(row)


def sequential_sum(t: torch.Tensor) -> torch.Tensor:
    """t.sum(0) as `for (i...) s += t[i]` computes it in float32 from s = 0."""
    out = torch.zeros((1, *t.shape[1:]), dtype=t.dtype, device=t.device)
    accumulate(out, t, (0,) * t.shape[0])
    return out[0]


def nearest_exact(v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """libggml's nearest_int(v) for every float32 v (also NaN, infinities and |v| >= 2**22,
    where it returns the low mantissa bits of v + 1.5 * 2**23), as float32 (in `out`, which
    may be v itself, when given)."""
    if out is None:
        bits = (v + _MAGIC).view(torch.int32)
        return ((bits & 0x7FFFFF) - 0x400000).to(torch.float32)
    bits = torch.add(v, _MAGIC, out=out).view(torch.int32)
    bits.bitwise_and_(0x7FFFFF).sub_(0x400000)
    return out.copy_(bits)


def nearest_byte(v: torch.Tensor) -> torch.Tensor:
    """`(uint8_t) nearest_int(v)`: the low byte of the exact result, as uint8."""
    bits = (v + _MAGIC).view(torch.int32)
    return ((bits & 0x7FFFFF) - 0x400000).bitwise_and_(0xFF).to(torch.uint8)


def sqrt(v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sqrtf(v), correctly rounded: torch's vectorised float32 sqrt on CPU is not always (it can
    be 1 ulp off). The float64 root rounded to float32 is the float32 root (53 >= 2 * 24 + 2).
    In `out` (which may be v itself) when given, through a scratch float64 buffer."""
    if out is None:
        return torch.sqrt(v.to(torch.float64)).to(torch.float32)
    return out.copy_(scratch("sqrt", v.shape, v, torch.float64).copy_(v).sqrt_())


def f32(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 0-dim tensor on `like`'s device: dividing by it stays a true division
    (PyTorch may turn division by a Python scalar into multiplication by its reciprocal)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)
