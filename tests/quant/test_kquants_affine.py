"""Q2_K, Q4_K and Q5_K (quant.kquants.affine) write exactly the bytes of libggml's
`ggml_quantize_chunk` (the `libggml` fixture: what llama-quantize runs) and read them back
exactly as `gguf.quants.dequantize` does, on thousands of super-blocks of many input families,
through every code path (index_add_ and loop sums, fast and exact rounding) and through
`ggml.quantize` (shapes, chunks, non-contiguous input, CUDA when present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants

from weightops.quant import ggml, ggml_types
from weightops.quant.kquants import affine, common

TYPES = ["q2_k", "q4_k", "q5_k"]
DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
F32 = np.float32
BLOCKS = 160  # super-blocks per family


def _families(blocks: int = BLOCKS, seed: int = 0) -> dict[str, np.ndarray]:
    """Input families, each (blocks, 256) float32 (one super-block per row)."""
    rng = np.random.default_rng(seed)
    shape = (blocks, 256)
    normal = rng.standard_normal(shape)

    def scaled(v):  # a spread of magnitudes per sub-block
        return v * 10.0 ** rng.uniform(-3, 1, size=(blocks, 16, 1)).repeat(16, 1).reshape(shape)

    sparse = np.where(rng.random(shape) < 0.9, 0.0, normal)
    outliers = normal * 0.02
    hit = rng.random(shape) < 0.01
    outliers[hit] *= 1000
    ties = rng.choice([-1.0, -0.5, 0.5, 1.0], size=shape)
    signed_zeros = np.where(rng.random(shape) < 0.5, -0.0, 0.0)
    signed_zeros[: blocks // 2, ::7] = normal[: blocks // 2, ::7]  # half the blocks: a few values among ±0
    constant = np.repeat(rng.uniform(-3, 3, size=(blocks, 8, 1)), 32, axis=2).reshape(shape)
    constant[::4] = 0.0
    families = {
        "normal 0.02": normal * 0.02,
        "normal 1": normal,
        "normal 300": normal * 300,
        "mixed scales": scaled(normal),
        "bf16-valued": (torch.from_numpy((normal * 0.05).astype(F32)).to(torch.bfloat16).to(torch.float32).numpy()),
        "f16-valued": (normal * 0.05).astype(np.float16),
        "student-t": rng.standard_t(2, size=shape) * 0.02,
        "cauchy": rng.standard_cauchy(size=shape) * 0.01,
        "all positive": np.abs(normal) + 0.01,
        "all negative": -np.abs(normal) - 0.01,
        "integers": rng.integers(-8, 9, size=shape),
        "half integers": rng.integers(-16, 17, size=shape) / 2,
        "small integers": rng.integers(0, 4, size=shape),
        "zero and constant": constant,
        "signed zeros": signed_zeros,
        "sparse": sparse,
        "1e-9": normal * 1e-9,
        "1e4": normal * 1e4,
        "outliers": outliers,
        "ties": ties,
        "subnormals": normal * 1e-39,
    }
    return {name: np.ascontiguousarray(v, dtype=F32) for name, v in families.items()}


def _encode(a: np.ndarray, qtype: str) -> np.ndarray:
    """Our kernel called directly on (n, 256) super-blocks."""
    x = torch.from_numpy(a)
    out = torch.empty((a.shape[0], ggml_types.parse(qtype).type_size), dtype=torch.uint8)
    getattr(affine, f"encode_{qtype}")(x, out)
    return out.numpy()


def _assert_families(qtype: str, libggml, families: dict[str, np.ndarray]) -> None:
    for name, a in families.items():
        ours, ref = _encode(a, qtype), libggml(a, qtype)
        bad = np.flatnonzero((ours != ref).any(1))
        assert bad.size == 0, f"{qtype} {name}: {bad.size} of {len(a)} blocks differ (first: {bad[:5]})"


@pytest.mark.parametrize("qtype", TYPES)
def test_families_match_libggml_and_gguf(qtype, libggml):
    t = ggml_types.parse(qtype)
    families = _families()
    _assert_families(qtype, libggml, families)
    decode = getattr(affine, f"decode_{qtype}")
    for name, a in families.items():
        ref = libggml(a, qtype)
        with np.errstate(all="ignore"):
            expected = quants.dequantize(ref, t.ggml).astype(F32)
        ours = decode(torch.from_numpy(ref)).numpy()
        assert np.array_equal(ours.view(np.uint32), expected.view(np.uint32)), f"{qtype} {name}: decoded values differ"


@pytest.mark.parametrize("qtype", TYPES)
def test_loop_sums_and_exact_rounding_match_libggml(qtype, libggml, monkeypatch):
    """The code paths the CPU's defaults skip: sums as a loop of adds (CUDA's path) and the
    bit-exact rounding every chunk takes when its values leave torch.round's range."""
    families = _families(blocks=24, seed=1)
    monkeypatch.setattr(common, "INDEX_ADD_DEVICES", frozenset())
    _assert_families(qtype, libggml, families)
    monkeypatch.undo()
    monkeypatch.setattr(affine, "NEAREST_LIMIT", 0.0)  # every chunk is redone exactly
    _assert_families(qtype, libggml, families)


@pytest.mark.parametrize("qtype", TYPES)
def test_through_ggml_quantize(qtype, libggml, monkeypatch):
    """Rows of several super-blocks, leading dimensions, chunks of every size, non-contiguous
    input and float16 input, as `ggml.quantize` and `ggml.dequantize` run the kernels."""
    rng = np.random.default_rng(2)
    a = (rng.standard_normal((3, 5, 768)) * 0.05).astype(F32)
    ref = libggml(a, qtype)
    whole = ggml.quantize(torch.from_numpy(a), qtype)
    assert tuple(whole.shape) == (3, 5, ggml.row_bytes(768, qtype))
    assert np.array_equal(whole.numpy().reshape(ref.shape), ref)
    monkeypatch.setattr(ggml, "CHUNK_VALUES", 1024)  # 4 super-blocks per chunk: chunks straddle rows
    monkeypatch.setattr(affine, "CPU_BLOCKS", 3)  # and pieces straddle chunks
    assert torch.equal(ggml.quantize(torch.from_numpy(a), qtype), whole)
    monkeypatch.undo()
    t = torch.from_numpy(a.reshape(15, 768).T.copy()).t()  # (15, 768), not contiguous
    assert not t.is_contiguous()
    assert np.array_equal(ggml.quantize(t, qtype).numpy().reshape(ref.shape), ref)
    half = torch.from_numpy(a).to(torch.float16)
    assert np.array_equal(ggml.quantize(half, qtype).numpy().reshape(ref.shape), libggml(half.float().numpy(), qtype))
    back = ggml.dequantize(whole, qtype, a.shape)
    expected = quants.dequantize(ref, ggml_types.parse(qtype).ggml).reshape(a.shape)
    assert np.array_equal(back.numpy(), expected)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_device(qtype, device, libggml):
    families = _families(blocks=32, seed=3)
    a = np.concatenate(list(families.values()))
    ours = ggml.quantize(torch.from_numpy(a).to(device), qtype)
    assert ours.device.type == device
    ref = libggml(a, qtype)
    bad = np.flatnonzero((ours.cpu().numpy() != ref).any(1))
    assert bad.size == 0, f"{qtype} on {device}: blocks {bad[:8]} differ ({bad.size} in all)"
    back = ggml.dequantize(torch.from_numpy(ref).to(device), qtype, a.shape)
    with np.errstate(all="ignore"):
        assert np.array_equal(back.cpu().numpy(), quants.dequantize(ref, ggml_types.parse(qtype).ggml))
