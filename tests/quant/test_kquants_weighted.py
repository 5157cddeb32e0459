"""Quantization with an importance matrix writes exactly libggml's bytes (`ggml_quantize_chunk` with
`imatrix`, what `llama-quantize --imatrix` runs) for every type with a weighted path: the K-quants
(quant.kquants) and Q4_0/Q4_1/Q5_0/Q5_1 (quant.weighted_legacy). Many input families times
several importance matrices go through `ggml.quantize`, one call per type and matrix, and through
its chunking (rows per chunk, pieces per chunk) and the kernels' slow paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightops.errors import WeightopsError
from weightops.quant import ggml, ggml_types
from weightops.quant.kquants import affine, common

WEIGHTED = ["q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
F32 = np.float32
COLS = 512  # two super-blocks, sixteen legacy blocks per row


def families(seed: int) -> dict[str, np.ndarray]:
    """Input families, each (rows, COLS) float32: whole rows of one kind (the legacy types' weights
    depend on the whole row)."""
    rng = np.random.default_rng(seed)

    def normal(rows: int, scale: float) -> np.ndarray:
        return rng.standard_normal((rows, COLS)) * scale

    out = {f"normal {s:g}": normal(8, s) for s in (1e-3, 0.02, 1.0, 1e3)}
    out["bf16-valued"] = torch.from_numpy(normal(8, 0.05).astype(F32)).to(torch.bfloat16).float().numpy()
    out["f16-valued"] = normal(6, 0.05).astype(np.float16)
    out["student-t"] = rng.standard_t(2, (8, COLS)) * 0.02
    out["cauchy"] = rng.standard_cauchy((6, COLS)) * 0.01
    out["all positive"] = np.abs(normal(4, 0.02)) + 1e-3
    out["all negative"] = -np.abs(normal(4, 0.02)) - 1e-3
    out["integers"] = rng.integers(-8, 9, (4, COLS))
    out["small integers"] = rng.integers(0, 4, (4, COLS))
    consts = [0.0, -0.0, 1.0, -1.0, 0.37, -1e5, 65504.0, 1e-7, -3e-40, 1e-15]
    out["constant rows"] = np.repeat(np.array(consts)[:, None], COLS, axis=1)
    blocky = normal(6, 0.02)
    blocky[:, 32:96] = 0.0
    blocky[::2, 256:288] = -0.0
    blocky[:, 300:316] = 0.5
    out["zero and constant blocks"] = blocky
    out["sparse (signed zeros)"] = normal(6, 0.02) * (rng.random((6, COLS)) < 0.1)
    out["very sparse"] = normal(4, 1.0) * (rng.random((4, COLS)) < 0.02)
    out["tiny 1e-9"] = normal(4, 1e-9)
    out["near GROUP_MAX_EPS"] = normal(4, 1e-15)
    out["huge 1e4"] = normal(4, 1e4)
    out["fp16 d overflow"] = normal(4, 1e7) * rng.choice([1, 30], (4, COLS))
    outliers = normal(8, 0.02)
    outliers[rng.random((8, COLS)) < 0.01] *= 300
    out["outliers"] = outliers
    out["subnormals"] = normal(2, 1e-40)
    mixed = normal(2, 1e-40)
    mixed[:, ::29] = 1.0
    out["subnormals with normals"] = mixed
    return {name: np.ascontiguousarray(v, dtype=F32) for name, v in out.items()}


def imatrices(seed: int) -> dict[str, np.ndarray]:
    """One float32 value per column, as llama-imatrix's files give them (sums of squares / count)."""
    rng = np.random.default_rng(seed)
    one_hot = np.zeros(COLS)
    one_hot[7] = 3.0
    out = {
        "uniform": np.ones(COLS),
        "squared activations": rng.standard_normal(COLS) ** 2 * 10 + rng.standard_normal(COLS) ** 2,
        "with zeros": rng.random(COLS) * (rng.random(COLS) < 0.7),
        "huge dynamic range": 10.0 ** rng.uniform(-8, 8, COLS),
        "all zero": np.zeros(COLS),
        "one hot": one_hot,
    }
    return {name: v.astype(F32) for name, v in out.items()}


