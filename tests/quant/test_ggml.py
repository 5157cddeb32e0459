"""The torch GGML kernels write exactly the bytes of gguf.quants (the oracle, itself tested
bit-for-bit against libggml upstream) and read them back exactly as gguf.quants does.

Where llama-cpp-python is installed, every case is also checked against libggml's own
quantizer (`ggml_quantize_chunk`, what llama-quantize runs). The two references differ only
in the sign of a zero scale or minimum in blocks of signed zeros; there we follow libggml
(test_signed_zero_blocks_follow_libggml)."""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf.quants import quant_shape_to_byte_shape

from weightops import devices
from weightops.errors import WeightopsError
from weightops.quant import ggml, ggml_types

TYPES = [n for n in ggml_types.BLOCK_NAMES if ggml_types.parse(n).block_size == 32]  # K-quants: test_kquants_*
DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
# d = scale / DIVISOR: Q8_0 max|x| / 127, Q4_0 m / -8, Q5_0 m / -16, Q4_1 range / 15, Q5_1 range / 31
DIVISOR = {"q8_0": 127.0, "q4_0": -8.0, "q5_0": -16.0, "q4_1": 15.0, "q5_1": 31.0}
F32 = np.float32


def _libggml_quantize_chunk():
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    fn = lib.ggml_quantize_chunk  # (type, src, dst, start, nrows, n_per_row, imatrix) -> bytes written
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return fn


QUANTIZE_CHUNK = _libggml_quantize_chunk()


def libggml(a: np.ndarray, qtype: str) -> np.ndarray:
    """The bytes llama.cpp's C quantizer writes for float32 `a`."""
    a = np.ascontiguousarray(a, dtype=F32)
    out = np.empty(quant_shape_to_byte_shape(a.shape, ggml_types.parse(qtype).ggml), dtype=np.uint8)
    rows = a.reshape(-1, a.shape[-1])
    written = QUANTIZE_CHUNK(
        int(ggml_types.parse(qtype).ggml), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None
    )
    assert written == out.nbytes
    return out


def oracle(a: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):  # degenerate blocks overflow inside the numpy reference, by design
        return quants.quantize(np.ascontiguousarray(a, dtype=F32), ggml_types.parse(qtype).ggml)


def assert_same_bytes(a: np.ndarray, qtype: str, device: str = "cpu") -> np.ndarray:
    """Quantize float32 `a` with our kernel on `device` and with the oracle; the bytes must be equal."""
    ours = ggml.quantize(torch.from_numpy(np.ascontiguousarray(a, dtype=F32)).to(device), qtype)
    assert ours.device.type == device and ours.dtype == torch.uint8
    ref = oracle(a, qtype)
    ours = ours.cpu().numpy()
    assert ours.shape == ref.shape
    assert_equal_bytes(ours, ref, f"{qtype} vs gguf.quants")
    if QUANTIZE_CHUNK is not None:
        assert_equal_bytes(ours, libggml(a, qtype), f"{qtype} vs libggml")
    return ref


