"""Q6_K and Q3_K (quant.kquants.symmetric) write exactly libggml's bytes (`ggml_quantize_chunk`,
what llama-quantize runs, with and without an importance matrix) and read them back exactly as
gguf.quants does. Many input families go through one call each, thousands of blocks per case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants

from weightops.quant import ggml, ggml_types
from weightops.quant.kquants import symmetric

TYPES = ["q6_k", "q3_k"]
DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
F32 = np.float32
COLS = 1024  # four super-blocks per row


def _rows(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=F32).reshape(-1, COLS)


def families(seed: int) -> dict[str, np.ndarray]:
    """Input families, each a (rows, 1024) float32 array: whole rows of the same kind."""
    rng = np.random.default_rng(seed)

    def normal(rows: int, scale: float) -> np.ndarray:
        return rng.standard_normal((rows, COLS)) * scale

    out = {f"normal {s:g}": normal(64, s) for s in (1e-3, 0.02, 1.0, 1e3)}
    out["bf16-valued"] = torch.from_numpy(normal(64, 0.05).astype(F32)).to(torch.bfloat16).to(torch.float32).numpy()
    out["f16-valued"] = normal(64, 0.05).astype(np.float16)
    out["student-t"] = rng.standard_t(3, (64, COLS)) * 0.02
    out["cauchy"] = rng.standard_cauchy((64, COLS)) * 0.01
    out["all-positive"] = np.abs(normal(32, 0.02))
    out["all-negative"] = -np.abs(normal(32, 0.02))
    out["integer grid"] = rng.integers(-8, 9, (32, COLS))
    out["half-integer grid"] = rng.integers(-16, 17, (32, COLS)) / 2
    out["small integer grid"] = rng.integers(-2, 3, (32, COLS))
    consts = [0.0, -0.0, 1.0, -1.0, 0.37, -1e5, 65504.0, 1e-7, -3e-40, 1e-15, 2e-15]
    out["zero and constant"] = np.repeat(np.array(consts)[:, None], COLS, axis=1)
    signs = rng.integers(0, 2, (8, COLS)).astype(bool)
    signed = np.where(signs, 0.0, -0.0)
    signed[4:, ::37] = rng.standard_normal((4, len(range(0, COLS, 37))))  # zeros with a few values
    out["signed zeros"] = signed
    out["sparse"] = normal(32, 0.02) * (rng.random((32, COLS)) < 0.1)
    out["very sparse"] = normal(32, 1.0) * (rng.random((32, COLS)) < 0.02)
    out["tiny 1e-9"] = normal(32, 1e-9)
    out["near GROUP_MAX_EPS"] = normal(32, 1e-15)
    out["large 1e4"] = normal(32, 1e4)
    out["cauchy 1e4"] = rng.standard_cauchy((16, COLS)) * 1e4
    out["fp16 d overflow"] = normal(16, 1e7) * rng.choice([1, 30], (16, COLS))
    outliers = normal(32, 0.02)
    outliers[rng.random((32, COLS)) < 0.01] *= 300
    out["outliers"] = outliers
    ties = np.tile(np.linspace(-0.5, 0.5, 16), (16, COLS // 16))
    ties[:, 3::16], ties[:, 9::16] = 2.0, -2.0  # +a before -a in every sub-block
    ties[8:, 3::16], ties[8:, 9::16] = -2.0, 2.0  # -a first
    out["exact ties"] = ties
    out["subnormals"] = normal(8, 1e-40)
    mixed = normal(8, 1e-40)
    mixed[:, ::29] = 1.0
    out["subnormals with normals"] = mixed
    return {name: _rows(v) for name, v in out.items()}


def assert_blocks_equal(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    ours, ref = ours.reshape(ref.shape[0], -1), ref.reshape(ref.shape[0], -1)
    bad = np.argwhere(ours != ref)
    assert bad.size == 0, (
        f"{what}: {len(np.unique(bad[:, 0]))} of {ref.shape[0]} rows differ, first at {bad[0].tolist()}: "
        f"ours {ours[tuple(bad[0])]} libggml {ref[tuple(bad[0])]}"
    )


@pytest.mark.parametrize("qtype", TYPES)
def test_every_family_matches_libggml(qtype, libggml):
    for name, a in families(TYPES.index(qtype)).items():
        ours = ggml.quantize(torch.from_numpy(a), qtype).numpy()
        assert_blocks_equal(ours, libggml(a, qtype), f"{qtype} {name}")


@pytest.mark.parametrize("qtype", TYPES)
def test_importance_matrix_matches_libggml(qtype, libggml):
    """The `weights` path is quantize_row_qN_K_impl: the same imatrix vector for every row."""
    encode = ggml_types.parse(qtype).encoder
    size = ggml_types.parse(qtype).type_size
    rng = np.random.default_rng(11)
    imatrices = {
        "uniform": rng.random(COLS),
        "squared activations": rng.standard_normal(COLS) ** 2 * 10,
        "with zeros": rng.random(COLS) * (rng.random(COLS) < 0.7),
    }
    for fam, a in families(20 + TYPES.index(qtype)).items():
        for im_name, imatrix in imatrices.items():
            imatrix = imatrix.astype(F32)
            x = torch.from_numpy(a).reshape(-1, 256)
            weights = torch.from_numpy(np.tile(imatrix, a.shape[0])).reshape(-1, 256)
            out = torch.empty((x.shape[0], size), dtype=torch.uint8)
            encode(x, out, weights)
            assert_blocks_equal(out.numpy(), libggml(a, qtype, imatrix), f"{qtype} {fam}, imatrix {im_name}")


@pytest.mark.parametrize("qtype", TYPES)
def test_decoders_equal_gguf(qtype, libggml):
    a = np.concatenate(list(families(30 + TYPES.index(qtype)).values()))
    packed = libggml(a, qtype)
    with np.errstate(all="ignore"):
        ref = quants.dequantize(packed, ggml_types.parse(qtype).ggml).astype(F32)
    ours = ggml.dequantize(torch.from_numpy(packed), qtype, a.shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == a.shape
    np.testing.assert_array_equal(ours.numpy(), ref)  # NaN where d overflowed fp16 and a scale is 0
    assert np.isnan(ref).any() and (ref != 0).any()  # the families do reach fp16's overflow


@pytest.mark.parametrize("qtype", TYPES)
def test_shapes_chunks_and_strides(qtype, libggml, monkeypatch):
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((3, 5, 768)) * 0.1).astype(F32)
    want = libggml(a.reshape(-1, 768), qtype).reshape(3, 5, -1)
    ours = ggml.quantize(torch.from_numpy(a), qtype)
    assert tuple(ours.shape) == (3, 5, ggml.row_bytes(768, qtype)) and ours.dtype == torch.uint8
    assert_blocks_equal(ours.numpy(), want, f"{qtype} 3-D")
    monkeypatch.setattr(ggml, "CHUNK_VALUES", 256 * 2)  # chunks of 2 blocks straddle the rows of 3
    assert_blocks_equal(ggml.quantize(torch.from_numpy(a), qtype).numpy(), want, f"{qtype} chunked")
    t = torch.from_numpy((rng.standard_normal((512, 256)) * 0.1).astype(F32)).t()  # non-contiguous
    assert_blocks_equal(ggml.quantize(t, qtype).numpy(), libggml(t.contiguous().numpy(), qtype), f"{qtype} strided")


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_device(qtype, device, libggml):
    a = np.concatenate([families(40)[k] for k in ("normal 0.02", "zero and constant", "fp16 d overflow", "sparse")])
    ours = ggml.quantize(torch.from_numpy(a).to(device), qtype)
    assert ours.device.type == device
    assert_blocks_equal(ours.cpu().numpy(), libggml(a, qtype), f"{qtype} on {device}")
    back = ggml.dequantize(ours, qtype, a.shape)
    assert back.device.type == device
    with np.errstate(all="ignore"):
        ref = quants.dequantize(ours.cpu().numpy(), ggml_types.parse(qtype).ggml)
    np.testing.assert_array_equal(back.cpu().numpy(), ref)


def test_kernels_are_the_registered_ones():
    for qtype in TYPES:
        t = ggml_types.parse(qtype)
        assert t.encoder is getattr(symmetric, f"encode_{qtype}") and t.decoder is getattr(symmetric, f"decode_{qtype}")