def _stack(fams: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All families as one array, and the family name of each row."""
    return np.concatenate(list(fams.values())), np.repeat(list(fams), [len(v) for v in fams.values()])


def _assert_rows_equal(ours: np.ndarray, ref: np.ndarray, owner: np.ndarray, what: str) -> None:
    ours = ours.reshape(ref.shape[0], -1)
    ref = ref.reshape(ref.shape[0], -1)
    bad = (ours != ref).any(1)
    assert not bad.any(), f"{what}: {bad.sum()} rows differ, families {sorted(set(owner[bad]))}"


def _oracle(libggml, a: np.ndarray, qtype: str, imatrix: np.ndarray | None) -> np.ndarray:
    with np.errstate(all="ignore"):
        return libggml(a, qtype, imatrix)


@pytest.mark.parametrize("qtype", WEIGHTED)
def test_families_and_imatrices_match_libggml(qtype, libggml):
    a, owner = _stack(families(WEIGHTED.index(qtype)))
    x = torch.from_numpy(a)
    for name, imatrix in imatrices(100 + WEIGHTED.index(qtype)).items():
        ours = ggml.quantize(x, qtype, torch.from_numpy(imatrix)).numpy()
        _assert_rows_equal(ours, _oracle(libggml, a, qtype, imatrix), owner, f"{qtype}, imatrix {name}")


@pytest.mark.parametrize("qtype", ["q4_1", "q2_k", "q4_k", "q5_k"])
def test_loop_sums_and_exact_rounding_match_libggml(qtype, libggml, monkeypatch):
    """The affine search's paths the CPU's defaults skip: sums as a loop of adds (CUDA's path) and
    the bit-exact rounding a chunk takes when its values leave torch.round's range."""
    fams = families(7)
    a, owner = _stack({k: v[:2] for k, v in fams.items()})
    imatrix = imatrices(8)["squared activations"]
    ref = _oracle(libggml, a, qtype, imatrix)
    x, im = torch.from_numpy(a), torch.from_numpy(imatrix)
    monkeypatch.setattr(common, "INDEX_ADD_DEVICES", frozenset())
    _assert_rows_equal(ggml.quantize(x, qtype, im).numpy(), ref, owner, f"{qtype} loop sums")
    monkeypatch.undo()
    monkeypatch.setattr(affine, "NEAREST_LIMIT", 0.0)  # every chunk is redone exactly
    _assert_rows_equal(ggml.quantize(x, qtype, im).numpy(), ref, owner, f"{qtype} exact rounding")


@pytest.mark.parametrize("qtype", WEIGHTED)
def test_rows_chunks_and_layouts(qtype, libggml, monkeypatch):
    """Leading dimensions, one row per chunk, pieces smaller than a chunk, non-contiguous and
    float16 input: the same imatrix reaches every row, and each row keeps its own statistics."""
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((3, 5, 768)) * 0.05).astype(F32)
    a[1, 2] *= 100  # one row far from the others: a row's mean square must stay its own
    imatrix = (rng.standard_normal(768) ** 2).astype(F32)
    ref = _oracle(libggml, a, qtype, imatrix)
    im = torch.from_numpy(imatrix)
    whole = ggml.quantize(torch.from_numpy(a), qtype, im)
    assert tuple(whole.shape) == (3, 5, ggml.row_bytes(768, qtype))
    assert np.array_equal(whole.numpy().reshape(ref.shape), ref)
    monkeypatch.setattr(ggml, "CHUNK_VALUES", 256)  # below one row: a chunk per row
    monkeypatch.setattr(affine, "CPU_BLOCKS", 2)  # and pieces straddle rows within a chunk
    assert torch.equal(ggml.quantize(torch.from_numpy(a), qtype, im), whole)
    monkeypatch.setattr(ggml, "CHUNK_VALUES", 768 * 4)  # four rows per chunk, the last one short
    assert torch.equal(ggml.quantize(torch.from_numpy(a), qtype, im), whole)
    monkeypatch.undo()
    t = torch.from_numpy(a.reshape(15, 768).T.copy()).t()
    assert not t.is_contiguous()
    assert np.array_equal(ggml.quantize(t, qtype, im).numpy().reshape(ref.shape), ref)
    half = torch.from_numpy(a).to(torch.float16)
    expected = _oracle(libggml, half.float().numpy(), qtype, imatrix)
    assert np.array_equal(ggml.quantize(half, qtype, im).numpy().reshape(ref.shape), expected)
    record = ggml_types.parse(qtype)
    assert np.array_equal(record.encode(torch.from_numpy(a), torch.device("cpu"), im).numpy().reshape(ref.shape), ref)


def test_weighted_flag_is_where_libggml_uses_the_imatrix(libggml):
    """A type is marked weighted exactly when libggml's bytes change with an imatrix (Q8_0's do not:
    quantize_q8_0 ignores it); for the others `ggml.quantize` ignores it too."""
    rng = np.random.default_rng(4)
    a = (rng.standard_normal((4, 512)) * 0.05).astype(F32)
    imatrix = (10.0 ** rng.uniform(-3, 3, 512)).astype(F32)
    for name in ggml_types.BLOCK_NAMES:
        record = ggml_types.parse(name)
        changes = not np.array_equal(libggml(a, name, imatrix), libggml(a, name))
        assert record.weighted == changes, name
        ours = ggml.quantize(torch.from_numpy(a), name, torch.from_numpy(imatrix)).numpy()
        assert np.array_equal(ours.reshape(-1), libggml(a, name, imatrix).reshape(-1)), name
    assert not any(ggml_types.parse(n).weighted for n in ("f32", "f16", "bf16"))


def test_imatrix_of_the_wrong_length_is_refused():
    x = torch.zeros((2, 512))
    with pytest.raises(WeightopsError, match=r"one value per column \(512\)"):
        ggml.quantize(x, "q4_k", torch.ones(256))
    with pytest.raises(WeightopsError, match="no weighted path"):
        _ = ggml_types.parse("q8_0").weighted_encoder


@pytest.mark.parametrize("qtype", WEIGHTED)
@pytest.mark.parametrize(
    "device",
    [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
def test_device(qtype, device, libggml):
    a, owner = _stack({k: v[:2] for k, v in families(9).items()})
    imatrix = imatrices(10)["huge dynamic range"]
    ours = ggml.quantize(torch.from_numpy(a).to(device), qtype, torch.from_numpy(imatrix).to(device))
    assert ours.device.type == device
    _assert_rows_equal(ours.cpu().numpy(), _oracle(libggml, a, qtype, imatrix), owner, f"{qtype} on {device}")