def assert_equal_bytes(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    bad = np.argwhere(ours != ref)
    assert bad.size == 0, (
        f"{what}: {len(bad)} bytes differ, first at {bad[0].tolist()}: ours {ours[tuple(bad[0])]} "
        f"reference {ref[tuple(bad[0])]}"
    )


def blocks(*rows: list[float]) -> np.ndarray:
    """One row per block list (each of 32 values)."""
    out = np.array(rows, dtype=F32)
    assert out.shape[1] == 32
    return out


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("scale", [1e-3, 0.02, 1.0, 1e3])
def test_random_normal(qtype, scale):
    rng = np.random.default_rng([TYPES.index(qtype), int(scale * 1000)])
    a = rng.standard_normal((16, 512)).astype(F32) * F32(scale)
    assert_same_bytes(a, qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_zero_and_constant_blocks(qtype):
    rows = [
        np.zeros(32),
        np.full(32, 1.0),
        np.full(32, -1.0),
        np.full(32, 0.37),
        np.full(32, -1e5),
        np.full(32, 65504.0),
        np.full(32, 1e-7),
        np.full(32, -3e-40),
    ]
    assert_same_bytes(blocks(*rows), qtype)


def signed_zero_blocks() -> np.ndarray:
    z = np.zeros(32)
    rows = [z, -z, np.where(np.arange(32) % 3, 0.0, -0.0), np.where(np.arange(32) % 3, -0.0, 0.0)]
    ramp = np.linspace(0.0, 1.0, 32)
    rows += [
        ramp,
        np.r_[-0.0, ramp[1:]],
        -ramp,
        np.r_[0.0, -ramp[1:]],
        np.r_[ramp[3:], -0.0, 0.0, -0.0],
        np.r_[-ramp[3:], 0.0, -0.0, 0.0],
    ]
    return blocks(*rows)


FP16_FIELDS = {"q8_0": [0], "q4_0": [0], "q5_0": [0], "q4_1": [0, 2], "q5_1": [0, 2]}


@pytest.mark.parametrize("qtype", TYPES)
def test_signed_zero_blocks_follow_libggml(qtype):
    """Blocks of +0.0/-0.0 (and non-negative or non-positive blocks whose min or max is a zero):
    llama.cpp keeps the first zero its scan meets (Q4_0/Q5_0 start from max = +0.0); gguf.quants'
    numpy reductions pick either sign. Everything but the sign bit of those fp16 zeros agrees."""
    a = signed_zero_blocks()
    ours = ggml.quantize(torch.from_numpy(a), qtype).numpy()
    ref = oracle(a, qtype)
    sign_bytes = [i + 1 for i in FP16_FIELDS[qtype]]
    other = np.setdiff1d(np.arange(ref.shape[1]), sign_bytes)
    assert_equal_bytes(ours[:, other], ref[:, other], f"{qtype} vs gguf.quants (all but fp16 sign bits)")
    assert_equal_bytes(
        ours[:, sign_bytes] & 0x7F, ref[:, sign_bytes] & 0x7F, f"{qtype} vs gguf.quants (fp16 high bytes but the sign)"
    )
    if qtype in ("q4_0", "q5_0"):  # a zero block's d is 0.0 / -8 = -0.0: fp16 0x8000
        assert ours[0, :2].tolist() == ours[1, :2].tolist() == [0, 0x80]
    if QUANTIZE_CHUNK is None:
        pytest.skip("llama-cpp-python (libggml) not installed")
    assert_equal_bytes(ours, libggml(a, qtype), f"{qtype} vs libggml")


@pytest.mark.parametrize("qtype", TYPES)
def test_huge_and_tiny_magnitudes(qtype):
    rng = np.random.default_rng(7)
    rows = []
    for scale in [1e30, 3e38, 1e10, 1e-8, 1e-20, 1e-30, 1e-37, 1e-38, 1e-39, 1e-41, 1e-44, 1e-45]:
        rows.append(np.clip(rng.standard_normal(32) * scale, -3.4e38, 3.4e38))
    big = np.full(32, 3.4e38)
    big[1::2] = -3.4e38  # max - min overflows float32
    rows += [big, np.where(np.arange(32) % 2, 1e-45, -1e-45)]
    mixed = rng.standard_normal(32) * 1e-40
    mixed[5] = 1.0  # one normal value among subnormals
    rows.append(mixed)
    assert_same_bytes(blocks(*rows), qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_scale_at_fp16_limits(qtype):
    """Scales that round to fp16's largest finite value or overflow to inf, and fp16 subnormal scales."""
    div = abs(DIVISOR[qtype])
    rows = []
    for d in [65504.0, 65519.0, 65520.0, 65530.0, 70000.0, 6.1e-5, 6e-8, 2.9e-8, 3e-8, 1e-9]:
        r = np.linspace(-1, 1, 32) * d * div
        if qtype in ("q4_1", "q5_1"):
            r = np.linspace(0, d * div, 32)
        rows.append(r)
    assert_same_bytes(blocks(*rows), qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_exact_ties_for_largest_magnitude(qtype):
    base = np.linspace(-0.5, 0.5, 32)
    pos_first, neg_first, many = base.copy(), base.copy(), base.copy()
    pos_first[[3, 20]] = [2.0, -2.0]
    neg_first[[3, 20]] = [-2.0, 2.0]
    many[[1, 9, 17, 31]] = [-7.0, 7.0, -7.0, 7.0]
    end = base.copy()
    end[[30, 31]] = [-1.0, 1.0]
    assert_same_bytes(blocks(pos_first, neg_first, many, end), qtype)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("exponent", [-20, -3, 0, 7])
def test_rounding_boundaries(qtype, exponent):
    """Values where x * id lands exactly on a rounding boundary (and one float either side)."""
    s = 2.0**exponent
    if qtype == "q8_0":  # d = s, id = 1/s: x * id = k + 0.5
        grid, anchor = np.arange(-15.5, 16.0, 1.0), 127.0
    elif qtype in ("q4_0", "q5_0"):  # d = s, x * id + 8.5 (16.5) = integer
        half = -DIVISOR[qtype]
        grid, anchor = np.arange(0, 32) % (2 * half) - half + 0.5, -half
    else:  # min = 0, d = s: (x - min) * id + 0.5 = integer
        top = DIVISOR[qtype]
        grid, anchor = np.arange(0, 32) % top + 0.5, top
    rows = []
    for nudge in (0, 1, -1):
        r = (grid * s).astype(F32)
        r = np.nextafter(r, F32(np.inf) if nudge > 0 else F32(-np.inf)) if nudge else r
        r[0] = anchor * s  # fixes d (or min/max) exactly
        if qtype in ("q4_1", "q5_1"):
            r[1] = 0.0
        rows.append(r)
    q8_extra = np.full(32, 0.5 - 2.0**-25) * s
    q8_extra[0] = 127.0 * s  # x * id just below 0.5: must round to 0, not 1
    rows.append(q8_extra)
    assert_same_bytes(blocks(*rows), qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_random_mixed_magnitudes(qtype):
    """Many blocks, each at a random scale from float32 subnormals to near float32 max, with zeros."""
    rng = np.random.default_rng(11)
    exps = rng.uniform(-45, 38, size=(4096, 1))
    a = rng.standard_normal((4096, 32)) * 10.0**exps
    a[rng.random(a.shape) < 0.05] = 0.0
    a[rng.random(a.shape) < 0.02] *= -0.0
    assert_same_bytes(np.clip(a, -3.4e38, 3.4e38).reshape(64, 2048), qtype)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_dtypes_quantize_their_float32_values(qtype, dtype):
    t = (torch.randn(8, 128, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    t[0, :32] = torch.tensor(1e-7).to(dtype)  # subnormal in fp16
    ref = oracle(t.to(torch.float32).numpy(), qtype)
    assert np.array_equal(ggml.quantize(t, qtype).numpy(), ref)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("shape", [(32,), (3, 64), (2, 3, 96), (5, 1, 4096)])
def test_shapes(qtype, shape):
    a = np.random.default_rng(5).standard_normal(shape).astype(F32)
    ref = assert_same_bytes(a, qtype)
    assert ref.shape == quant_shape_to_byte_shape(shape, ggml_types.parse(qtype).ggml)


@pytest.mark.parametrize("qtype", TYPES)
def test_chunked_processing_gives_the_same_bytes(qtype, monkeypatch):
    a = np.random.default_rng(9).standard_normal((7, 320)).astype(F32)
    whole = ggml.quantize(torch.from_numpy(a), qtype)
    monkeypatch.setattr(ggml, "CHUNK_VALUES", 96)  # 3 blocks per chunk: chunks straddle rows
    assert torch.equal(ggml.quantize(torch.from_numpy(a), qtype), whole)
    assert np.array_equal(whole.numpy(), oracle(a, qtype))


def test_non_contiguous_input():
    a = torch.randn(64, 96).t()  # (96, 64), not contiguous
    assert np.array_equal(ggml.quantize(a, "q4_0").numpy(), oracle(a.contiguous().numpy(), "q4_0"))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_device(qtype, device):
    a = np.random.default_rng(2).standard_normal((32, 256)).astype(F32)
    a[0, :32] = 1e-40  # a degenerate block: must come out as on the x86 reference
    a[1, :32] = 0.0
    assert_same_bytes(a, qtype, device)
    blocks_ = torch.from_numpy(oracle(a, qtype)).to(device)
    back = ggml.dequantize(blocks_, qtype, a.shape)
    assert back.device.type == device
    assert np.array_equal(back.cpu().numpy(), quants.dequantize(oracle(a, qtype), ggml_types.parse(qtype).ggml))


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_equals_gguf(qtype):
    rng = np.random.default_rng(4)
    a = (rng.standard_normal((4, 3, 256)) * 10.0 ** rng.uniform(-6, 4, size=(4, 3, 1))).astype(F32)
    packed = oracle(a, qtype)
    with np.errstate(all="ignore"):
        ref = quants.dequantize(packed, ggml_types.parse(qtype).ggml).astype(F32)
    ours = ggml.dequantize(torch.from_numpy(packed), qtype, a.shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == a.shape
    assert np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))
    # a second round trip is stable: dequantized values quantize to the same bytes
    assert np.array_equal(ggml.quantize(ours, qtype).numpy(), packed)


@pytest.mark.parametrize("qtype", TYPES)
def test_row_bytes_and_can_quantize(qtype):
    block, size = GGML_QUANT_SIZES[ggml_types.parse(qtype).ggml]
    assert ggml.row_bytes(4096, qtype) == 4096 // block * size
    assert ggml.can_quantize((10, 64), qtype) and ggml.can_quantize((64,), qtype)
    assert not ggml.can_quantize((10, 48), qtype)
    assert not ggml.can_quantize((), qtype) and not ggml.can_quantize((3, 0), qtype)
    with pytest.raises(WeightopsError, match="48"):
        ggml.row_bytes(48, qtype)
    with pytest.raises(WeightopsError, match=r"\(4, 48\)"):
        ggml.quantize(torch.zeros(4, 48), qtype)
    with pytest.raises(WeightopsError, match="int32"):
        ggml.quantize(torch.zeros(4, 64, dtype=torch.int32), qtype)
    with pytest.raises(WeightopsError, match="shape"):
        ggml.dequantize(torch.zeros(3, dtype=torch.uint8), qtype, (1, 32))


def test_unknown_type():
    assert not ggml.can_quantize((4, 64), "q6_k")
    with pytest.raises(WeightopsError, match="q6_k"):
        ggml.quantize(torch.zeros(4, 64), "q6_k")


def test_zero_min_and_max_take_the_first_zeros_sign_whatever_the_reduction_returned():
    """torch's CPU aminmax happens to keep the first zero; CUDA's reduction order is not fixed,
    so the kernel sets the sign itself. Fed the wrong signs, it must correct them."""
    x = torch.tensor(signed_zero_blocks(), dtype=torch.float32)
    lo, hi = torch.aminmax(x, dim=1, keepdim=True)
    want_lo, want_hi = lo.clone(), hi.clone()
    lo, hi = lo + 0.0, hi + 0.0  # -0.0 + 0.0 is +0.0: zeros lose their sign, other values stay
    ggml._first_zeros(x, lo, hi)
    assert torch.equal(torch.signbit(lo), torch.signbit(want_lo)) and torch.equal(lo, want_lo)
    assert torch.equal(torch.signbit(hi), torch.signbit(want_hi)) and torch.equal(hi, want_hi)
    assert bool(torch.signbit(want_lo).any())  # the case is exercised


def test_worker_threads_leave_torch_thread_settings_alone(monkeypatch):
    before = torch.get_num_threads()
    a = np.random.default_rng(8).standard_normal((64, 4096)).astype(F32)
    monkeypatch.setattr(ggml, "CHUNK_VALUES", 2048)  # many chunks: worker threads run them when torch has > 1
    assert np.array_equal(ggml.quantize(torch.from_numpy(a), "q4_0").numpy(), oracle(a, "q4_0"))
    assert torch.get_num_threads() == before
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [before]  # a thread started afterwards gets the process default, not the workers' 1


def test_worker_threads_run_torch_single_threaded():
    """Each worker runs its chunks on one thread, as llama.cpp's do: ATen sets a new thread's
    count from the process-wide one the first time the thread asks, so a worker that set 1
    before asking would run a team of the process's count and oversubscribe the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n, pool = devices.cpu_pool()
        assert n == 2 and pool is not None
        start = threading.Barrier(2)  # both workers at once: each reports its own thread

        def count(_: int) -> int:
            start.wait(timeout=30)
            return torch.get_num_threads()

        assert list(pool.map(count, range(2))) == [1, 1]
        assert torch.get_num_threads() == 2  # the caller keeps its own count
    finally:
        torch.set_num_threads(before)
